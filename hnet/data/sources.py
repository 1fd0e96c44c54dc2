"""From a config to the units the embedding pass reads: built-in data or CC-595k, always through shards."""
from __future__ import annotations

from functools import partial
from pathlib import Path

from hnet.config import Config, ConfigError
from hnet.data import demo
from hnet.data.cache import Unit
from hnet.data.shards import LAYOUT, expand_urls, iter_shard, make_shards
from hnet.files import MANIFEST, read_json


def demo_root(cfg: Config) -> Path:
    return Path(cfg.out_root) / "data" / f"demo_{cfg.data.demo_samples}_{cfg.data.demo_image_size}"


def prepare_shards(cfg: Config) -> str:
    """Return the shard pattern for cfg, building shards first when only 595k-layout data is given."""
    data = cfg.data
    if data.source == "demo":
        root = demo_root(cfg)
        meta = demo.write_595k(root / "595k", data.demo_samples, seed=cfg.train.seed, size=data.demo_image_size)
        return _shards_from_595k(meta, root / "595k" / "images", root / "shards", data.shard_size)
    if data.shards:
        return data.shards
    if data.metadata:
        if not data.images:
            raise ConfigError("data.images: required with data.metadata (the 595k images folder)")
        return _shards_from_595k(Path(data.metadata), Path(data.images), Path(cfg.out_root) / "data" / "shards",
                                 data.shard_size)
    raise ConfigError("data.shards: set data.shards (a brace pattern) or data.metadata + data.images")


def _shards_from_595k(meta: Path, images: Path, out: Path, shard_size: int) -> str:
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        manifest = read_json(manifest_path)
        if manifest.get("complete") and manifest.get("source") == str(meta) and manifest.get("layout") == LAYOUT:
            return manifest["pattern"]
    return make_shards(meta, images, out, shard_size)["pattern"]


def shard_units(pattern: str) -> list[Unit]:
    return [Unit(Path(url).stem, partial(iter_shard, url, report_bad=True)) for url in expand_urls(pattern)]


def _first_samples(units: list[Unit], count: int):
    """The units' samples in order until `count` good ones (bad ones pass through: the cache skips them)."""
    good = 0
    for unit in units:
        for sample in unit.samples():
            if good >= count:
                return
            good += "bad" not in sample
            yield sample


def first_samples_unit(units: list[Unit], count: int) -> Unit:
    """One unit holding exactly the first `count` samples of `units`: later shards are never opened."""
    return Unit(f"first_{count}", partial(_first_samples, units, count))


def _range_samples(units: list[Unit], start: int, stop: int, first_caption: bool):
    """Good samples number start..stop-1 of `units` (counting good ones; bad ones inside the range pass through),
    each with only its first caption when `first_caption`."""
    good = 0
    for unit in units:
        for sample in unit.samples():
            if good >= stop:
                return
            is_good = "bad" not in sample
            if good >= start:
                yield sample | {"captions": sample["captions"][:1]} if first_caption and is_good else sample
            good += is_good


def range_units(pattern: str, start: int, stop: int, first_caption: bool = False) -> list[Unit]:
    """Samples start..stop-1 of a shard set as units the embedding pass can split over ranks, one per shard they
    touch (shards wholly before `start` are never opened when the shards' manifest gives their counts); without a
    manifest, one unit reading the shards in order. `first_caption`: only each image's first caption is embedded."""
    units = shard_units(pattern)
    counts = _shard_counts(pattern)
    if any(u.name not in counts for u in units):
        return [Unit(f"range_{start}_{stop}", partial(_range_samples, units, start, stop, first_caption))]
    out, offset = [], 0
    for unit in units:
        low, high = max(start, offset), min(stop, offset + counts[unit.name])
        if low < high:
            out.append(Unit(f"{unit.name}_{low - offset}_{high - offset}",
                            partial(_range_samples, [unit], low - offset, high - offset, first_caption)))
        offset += counts[unit.name]
    return out


def _shard_counts(pattern: str) -> dict[str, int]:
    manifest = Path(expand_urls(pattern)[0]).parent / MANIFEST
    return {Path(s["name"]).stem: s["count"] for s in read_json(manifest).get("shards", [])} \
        if manifest.exists() else {}


def first_samples_units(pattern: str, count: int) -> list[Unit]:
    """The first `count` samples of a shard set as units the embedding pass can split over ranks: the whole shards
    they fill (counts from the shards' manifest.json, written by make_shards) plus one cut shard. Without a
    manifest, one unit reading the shards in order."""
    units = shard_units(pattern)
    counts = _shard_counts(pattern)
    if any(u.name not in counts for u in units):
        return [first_samples_unit(units, count)]
    whole, left = [], count
    for unit in units:
        if left <= 0:
            break
        if counts[unit.name] <= left:
            whole.append(unit)
        else:
            whole.append(Unit(f"{unit.name}_first{left}", partial(_first_samples, [unit], left)))
        left -= counts[unit.name]
    return whole


def built_shards(cfg: Config) -> tuple[str, str]:
    """(pattern, "") of the shards cfg's training data was read from when they exist, else ("", why not); never
    builds them (what evaluation reads the training captions from)."""
    data = cfg.data
    if data.shards:
        return data.shards, ""
    if data.source == "demo":
        out, source = demo_root(cfg) / "shards", None
    elif data.metadata:
        out, source = Path(cfg.out_root) / "data" / "shards", str(data.metadata)
    else:
        return "", "data.shards / data.metadata: not set, so the run names no training captions"
    manifest = read_json(out / MANIFEST) if (out / MANIFEST).exists() else {}
    if not manifest.get("complete") or (source is not None and manifest.get("source") != source):
        return "", f"{out / MANIFEST}: no complete shard set of the training data there"
    return manifest["pattern"], ""
