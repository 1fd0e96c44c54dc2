"""Embedding cache, the store: per-encoder float16 arrays + manifest, written once, memory-mapped by readers.
(hnet/embed_pass.py computes what goes in it: one pass over the data for every encoder.)

Layout of a cache folder:
    manifest.json        encoders {name: file, width, dtype, count, sha256, size, mtime_ns}, text, keys_sha256,
                         count, units done
    keys.json            sample keys in cache order (shard order, then file order)
    <slug>.f16.npy       float16 [count, width] per image encoder (np.load(..., mmap_mode="r")), and per text
                         encoder its caption embeddings under the name `text:NAME` (training caches; caches from
                         before several text encoders hold one `text` array + manifest `text_encoder`)
    labels.i64.npy       int64 class labels (zero-shot caches)
    caption_counts.i64.npy  int64 [count]: how many captions each image has. Text arrays hold one row per caption
                         (manifest `caption_count` rows), image i's captions at rows offsets[i] .. offsets[i+1]-1;
                         without this file, caption i belongs to image i
    parts/<unit>/        per-unit results of an unfinished pass (resume point), removed once consolidated

Each unit (a shard, or a chunk of an image folder) is written atomically with a `done.json` marker, so a killed
pass resumes at the first unfinished unit and gives the same arrays as an uninterrupted one. Under
`accelerate launch` ranks embed disjoint units; only rank 0 cleans temp files and consolidates, behind barriers,
so ranks need nothing shared but the cache folder.

Files are hashed once, as they are written. Opening a cache re-hashes a file only when its size or mtime differs
from the manifest (a changed file); `verify="full"` or `verify_cache(root)` re-hash everything on demand, which
is what catches corruption that leaves size and mtime alone (bit rot).
"""
from __future__ import annotations

import hashlib
import io as _bytes_io
import itertools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from hnet import files
from hnet.files import MANIFEST, slug
from hnet.models.encoders import TEXT_PREFIX, text_key

CAPTION_COUNTS = "caption_counts"
INT_ARRAYS = ("labels", CAPTION_COUNTS)
TEXT = "text"  # the one text array of a cache written before text encoders had names in it


def is_text(name: str) -> bool:
    """Arrays with one row per caption: `text:NAME`, or an older cache's one `text` array."""
    return name.startswith(TEXT_PREFIX) or name == TEXT


def caption_offsets(counts: np.ndarray) -> np.ndarray:
    """The row of each image's first caption, from the captions per image."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def cached_name(manifest: dict, name: str) -> str | None:
    """The manifest entry holding `name`'s features, or None: `text:NAME` is also found in an older cache's one
    `text` array when that was embedded by NAME (or by an unrecorded text encoder: synthetic caches)."""
    encoders = manifest.get("encoders", {})
    if name in encoders:
        return name
    if name.startswith(TEXT_PREFIX) and TEXT in encoders and \
            manifest.get("text_encoder") in (None, "", name[len(TEXT_PREFIX):]):
        return TEXT
    return None


class CacheError(ValueError):
    """Cache missing, incomplete, corrupted or not matching the config; the message names the file."""


@dataclass
class Unit:
    """A piece of the data processed and saved as a whole: a shard, or a chunk of an image folder."""
    name: str
    samples: Callable[[], Iterator[dict]]  # yields {key, image: PIL, caption | label}


def keys_digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def consolidate(root: Path, units: list[Unit], widths: dict[str, int], has_labels: bool) -> dict:
    """Concatenate the per-unit parts (in unit order) into one float16 array per encoder; write the manifest."""
    parts = root / "parts"
    keys: list[str] = []
    skipped: dict[str, int] = {}
    for u in units:
        done = parts / u.name / "done.json"
        if not done.exists():
            raise CacheError(f"{root}: unit {u.name} has not been embedded (missing {done})")
        record = files.read_json(done)
        keys.extend(record["keys"])
        if record.get("skipped"):
            skipped[u.name] = record["skipped"]
    if len(set(keys)) != len(keys):
        raise CacheError(f"{root}: duplicate sample keys across units")
    manifest = _read_manifest(root) or {"count": len(keys), "keys_sha256": keys_digest(keys), "encoders": {}}
    if manifest["keys_sha256"] != keys_digest(keys):
        raise CacheError(f"{root}/{MANIFEST}: this pass read different samples than the cached encoders did")
    arrays = dict(widths)
    if has_labels:
        arrays["labels"] = 0
    if any(map(is_text, widths)):
        arrays[CAPTION_COUNTS] = 0
        counts = np.concatenate([np.load(parts / u.name / f"{CAPTION_COUNTS}.npy") for u in units])
        _check_caption_counts(root, manifest, counts)
        manifest["caption_count"] = int(counts.sum())
    for name, width in arrays.items():
        rows = manifest["caption_count"] if is_text(name) else len(keys)
        manifest["encoders"][name] = _concat_parts(root, parts, units, name, width, rows)
    manifest["units"] = [u.name for u in units]
    manifest["skipped_samples"] = skipped  # bad samples the reader skipped, per unit
    files.write_json(root / "keys.json", keys)
    files.write_json(root / MANIFEST, manifest)
    shutil.rmtree(parts, ignore_errors=True)
    return manifest


def _check_caption_counts(root: Path, manifest: dict, counts: np.ndarray) -> None:
    """The images' caption counts must be those the cached text features were embedded with (a regrouped data set
    with the same images would misalign every caption row)."""
    cached_texts = any(map(is_text, manifest["encoders"]))
    entry = manifest["encoders"].get(CAPTION_COUNTS)
    if entry is not None and (root / entry["file"]).exists():
        before = np.load(root / entry["file"])
    else:
        before = np.ones(len(counts), np.int64) if cached_texts else counts
    if not np.array_equal(before, counts):
        raise CacheError(f"{root}/{MANIFEST}: the images' captions ({int(counts.sum())}) are not those the cached "
                         f"text features were embedded with ({int(before.sum())}); embed into a new cache")


def _concat_parts(root: Path, parts: Path, units: list[Unit], name: str, width: int, count: int) -> dict:
    integers = name in INT_ARRAYS
    file = root / f"{slug(name)}.{'i64' if integers else 'f16'}.npy"
    chunks = (np.load(parts / u.name / f"{slug(name)}.npy") for u in units)
    return write_array(file, (c for c in chunks if len(c)), np.int64 if integers else np.float16,
                       (count,) if integers else (count, width))


def write_array(file: Path, chunks: Iterable[np.ndarray], dtype, shape: tuple[int, ...]) -> dict:
    """Write row chunks as one .npy file (atomically, never holding the whole array) and return its manifest
    entry; the sha256 is taken from the bytes as they are written, so the file is never read back."""
    dtype = np.dtype(dtype)
    header = _bytes_io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                  "fortran_order": False, "shape": tuple(shape)})
    digest = hashlib.sha256(header.getvalue())
    rows = 0
    with files.atomic_path(file) as tmp, open(tmp, "wb") as fh:
        fh.write(header.getvalue())
        for chunk in chunks:
            data = np.ascontiguousarray(chunk, dtype)
            if data.shape[1:] != tuple(shape[1:]):
                raise CacheError(f"{file}: chunk of shape {data.shape} for an array of shape {tuple(shape)}")
            digest.update(data.data)
            fh.write(data.data)
            rows += len(data)
        if rows != shape[0]:
            raise CacheError(f"{file}: {rows} rows written for {shape[0]} keys")
    return _entry(file, shape, dtype.name, digest.hexdigest())


def _entry(file: Path, shape: tuple[int, ...], dtype: str, sha256: str) -> dict:
    """A file's manifest entry; size and mtime let readers skip re-hashing a file that did not change."""
    stat = file.stat()
    return {"file": file.name, "width": int(shape[1]) if len(shape) > 1 else 0, "dtype": dtype,
            "count": int(shape[0]), "sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_manifest(root: Path) -> dict | None:
    path = root / MANIFEST
    return files.read_json(path) if path.exists() else None


def write_cache(root: str | Path, keys: list[str], arrays: dict[str, np.ndarray | Iterable[np.ndarray]],
                text_encoder: str | None = None, caption_counts: np.ndarray | None = None) -> dict:
    """Write ready-made feature arrays as a cache (synthetic data for tests and benchmarks). A value is an array
    or an iterable of [rows, width] chunks, written as they come (for caches larger than memory). With
    `caption_counts` (captions per image), text arrays hold sum(caption_counts) rows."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"count": len(keys), "keys_sha256": keys_digest(keys), "encoders": {}, "text_encoder": text_encoder}
    captions = len(keys)
    if caption_counts is not None:
        counts = np.asarray(caption_counts, np.int64)
        if counts.shape != (len(keys),) or counts.min(initial=1) < 1:
            raise CacheError(f"{root}: caption_counts needs one count >= 1 per key")
        manifest["encoders"][CAPTION_COUNTS] = write_array(root / f"{CAPTION_COUNTS}.i64.npy", [counts], np.int64,
                                                           counts.shape)
        captions = manifest["caption_count"] = int(counts.sum())
    for name, array in arrays.items():
        chunks = iter([array] if isinstance(array, np.ndarray) else array)
        first = next(chunks, None)
        if first is None:
            raise CacheError(f"{root}: '{name}' has no rows")
        rows = captions if is_text(name) else len(keys)
        manifest["encoders"][name] = write_array(root / f"{slug(name)}.f16.npy", itertools.chain([first], chunks),
                                                 np.float16, (rows, first.shape[1]))
    files.write_json(root / "keys.json", keys)
    files.write_json(root / MANIFEST, manifest)
    return manifest


def _check_file(path: Path, entry: dict, full: bool) -> None:
    """Raise if the file's bytes differ from the manifest; re-hash only when asked or when size/mtime moved."""
    stat = path.stat()
    if not full and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return
    if files.sha256_file(path) != entry["sha256"]:
        raise CacheError(f"{path}: checksum mismatch, the file is corrupted; delete it and re-run embed")


def verify_cache(root: str | Path) -> dict[str, str]:
    """Re-hash every file of a cache (on demand: after a copy, or to look for bit rot). Raises CacheError naming
    the first corrupted file. Files whose bytes match but whose size/mtime moved (a copy) get their stat
    re-recorded, so later opens skip them again. Returns {name: "ok" | "restat"}."""
    root = Path(root)
    manifest = _read_manifest(root)
    if manifest is None:
        raise CacheError(f"{root}: no embedding cache here ({MANIFEST} missing)")
    status = {}
    for name, entry in manifest["encoders"].items():
        path = root / entry["file"]
        if not path.exists():
            raise CacheError(f"{path}: missing feature file")
        _check_file(path, entry, full=True)
        stat = path.stat()
        status[name] = "ok" if (entry.get("size"), entry.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns) \
            else "restat"
        entry.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    if "restat" in status.values():
        files.write_json(root / MANIFEST, manifest)
    return status


class CachedFeatures:
    """Read side: memory-mapped float16 features per encoder, checked against the manifest.

    verify: True re-hashes a file only when its size or mtime differs from the manifest;
    "full" re-hashes every file; False checks nothing but shapes.
    """

    def __init__(self, root: str | Path, names: Iterable[str] = (), verify: bool | str = True):
        if verify not in (True, False, "full"):
            raise ValueError(f"verify: expected True, False or 'full', got {verify!r}")
        self.root = Path(root)
        manifest = _read_manifest(self.root)
        if manifest is None:
            raise CacheError(f"{self.root}: no embedding cache here ({MANIFEST} missing); run scripts/embed.py")
        self.manifest = manifest
        self.count = manifest["count"]
        self.verify = verify
        self.arrays: dict[str, np.ndarray] = {}
        for name in names:
            self.arrays[name] = self._open(name)

    def _open(self, name: str) -> np.ndarray:
        key = cached_name(self.manifest, name)
        entry = self.manifest["encoders"][key] if key else None
        if entry is None:
            raise CacheError(f"{self.root}/{MANIFEST}: no features for '{name}' "
                             f"(cached: {sorted(self.manifest['encoders'])}); run scripts/embed.py with it")
        path = self.root / entry["file"]
        if not path.exists():
            raise CacheError(f"{path}: missing feature file")
        if self.verify:
            _check_file(path, entry, full=self.verify == "full")
        array = np.load(path, mmap_mode="r")
        rows = self.caption_rows if is_text(key) else self.count
        if array.shape[0] != rows:
            raise CacheError(f"{path}: {array.shape[0]} rows but the manifest says {rows}")
        return array

    @property
    def caption_rows(self) -> int:
        return int(self.manifest.get("caption_count", self.count))

    def caption_counts(self) -> np.ndarray:
        """Captions per image (int64 [count]); ones for a cache with one caption per image."""
        if CAPTION_COUNTS not in self.manifest["encoders"]:
            return np.ones(self.count, np.int64)
        return np.asarray(self[CAPTION_COUNTS], np.int64)

    def width(self, name: str) -> int:
        return int(self.manifest["encoders"][cached_name(self.manifest, name)]["width"])

    def keys(self) -> list[str]:
        return json.loads((self.root / "keys.json").read_text())

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            self.arrays[name] = self._open(name)
        return self.arrays[name]


def open_training_cache(cfg, names: list[str]) -> CachedFeatures:
    """A run's training features (cfg.cache_path) for image encoders `names` and the captions of every text
    encoder of the run (cfg.texts); a text encoder the cache lacks is named in the error."""
    cache = CachedFeatures(cfg.cache_path, list(names) + [text_key(t) for t in cfg.texts])
    unnamed = cache.manifest.get("text_encoder") in (None, "") and TEXT in cache.manifest["encoders"]
    if unnamed and len(cfg.texts) > 1 and any(cached_name(cache.manifest, text_key(t)) == TEXT for t in cfg.texts):
        raise CacheError(f"{cfg.cache_path}/{MANIFEST}: its one `text` array names no text encoder, so it cannot "
                         f"stand for one of several ({cfg.texts}); embed the captions again")
    return cache
