"""Embedding cache: one pass over the data computes every encoder's features; readers memory-map them.

Layout of a cache folder:
    manifest.json        encoders {name: width, file, sha256}, text, keys_sha256, count, units done
    keys.json            sample keys in cache order (shard order, then file order)
    <slug>.f16.npy       float16 [count, width] per image encoder (np.load(..., mmap_mode="r"))
    text.f16.npy         the text encoder's caption embeddings (training caches)
    labels.npy           int64 class labels (zero-shot caches)
    parts/<unit>/        per-unit results of an unfinished pass (resume point), removed once consolidated

Each unit (a shard, or a chunk of an image folder) is written atomically with a `done.json` marker, so a killed
pass resumes at the first unfinished unit and gives the same arrays as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
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


class CacheError(ValueError):
    """Cache missing, incomplete, corrupted or not matching the config; the message names the file."""


@dataclass
class Unit:
    """A piece of the data processed and saved as a whole: a shard, or a chunk of an image folder."""
    name: str
    samples: Callable[[], Iterator[dict]]  # yields {key, image: PIL, caption | label}


def keys_digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


class _UnitDataset(IterableDataset):
    """Decodes each image once, transforms it for every encoder; yields batches then an end-of-unit marker."""

    def __init__(self, units: list[Unit], transforms: dict[str, Callable], batch_size: int):
        self.units, self.transforms, self.batch_size = units, transforms, batch_size

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
                    yield self._collate(unit.name, batch)
                    batch = []
            if batch:
                yield self._collate(unit.name, batch)
            yield {"unit": unit.name, "end": True, "skipped": bad}

    def _collate(self, unit: str, batch: list[dict]) -> dict:
        out = {"unit": unit, "end": False, "keys": [s["key"] for s in batch],
               "images": {name: torch.stack([t(s["image"]) for s in batch]) for name, t in self.transforms.items()}}
        if "caption" in batch[0]:
            out["captions"] = [s["caption"] for s in batch]
        if "label" in batch[0]:
            out["labels"] = torch.tensor([s["label"] for s in batch])
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
               has_labels: bool = False) -> dict:
    """Compute features for this process's share of units into `root/parts`. Returns timing stats."""
    names = list(encoders) + ([TEXT] if text else []) + (["labels"] if has_labels else [])
    parts = root / "parts"
    io.remove_stale_temps(parts)
    mine = units[rank::world]
    todo = [u for u in mine if not _unit_done(parts / u.name, names)]
    stats = {"units": len(mine), "units_resumed": len(mine) - len(todo), "samples": 0, "seconds": 0.0}
    if not todo:
        return stats
    dataset = _UnitDataset(todo, {n: e.transform for n, e in encoders.items()}, batch_size)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    buffers: dict[str, _UnitBuffer] = {}
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"embed (rank {rank})", unit="unit", disable=rank != 0)
    with torch.no_grad():
        for item in loader:
            buf = buffers.setdefault(item["unit"], _UnitBuffer())
            if item["end"]:
                _write_unit(parts / item["unit"], buffers.pop(item["unit"]), names,
                            item["skipped"])
                bar.update(1)
                continue
            buf.keys.extend(item["keys"])
            for name, enc in encoders.items():
                with _autocast(device):
                    images = item["images"][name].to(device, non_blocking=True)
                    if device.type == "cuda":
                        images = images.contiguous(memory_format=torch.channels_last)
                    feats = enc(images)
                buf.add(name, feats.half().cpu().numpy())
            if text is not None:
                buf.add(TEXT, text.encode(item["captions"]).half().numpy())
            if "labels" in item:
                buf.add("labels", item["labels"].numpy())
            stats["samples"] += len(item["keys"])
            bar.set_postfix(samples_s=f"{stats['samples'] / (time.perf_counter() - start):.0f}")
    bar.close()
    stats["seconds"] = time.perf_counter() - start
    return stats


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
    file = root / f"{slug(name)}.{'i64' if name == 'labels' else 'f16'}.npy"
    dtype = np.int64 if name == "labels" else np.float16
    shape = (count,) if name == "labels" else (count, width)
    with io.atomic_path(file) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        row = 0
        for u in units:
            part = np.load(parts / u.name / f"{slug(name)}.npy")
            if len(part):
                out[row:row + len(part)] = part
            row += len(part)
        assert row == count, f"{name}: {row} rows != {count} keys"
        out.flush()
        del out
    return {"file": file.name, "width": width, "dtype": np.dtype(dtype).name, "count": count,
            "sha256": io.sha256_file(file)}


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
    stats = embed_pass(root, units, encoders, text, batch_size, num_workers, device, rank, world, has_labels)
    if accelerator:
        accelerator.wait_for_everyone()
    widths = {n: e.width for n, e in encoders.items()}
    if text:
        widths[TEXT] = text.width
    if rank == 0:
        manifest = consolidate(root, units, widths, has_labels)
        manifest.setdefault("text_encoder", text_encoder)
        io.write_json(root / MANIFEST, manifest)
    if accelerator:
        accelerator.wait_for_everyone()
    return {"manifest": _read_manifest(root), **stats, "embedded": [s.name for s in missing]}


def write_cache(root: str | Path, keys: list[str], arrays: dict[str, np.ndarray],
                text_encoder: str | None = None) -> dict:
    """Write ready-made feature arrays as a cache (synthetic data for tests and benchmarks)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"count": len(keys), "keys_sha256": keys_digest(keys), "encoders": {}, "text_encoder": text_encoder}
    for name, array in arrays.items():
        if len(array) != len(keys):
            raise CacheError(f"{root}: '{name}' has {len(array)} rows for {len(keys)} keys")
        file = root / f"{slug(name)}.f16.npy"
        io.write_npy(file, np.asarray(array, np.float16))
        manifest["encoders"][name] = {"file": file.name, "width": int(array.shape[1]), "dtype": "float16",
                                      "count": len(keys), "sha256": io.sha256_file(file)}
    io.write_json(root / "keys.json", keys)
    io.write_json(root / MANIFEST, manifest)
    return manifest


class CachedFeatures:
    """Read side: memory-mapped float16 features per encoder, checked against the manifest."""

    def __init__(self, root: str | Path, names: Iterable[str] = (), verify: bool = True):
        self.root = Path(root)
        manifest = _read_manifest(self.root)
        if manifest is None:
            raise CacheError(f"{self.root}: no embedding cache here ({MANIFEST} missing); run scripts/embed.py")
        self.manifest = manifest
        self.count = manifest["count"]
        self.arrays: dict[str, np.ndarray] = {}
        for name in names:
            self.arrays[name] = self._open(name, verify)

    def _open(self, name: str, verify: bool) -> np.ndarray:
        entry = self.manifest["encoders"].get(name)
        if entry is None:
            raise CacheError(f"{self.root}/{MANIFEST}: no features for '{name}' "
                             f"(cached: {sorted(self.manifest['encoders'])}); run scripts/embed.py with it")
        path = self.root / entry["file"]
        if not path.exists():
            raise CacheError(f"{path}: missing feature file")
        if verify and io.sha256_file(path) != entry["sha256"]:
            raise CacheError(f"{path}: checksum mismatch, the file is corrupted; delete it and re-run embed")
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
            self.arrays[name] = self._open(name, verify=True)
        return self.arrays[name]
