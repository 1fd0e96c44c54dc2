"""Embedding cache: one pass over the data computes every encoder's features; readers memory-map them.

Layout of a cache folder:
    manifest.json        encoders {name: file, width, dtype, count, sha256, size, mtime_ns}, text, keys_sha256,
                         count, units done
    keys.json            sample keys in cache order (shard order, then file order)
    <slug>.f16.npy       float16 [count, width] per image encoder (np.load(..., mmap_mode="r"))
    text.f16.npy         the text encoder's caption embeddings (training caches)
    labels.npy           int64 class labels (zero-shot caches)
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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from hnet import io
from hnet.io import slug
from hnet.zoo import EncoderSpec, ImageEncoder, TextEncoder

MANIFEST = "manifest.json"
TEXT = "text"
# Transformed images one worker item may hold (a group larger than this on its own still goes whole, so the
# encoders see the same batches as before). See _UnitDataset for the bound this gives.
ITEM_BYTES = 256 << 20
PREFETCH = 2  # items queued per DataLoader worker


class CacheError(ValueError):
    """Cache missing, incomplete, corrupted or not matching the config; the message names the file."""


@dataclass
class Unit:
    """A piece of the data processed and saved as a whole: a shard, or a chunk of an image folder."""
    name: str
    samples: Callable[[], Iterator[dict]]  # yields {key, image: PIL, caption | label}


def keys_digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def transform_key(encoder) -> object:
    """Encoders with equal keys have identical transforms: timm builds the eval transform from the data config
    alone (input size, interpolation, mean, std, crop pct, crop mode)."""
    config = getattr(encoder, "data_config", None)
    if config is None:
        return id(encoder.transform)
    return tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.items()))


def transform_groups(encoders: dict) -> tuple[dict[object, Callable], dict[object, list[str]]]:
    """One transform per distinct data config, and the encoders that share it."""
    transforms: dict[object, Callable] = {}
    members: dict[object, list[str]] = {}
    for name, enc in encoders.items():
        key = transform_key(enc)
        transforms.setdefault(key, enc.transform)
        members.setdefault(key, []).append(name)
    return transforms, members


class _UnitDataset(IterableDataset):
    """Decodes each image once and runs each distinct transform once per image; yields items, then an
    end-of-unit marker per unit.

    A batch goes out as several items, each holding the transformed batch of a few transform groups, at most
    `item_bytes` of them unless one group alone is larger (a group is never split, so every encoder sees the
    whole batch). A worker builds one item at a time and DataLoader queues `prefetch_factor` per worker, so the
    transformed bytes in flight are at most num_workers x (prefetch_factor + 1) x
    max(item_bytes, batch_size x largest per-image group size). The first item of a batch carries its keys,
    captions and labels. `item_bytes=None` sends each batch as one item.
    """

    def __init__(self, units: list[Unit], transforms: dict[object, Callable], batch_size: int,
                 item_bytes: int | None = ITEM_BYTES):
        self.units, self.transforms, self.batch_size, self.item_bytes = units, transforms, batch_size, item_bytes

    def __iter__(self):
        info = get_worker_info()
        units = self.units[info.id::info.num_workers] if info else self.units
        for unit in units:
            batch: list[dict] = []
            bad = 0
            for sample in unit.samples():
                if "bad" in sample:  # already warned about by the reader, counted here
                    bad += 1
                    continue
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield from self._items(unit.name, batch)
                    batch = []
            if batch:
                yield from self._items(unit.name, batch)
            yield {"unit": unit.name, "end": True, "skipped": bad}

    def _items(self, unit: str, batch: list[dict]) -> Iterator[dict]:
        item = self._header(unit, batch)
        held = 0
        for key, transform in self.transforms.items():
            first = transform(batch[0]["image"])
            size = first.nbytes * len(batch)
            # hand over what is held before building the next group, so the worker never holds both
            if item["images"] and self.item_bytes is not None and held + size > self.item_bytes:
                yield item
                item, held = {"unit": unit, "end": False, "images": {}}, 0
            item["images"][key] = _fill(transform, first, batch)
            held += size
        yield item

    @staticmethod
    def _header(unit: str, batch: list[dict]) -> dict:
        out = {"unit": unit, "end": False, "keys": [s["key"] for s in batch], "images": {}}
        if "caption" in batch[0]:
            out["captions"] = [s["caption"] for s in batch]
        if "label" in batch[0]:
            out["labels"] = torch.tensor([s["label"] for s in batch])
        return out


def _fill(transform: Callable, first: torch.Tensor, batch: list[dict]) -> torch.Tensor:
    """The batch tensor filled in place: no list of per-image tensors next to a stacked copy."""
    out = torch.empty((len(batch), *first.shape), dtype=first.dtype)
    out[0] = first
    for i, sample in enumerate(batch[1:], start=1):
        out[i] = transform(sample["image"])
    return out


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


class _UnitBuffer:
    def __init__(self):
        self.keys: list[str] = []
        self.arrays: dict[str, list[np.ndarray]] = {}

    def add(self, name: str, array: np.ndarray) -> None:
        self.arrays.setdefault(name, []).append(array)


def _write_unit(folder: Path, buf: _UnitBuffer, names: list[str], skipped: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        parts = buf.arrays.get(name, [])
        array = np.concatenate(parts) if parts else np.zeros((0, 0), np.float16)
        io.write_npy(folder / f"{slug(name)}.npy", array)
    io.write_json(folder / "done.json", {"keys": buf.keys, "names": names, "skipped": skipped})


def embed_pass(root: Path, units: list[Unit], encoders: dict[str, ImageEncoder], text: TextEncoder | None,
               batch_size: int, num_workers: int, device: torch.device, rank: int = 0, world: int = 1,
               has_labels: bool = False, barrier: Callable[[], None] | None = None,
               item_bytes: int | None = ITEM_BYTES) -> dict:
    """Compute features for this process's share of units into `root/parts`. Returns timing stats.

    `barrier` (accelerator.wait_for_everyone) is required when world > 1: rank 0 removes temp files left by a
    killed pass while every other rank waits, so no rank can delete a file another rank is writing.
    """
    names = list(encoders) + ([TEXT] if text else []) + (["labels"] if has_labels else [])
    parts = root / "parts"
    _clean_temps(parts, rank, world, barrier)
    mine = units[rank::world]
    todo = [u for u in mine if not _unit_done(parts / u.name, names)]
    stats = {"units": len(mine), "units_resumed": len(mine) - len(todo), "samples": 0, "seconds": 0.0}
    if not todo:
        return stats
    transforms, groups = transform_groups(encoders)
    dataset = _UnitDataset(todo, transforms, batch_size, item_bytes)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=False, prefetch_factor=PREFETCH if num_workers else None)
    buffers: dict[str, _UnitBuffer] = {}
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"embed (rank {rank})", unit="unit", disable=rank != 0)
    with torch.no_grad():
        for item in loader:
            buf = buffers.setdefault(item["unit"], _UnitBuffer())
            if item["end"]:
                _write_unit(parts / item["unit"], buffers.pop(item["unit"]), names, item["skipped"])
                bar.update(1)
                continue
            _embed_item(item, buf, encoders, groups, text, device)
            if "keys" in item:
                stats["samples"] += len(item["keys"])
            bar.set_postfix(samples_s=f"{stats['samples'] / (time.perf_counter() - start):.0f}")
    bar.close()
    stats["seconds"] = time.perf_counter() - start
    return stats


def _clean_temps(parts: Path, rank: int, world: int, barrier: Callable[[], None] | None) -> None:
    if world > 1 and barrier is None:
        raise ValueError("embed_pass: world > 1 needs a barrier (accelerator.wait_for_everyone)")
    if rank == 0:
        io.remove_stale_temps(parts)
    if barrier is not None:
        barrier()


def _embed_item(item: dict, buf: _UnitBuffer, encoders: dict[str, ImageEncoder], groups: dict[object, list[str]],
                text: TextEncoder | None, device: torch.device) -> None:
    if "keys" in item:
        buf.keys.extend(item["keys"])
    for key, images in item["images"].items():
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        for name in groups[key]:
            with _autocast(device):
                feats = encoders[name](images)
            buf.add(name, feats.half().cpu().numpy())
    if text is not None and "captions" in item:
        buf.add(TEXT, text.encode(item["captions"]).half().numpy())
    if "labels" in item:
        buf.add("labels", item["labels"].numpy())


def _unit_done(folder: Path, names: list[str]) -> bool:
    done = folder / "done.json"
    return done.exists() and set(names) <= set(io.read_json(done)["names"])


def consolidate(root: Path, units: list[Unit], widths: dict[str, int], has_labels: bool) -> dict:
    """Concatenate the per-unit parts (in unit order) into one float16 array per encoder; write the manifest."""
    parts = root / "parts"
    keys: list[str] = []
    skipped: dict[str, int] = {}
    for u in units:
        done = parts / u.name / "done.json"
        if not done.exists():
            raise CacheError(f"{root}: unit {u.name} has not been embedded (missing {done})")
        record = io.read_json(done)
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
    for name, width in arrays.items():
        manifest["encoders"][name] = _concat_parts(root, parts, units, name, width, len(keys))
    manifest["units"] = [u.name for u in units]
    manifest["skipped_samples"] = skipped  # bad samples the reader skipped, per unit
    io.write_json(root / "keys.json", keys)
    io.write_json(root / MANIFEST, manifest)
    shutil.rmtree(parts, ignore_errors=True)
    return manifest


def _concat_parts(root: Path, parts: Path, units: list[Unit], name: str, width: int, count: int) -> dict:
    labels = name == "labels"
    file = root / f"{slug(name)}.{'i64' if labels else 'f16'}.npy"
    chunks = (np.load(parts / u.name / f"{slug(name)}.npy") for u in units)
    return write_array(file, (c for c in chunks if len(c)), np.int64 if labels else np.float16,
                       (count,) if labels else (count, width))


def write_array(file: Path, chunks: Iterable[np.ndarray], dtype, shape: tuple[int, ...]) -> dict:
    """Write row chunks as one .npy file (atomically, never holding the whole array) and return its manifest
    entry; the sha256 is taken from the bytes as they are written, so the file is never read back."""
    dtype = np.dtype(dtype)
    header = _bytes_io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                  "fortran_order": False, "shape": tuple(shape)})
    digest = hashlib.sha256(header.getvalue())
    rows = 0
    with io.atomic_path(file) as tmp, open(tmp, "wb") as fh:
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
    return io.read_json(path) if path.exists() else None


def build_cache(root: str | Path, units: list[Unit], specs: list[EncoderSpec], text_encoder: str | None,
                batch_size: int = 64, num_workers: int = 0, accelerator=None, has_labels: bool = False) -> dict:
    """Embed whatever `specs`/text the cache lacks over `units`; resumable; safe under `accelerate launch`."""
    root = Path(root)
    device = accelerator.device if accelerator else torch.device("cpu")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    manifest = _read_manifest(root) or {"encoders": {}}
    missing = [s for s in specs if s.name not in manifest["encoders"]]
    want_text = bool(text_encoder) and TEXT not in manifest["encoders"]
    if not missing and not want_text and (not has_labels or "labels" in manifest["encoders"]):
        return {"manifest": manifest, "samples": 0, "seconds": 0.0, "embedded": []}
    encoders = {s.name: ImageEncoder(s, device) for s in missing}
    if device.type == "cuda":  # convolutions run faster in NHWC on GPUs
        encoders = {n: e.to(memory_format=torch.channels_last) for n, e in encoders.items()}
    text = TextEncoder(text_encoder, device) if want_text else None
    has_labels = has_labels and "labels" not in manifest["encoders"]
    stats = embed_pass(root, units, encoders, text, batch_size, num_workers, device, rank, world, has_labels,
                       barrier=accelerator.wait_for_everyone if accelerator else None)
    if accelerator:
        accelerator.wait_for_everyone()
    widths = {n: e.width for n, e in encoders.items()}
    if text:
        widths[TEXT] = text.width
    if rank == 0:
        manifest = consolidate(root, units, widths, has_labels)
        manifest.setdefault("text_encoder", text_encoder)
        for name in widths:  # how many processes computed these features (checked by the 2-rank tests)
            manifest["encoders"][name]["world"] = world
        io.write_json(root / MANIFEST, manifest)
    if accelerator:
        accelerator.wait_for_everyone()
    return {"manifest": _read_manifest(root), **stats, "embedded": [s.name for s in missing]}


def write_cache(root: str | Path, keys: list[str], arrays: dict[str, np.ndarray | Iterable[np.ndarray]],
                text_encoder: str | None = None) -> dict:
    """Write ready-made feature arrays as a cache (synthetic data for tests and benchmarks). A value is an array
    or an iterable of [rows, width] chunks, written as they come (for caches larger than memory)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"count": len(keys), "keys_sha256": keys_digest(keys), "encoders": {}, "text_encoder": text_encoder}
    for name, array in arrays.items():
        chunks = iter([array] if isinstance(array, np.ndarray) else array)
        first = next(chunks, None)
        if first is None:
            raise CacheError(f"{root}: '{name}' has no rows")
        manifest["encoders"][name] = write_array(root / f"{slug(name)}.f16.npy", itertools.chain([first], chunks),
                                                 np.float16, (len(keys), first.shape[1]))
    io.write_json(root / "keys.json", keys)
    io.write_json(root / MANIFEST, manifest)
    return manifest


def _check_file(path: Path, entry: dict, full: bool) -> None:
    """Raise if the file's bytes differ from the manifest; re-hash only when asked or when size/mtime moved."""
    stat = path.stat()
    if not full and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return
    if io.sha256_file(path) != entry["sha256"]:
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
        io.write_json(root / MANIFEST, manifest)
    return status


class CachedFeatures:
    """Read side: memory-mapped float16 features per encoder, checked against the manifest.

    verify: True (or "stat") re-hashes a file only when its size or mtime differs from the manifest;
    "full" re-hashes every file; False checks nothing but shapes.
    """

    def __init__(self, root: str | Path, names: Iterable[str] = (), verify: bool | str = True):
        if verify not in (True, False, "stat", "full"):
            raise ValueError(f"verify: expected True, False, 'stat' or 'full', got {verify!r}")
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
        entry = self.manifest["encoders"].get(name)
        if entry is None:
            raise CacheError(f"{self.root}/{MANIFEST}: no features for '{name}' "
                             f"(cached: {sorted(self.manifest['encoders'])}); run scripts/embed.py with it")
        path = self.root / entry["file"]
        if not path.exists():
            raise CacheError(f"{path}: missing feature file")
        if self.verify:
            _check_file(path, entry, full=self.verify == "full")
        array = np.load(path, mmap_mode="r")
        if array.shape[0] != self.count:
            raise CacheError(f"{path}: {array.shape[0]} rows but the manifest says {self.count}")
        return array

    def width(self, name: str) -> int:
        return int(self.manifest["encoders"][name]["width"])

    def keys(self) -> list[str]:
        return json.loads((self.root / "keys.json").read_text())

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            self.arrays[name] = self._open(name)
        return self.arrays[name]
