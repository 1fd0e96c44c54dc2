"""What a budgeted search embeds, and nothing twice: the held-out SEARCH samples its decisions are scored on (the
first `val` samples of the training data), then training samples after them, each encoder only as far as a search
asks for it.

Features live in pieces, one cache per sample range (`<cache_root>/search/<val>_<captions>/<start>_<stop>/`), each
built by the embedding pass (resumable, split over ranks) for the encoders asked for; a later, longer request embeds
only the range it adds. A piece's manifest says which encoders computed which rows, so the cost is counted from disk
(`embedding_cost`) and survives a resumed search. When the full training cache already holds an encoder (same
identity: weights, preprocessing, model files), its rows are copied instead of computed again (benchmarks that also
ran the grid search); the cost charged is the same.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from hnet import files
from hnet.config import Config
from hnet.data.cache import CAPTION_COUNTS, CachedFeatures, caption_offsets, is_text, write_cache
from hnet.data.embed import build_cache
from hnet.data.sources import prepare_shards, range_units
from hnet.files import MANIFEST
from hnet.flops import record_cache_flops
from hnet.models.encoders import EncoderSpec, text_key
from hnet.models.identity import image_identity, text_identity

COPIED = "copied_from"  # manifest field of a piece whose rows were copied from the full cache


class SearchFeatures:
    def __init__(self, cfg: Config, accelerator, specs: list[EncoderSpec], texts: list[str], val: int,
                 captions: str):
        self.cfg, self.accelerator, self.val, self.first = cfg, accelerator, val, captions == "first"
        self.specs, self.texts = {s.name: s for s in specs}, list(texts)
        self.root = cfg.cache_root / "search" / f"val{val}_{captions}"
        with accelerator.main_process_first():
            self.pattern = prepare_shards(cfg)
        self.full = _full_cache(cfg, specs, texts)

    def piece(self, start: int, stop: int, images: list[str], texts: list[str]) -> Path:
        """Features of samples start..stop-1 (positions in the training data) for these encoders."""
        root = self.root / f"{start}_{stop}"
        if self.full is not None and stop <= self.full.count:
            if self.accelerator.is_main_process:
                self._copy(root, start, stop, images, texts)
        else:
            units = range_units(self.pattern, start, stop, self.first)
            stats = build_cache(root, units, [self.specs[n] for n in images], texts,
                                batch_size=self.cfg.data.embed_batch_size, num_workers=self.cfg.data.num_workers,
                                accelerator=self.accelerator)
            if self.accelerator.is_main_process:
                record_cache_flops(root, stats["manifest"], units, images, texts)
        self.accelerator.wait_for_everyone()
        return root

    def _copy(self, root: Path, start: int, stop: int, images: list[str], texts: list[str]) -> None:
        names = images + [text_key(t) for t in texts]
        manifest = files.read_json(root / MANIFEST) if (root / MANIFEST).exists() else {"encoders": {}}
        have = [n for n in manifest["encoders"] if n != CAPTION_COUNTS]
        if set(names) <= set(have):
            return
        names = have + [n for n in names if n not in have]  # a piece is rewritten whole, with every encoder it had
        copy_range(self.full, root, start, stop, names, self.first, {COPIED: str(self.full.root)})

    @staticmethod
    def describe(piece: Path) -> dict:
        """Widths and FLOPs per sample (per caption for text encoders) of a piece's encoders."""
        cache = CachedFeatures(piece)
        names = [n for n in cache.manifest["encoders"] if n != CAPTION_COUNTS]
        return {"widths": {n: cache.width(n) for n in names}, "per_sample": cache.manifest["flops_per_sample"]}

    def training_cache(self, name: str, pieces: list[Path], images: list[str], texts: list[str]) -> Path:
        """One cache of the pieces' samples (in order) for these encoders: what a rung's run trains on."""
        root = self.root / "rungs" / name
        if self.accelerator.is_main_process and not (root / MANIFEST).exists():
            caches = [CachedFeatures(p) for p in pieces]
            names = images + [text_key(t) for t in texts]
            shutil.rmtree(root, ignore_errors=True)
            write_cache(root, [k for c in caches for k in c.keys()], {n: (c[n] for c in caches) for n in names},
                        caption_counts=np.concatenate([c.caption_counts() for c in caches]))
            per_sample = caches[0].manifest["flops_per_sample"]
            manifest = files.read_json(root / MANIFEST)
            files.write_json(root / MANIFEST, manifest | {"flops_per_sample": {n: per_sample[n] for n in names}})
        self.accelerator.wait_for_everyone()
        return root


def embedding_cost(root: Path, asked: list[dict]) -> dict:
    """FLOPs of the forwards a search asked for: `asked` = [{piece: "START_STOP", names: [...]}] under `root` (a
    SearchFeatures root); per encoder, the rows (images; captions for text encoders) and their FLOPs. A (piece,
    encoder) asked for twice is one computation, charged once; a sample range asked twice by one encoder is refused
    (it would have been embedded twice)."""
    out: dict[str, dict] = {}
    seen: dict[str, list[tuple[int, int]]] = {}
    for request in asked:
        manifest = files.read_json(root / request["piece"] / MANIFEST)
        start, stop = map(int, request["piece"].split("_"))
        for name in request["names"]:
            ranges = seen.setdefault(name, [])
            if (start, stop) in ranges:
                continue
            if any(a < stop and start < b for a, b in ranges):
                raise ValueError(f"{root}: '{name}' asked for samples {start}..{stop - 1} that overlap {ranges}")
            ranges.append((start, stop))
            rows = int(manifest["encoders"][name]["count"])
            spent = out.setdefault(name, {"rows": 0, "flops": 0.0})
            spent["rows"] += rows
            spent["flops"] += rows * manifest["flops_per_sample"][name]
    return out


def copy_range(full: CachedFeatures, root: Path, start: int, stop: int, names: list[str], first: bool = False,
               extra: dict | None = None) -> None:
    """A cache at `root` of samples start..stop-1 of `full` for encoders `names` (text: every caption of those
    images, or the first when `first`), keeping each encoder's identity and FLOPs per sample."""
    counts = full.caption_counts()[start:stop]
    offsets = caption_offsets(full.caption_counts())
    rows = offsets[start:stop] if first else np.arange(offsets[start], offsets[start] + counts.sum())
    arrays = {n: np.asarray(full[n][rows] if is_text(n) else full[n][start:stop]) for n in names}
    written = write_cache(root, full.keys()[start:stop], arrays,
                          caption_counts=np.ones_like(counts) if first else counts)
    for name in names:
        written["encoders"][name]["identity"] = full.manifest["encoders"][name].get("identity")
    per_sample = full.manifest["flops_per_sample"]
    files.write_json(root / MANIFEST, written | (extra or {}) | {"flops_per_sample": {n: per_sample[n] for n in names}})


def _full_cache(cfg: Config, specs: list[EncoderSpec], texts: list[str]) -> CachedFeatures | None:
    """The full training cache when it holds every encoder of the search as configured now; else None."""
    if not (cfg.cache_root / MANIFEST).exists():
        return None
    cache = CachedFeatures(cfg.cache_root)
    entries = cache.manifest["encoders"]
    wanted = {s.name: image_identity(s) for s in specs} | {text_key(t): text_identity(t) for t in texts}
    if all(n in entries and entries[n].get("identity") == identity for n, identity in wanted.items()):
        return cache
    return None
