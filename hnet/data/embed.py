"""The embedding pass: one pass over the data computes every encoder's features into the cache (hnet/cache.py).

Each image is decoded once; encoders whose timm data configs are identical share one transform (one tensor per
group, not per encoder), and worker items are bounded in bytes, so memory in flight stays bounded whatever the zoo.
Units (shards, or chunks of an image folder) are written atomically with a `done.json` marker: a killed pass
resumes at the first unfinished unit. Under `accelerate launch` ranks embed disjoint units; only rank 0 cleans
temp files and consolidates, behind barriers.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from hnet import files
from hnet.data.cache import CAPTION_COUNTS, Unit, _read_manifest, cached_name, consolidate
from hnet.files import MANIFEST, slug
from hnet.models.encoders import EncoderSpec, ImageEncoder, TextEncoder, text_key
from hnet.models.identity import identity_changes, identity_digest, image_identity, text_identity

# Transformed images one worker item may hold (a group larger than this on its own still goes whole, so the
# encoders see the same batches as before). See _UnitDataset for the bound this gives.
ITEM_BYTES = 256 << 20
PREFETCH = 2  # items queued per DataLoader worker


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
        if "caption" in batch[0]:  # every caption of every image, flat, and how many each image has
            captions = [s.get("captions") or [s["caption"]] for s in batch]
            out["captions"] = [c for caps in captions for c in caps]
            out["caption_counts"] = torch.tensor([len(caps) for caps in captions])
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


def _write_unit(folder: Path, buf: _UnitBuffer, names: list[str], skipped: int = 0,
                identities: dict[str, str] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        parts = buf.arrays.get(name, [])
        array = np.concatenate(parts) if parts else np.zeros((0, 0), np.float16)
        files.write_npy(folder / f"{slug(name)}.npy", array)
    files.write_json(folder / "done.json", {"keys": buf.keys, "names": names, "skipped": skipped,
                                            "identities": identities or {}})


def embed_pass(root: Path, units: list[Unit], encoders: dict[str, ImageEncoder], texts: dict[str, TextEncoder] | None,
               batch_size: int, num_workers: int, device: torch.device, rank: int = 0, world: int = 1,
               has_labels: bool = False, barrier: Callable[[], None] | None = None,
               item_bytes: int | None = ITEM_BYTES, identities: dict[str, str] | None = None) -> dict:
    """Compute features for this process's share of units into `root/parts`. Returns timing stats.

    `barrier` (accelerator.wait_for_everyone) is required when world > 1: rank 0 removes temp files left by a
    killed pass while every other rank waits, so no rank can delete a file another rank is writing.
    """
    texts = texts or {}
    names = list(encoders) + [text_key(t) for t in texts] + ([CAPTION_COUNTS] if texts else []) \
        + (["labels"] if has_labels else [])
    parts = root / "parts"
    _clean_temps(parts, rank, world, barrier)
    mine = units[rank::world]
    identities = identities or {}
    todo = [u for u in mine if not _unit_done(parts / u.name, names, identities)]
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
                _write_unit(parts / item["unit"], buffers.pop(item["unit"]), names, item["skipped"], identities)
                bar.update(1)
                continue
            _embed_item(item, buf, encoders, groups, texts, device)
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
        files.remove_stale_temps(parts)
    if barrier is not None:
        barrier()


def _embed_item(item: dict, buf: _UnitBuffer, encoders: dict[str, ImageEncoder], groups: dict[object, list[str]],
                texts: dict[str, TextEncoder], device: torch.device) -> None:
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
    if "captions" in item and texts:
        for name, text in texts.items():
            buf.add(text_key(name), text.encode(item["captions"]).half().numpy())
        buf.add(CAPTION_COUNTS, item["caption_counts"].numpy())
    if "labels" in item:
        buf.add("labels", item["labels"].numpy())


def _unit_done(folder: Path, names: list[str], identities: dict[str, str]) -> bool:
    """A unit an earlier (killed) pass finished for these encoders, the same ones (identities) as now (parts from
    before identities were recorded are taken as they are)."""
    done = folder / "done.json"
    if not done.exists():
        return False
    record = files.read_json(done)
    recorded = record.get("identities", {})
    return set(names) <= set(record["names"]) and all(recorded.get(n, d) == d for n, d in identities.items())


def build_cache(root: str | Path, units: list[Unit], specs: list[EncoderSpec], text_encoders: list[str] | None,
                batch_size: int = 64, num_workers: int = 0, accelerator=None, has_labels: bool = False) -> dict:
    """Embed whatever image encoders (`specs`) and text encoders (names; captions) the cache lacks over `units`, and
    again those whose cached features another encoder computed (their identity differs: weights, preprocessing,
    options, model files); resumable; safe under `accelerate launch`."""
    root = Path(root)
    device = accelerator.device if accelerator else torch.device("cpu")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    manifest = _read_manifest(root) or {"encoders": {}}
    identities = ({s.name: image_identity(s) for s in specs}
                  | {text_key(t): text_identity(t) for t in text_encoders or []})
    stale = _stale_entries(root, manifest, identities, rank == 0)
    missing = [s for s in specs if s.name not in manifest["encoders"] or s.name in stale]
    want_texts = [t for t in text_encoders or []
                  if cached_name(manifest, text_key(t)) is None or text_key(t) in stale]
    if not missing and not want_texts and (not has_labels or "labels" in manifest["encoders"]):
        return {"manifest": manifest, "samples": 0, "seconds": 0.0, "embedded": []}
    encoders = {s.name: ImageEncoder(s, device) for s in missing}
    if device.type == "cuda":  # convolutions run faster in NHWC on GPUs
        encoders = {n: e.to(memory_format=torch.channels_last) for n, e in encoders.items()}
    texts = {t: TextEncoder(t, device) for t in want_texts}
    has_labels = has_labels and "labels" not in manifest["encoders"]
    digests = {name: identity_digest(identities[name]) for name in [*encoders, *map(text_key, texts)]}
    stats = embed_pass(root, units, encoders, texts, batch_size, num_workers, device, rank, world, has_labels,
                       barrier=accelerator.wait_for_everyone if accelerator else None, identities=digests)
    if accelerator:
        accelerator.wait_for_everyone()
    widths = {n: e.width for n, e in encoders.items()}
    widths |= {text_key(t): text.width for t, text in texts.items()}
    if rank == 0:
        manifest = consolidate(root, units, widths, has_labels)
        for name in widths:  # what computed them, and how many processes (checked by the 2-rank tests)
            manifest["encoders"][name] |= {"identity": identities[name], "world": world}
        if texts:  # the caption index is written with the captions
            manifest["encoders"][CAPTION_COUNTS]["world"] = world
        files.write_json(root / MANIFEST, manifest)
    if accelerator:
        accelerator.wait_for_everyone()
    return {"manifest": _read_manifest(root), **stats, "embedded": [s.name for s in missing]}


def _stale_entries(root: Path, manifest: dict, identities: dict[str, dict], main: bool) -> set[str]:
    """Cached entries computed by another encoder than the configured one (named in a warning; they are embedded
    again). Entries from before identities were recorded are taken as they are and stamped with the current one."""
    stale, stamped = set(), False
    for name, identity in identities.items():
        entry = manifest["encoders"].get(cached_name(manifest, name) or name)
        if entry is None or identity.get("weights", "") is None:  # a weights file that is gone: nothing to check
            continue
        if "identity" not in entry:
            entry["identity"], stamped = identity, True
        elif entry["identity"] != identity:
            stale.add(name)
            if main:
                warnings.warn(f"{root}: cached features of '{name}' were computed by another encoder "
                              f"({', '.join(identity_changes(entry['identity'], identity))} changed); embedding again")
    if stamped and main:
        files.write_json(root / MANIFEST, manifest)
    return stale
