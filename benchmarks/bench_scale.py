"""Real-scale check of the cache and the training feed: a synthetic on-disk cache with the ie30 widths (10 x 384,
10 x 768, 10 x 1024, widths from timm) and a 384-d text array, `--samples` rows (595,375 = CC-595k).

- cache write (in chunks, never a whole array in memory) and cache open time (CachedFeatures over all 31 arrays,
  the stat check) against what the old open cost (sha256 of every file, from the measured hash speed)
- training through the real loop (hnet.train.loop.train, method=hypernet, B=--batch) with all 30 encoders and with
  k=4 of 30 (train.encoders_per_step): steps/s, data wait (time blocked in Prefetcher.get) as a share of the
  step, peak RSS above the RSS after opening the memmapped cache. RSS is read from /proc/self/status every 20 ms
  (RssAnon: heap, what grows if batches pile up; VmRSS: also the memmap's file pages touched, which the kernel
  can drop)
- embedding worker memory with the ie30 transforms: _UnitDataset (the DataLoader worker's code) over generated
  384x384 images, with transform grouping + the item byte budget, and without (one transform per encoder, one
  item per batch: the old behaviour); peak RSS (VmHWM, reset through /proc/self/clear_refs) above the RSS
  before iterating

Each part runs in a fresh process, so peaks do not leak between parts.

    python benchmarks/bench_scale.py [--samples 100000] [--root DIR] [--steps 12] [--batch 4096]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hnet import files  # noqa: E402
from hnet.data.cache import CachedFeatures, Unit, write_cache  # noqa: E402
from hnet.models.encoders import text_key  # noqa: E402
from hnet.provenance import stamp  # noqa: E402

TEXT = text_key("all-MiniLM-L6-v2")  # the configs' text encoder
from hnet.data.embed import ITEM_BYTES, _UnitDataset, transform_groups  # noqa: E402
from hnet.models.encoders import (  # noqa: E402
    EncoderSpec,
    ImageEncoder,
    image_encoder_width,
    read_encoder_list,
)

RESULTS = Path(__file__).parent / "results"
IE30 = "configs/encoders/ie30.yaml"
CONFIG = "configs/cc595k_ie30.yaml"
CC595K = 595_375
POOL = 65_536  # synthetic rows are drawn from a pool of random unit vectors per width (fast to generate)
CHUNK = 16_384


def ie30_specs() -> list[EncoderSpec]:
    return [EncoderSpec(s.name, s.model_name, s.options, "random") for s in read_encoder_list(IE30, "random")]


# ---------------------------------------------------------------- the synthetic cache

def _chunks(pool: np.ndarray, rows: int, seed: int):
    rng = np.random.default_rng(seed)
    for start in range(0, rows, CHUNK):
        yield pool[rng.integers(0, len(pool), min(CHUNK, rows - start))]


def write_synthetic(root: Path, samples: int) -> dict:
    """Write (or reuse) the cache; returns its size and the write time."""
    widths = {s.name: image_encoder_width(s) for s in ie30_specs()} | {TEXT: 384}
    manifest = root / "manifest.json"
    if manifest.exists() and files.read_json(manifest)["count"] == samples:
        return {"write_s": None, "reused": True, "widths": widths, "bytes": _bytes(root)}
    rng = np.random.default_rng(0)
    pools = {}
    for w in sorted(set(widths.values())):
        x = rng.standard_normal((POOL, w), dtype=np.float32)
        pools[w] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    start = time.perf_counter()
    write_cache(root, [f"{i:09d}" for i in range(samples)],
                {n: _chunks(pools[w], samples, seed) for seed, (n, w) in enumerate(widths.items())},
                "all-MiniLM-L6-v2")
    return {"write_s": time.perf_counter() - start, "reused": False, "widths": widths, "bytes": _bytes(root)}


def _bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.glob("*.npy"))


# ---------------------------------------------------------------- measurements (each in a child process)

class RssSampler(threading.Thread):
    """Peak RssAnon and VmRSS (MB) from /proc/self/status, sampled every 20 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0.0, "VmRSS": 0.0}
        self.stop = threading.Event()

    @staticmethod
    def read() -> dict[str, float]:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return {k: int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "VmRSS")}

    def run(self):
        while not self.stop.wait(0.02):
            for k, v in self.read().items():
                self.peak[k] = max(self.peak[k], v)


def child_open(root: str) -> dict:
    names = [s.name for s in ie30_specs()] + [TEXT]
    start = time.perf_counter()
    cache = CachedFeatures(root, names)
    open_s = time.perf_counter() - start
    biggest = max(names, key=lambda n: cache.manifest["encoders"][n]["size"])
    path = Path(root) / cache.manifest["encoders"][biggest]["file"]
    start = time.perf_counter()
    files.sha256_file(path)
    hash_mb_s = path.stat().st_size / 2**20 / (time.perf_counter() - start)
    total_mb = sum(e["size"] for e in cache.manifest["encoders"].values()) / 2**20
    return {"open_s": open_s, "sha256_mb_s": hash_mb_s, "rehash_all_s_estimate": total_mb / hash_mb_s}


def child_train(root: str, k: int, batch: int, steps: int) -> dict:
    import hnet.train.loop
    from hnet.config import load_config
    from hnet.data.features import Prefetcher

    feeds = []

    class Recorded(Prefetcher):  # the training loop's own Prefetcher, timing how long each get() blocks
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.waits, self.returned = [], []
            feeds.append(self)

        def get(self, micro_step):
            start = time.perf_counter()
            batch = super().get(micro_step)
            self.returned.append(time.perf_counter())
            self.waits.append(self.returned[-1] - start)
            return batch

    hnet.train.loop.Prefetcher = Recorded
    names = [s.name for s in ie30_specs()]
    CachedFeatures(root, names + [TEXT])  # what every run does first: the baseline
    base = RssSampler.read()
    sampler = RssSampler()
    sampler.start()
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(CONFIG, [
            f"out_root={out}", f"data.cache_dir={root}", "method=hypernet", "device=cpu", f"name=scale_k{k}",
            f"train.batch_size={batch}", f"train.max_steps={steps}", f"train.encoders_per_step={k}",
            "train.mixed_precision='no'", "train.warmup_steps=1", f"train.log_every={steps}",
            f"train.ckpt_every={10 * steps}"])
        start = time.perf_counter()
        hnet.train.loop.train(cfg)
        wall = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    feed = feeds[0]
    span = feed.returned[-1] - feed.returned[0]  # steps 1..n-1 and the waits of gets 2..n
    return {"k": k or 30, "batch": batch, "steps": steps, "wall_s": wall,
            "steps_per_s": (len(feed.returned) - 1) / span, "data_wait_share": sum(feed.waits[1:]) / span,
            "first_batch_s": feed.waits[0],
            "rss_anon_mb_after_open": base["RssAnon"], "vm_rss_mb_after_open": base["VmRSS"],
            "peak_rss_anon_above_open_mb": sampler.peak["RssAnon"] - base["RssAnon"],
            "peak_vm_rss_above_open_mb": sampler.peak["VmRSS"] - base["VmRSS"]}


def _images(n: int, size: int):
    from hnet.data import demo

    rng = np.random.default_rng(0)
    for i in range(n):
        image, attrs = demo.render(rng, size)
        yield {"key": f"{i:06d}", "image": image, "caption": f"a {attrs['colour']} {attrs['shape']}"}


def child_embed(grouped: bool, batch: int, images: int, size: int) -> dict:
    import timm

    with torch.device("meta"):  # the data config needs no weights
        encoders = {s.name: ImageEncoder(s, "meta") for s in ie30_specs()}
    for enc in encoders.values():  # built as ImageEncoder builds it, off the meta device (Normalize's tensors)
        enc.transform = timm.data.create_transform(**enc.data_config, is_training=False)
    transforms, groups = transform_groups(encoders)
    if not grouped:
        transforms = {n: e.transform for n, e in encoders.items()}
    per_image = {key: 4 * int(np.prod(encoders[names[0]].input_size)) for key, names in groups.items()}
    ungrouped_bytes = sum(4 * int(np.prod(e.input_size)) for e in encoders.values())
    dataset = _UnitDataset([Unit("u", lambda: _images(images, size))], transforms, batch,
                           ITEM_BYTES if grouped else None)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base = RssSampler.read()["VmRSS"]
    start = time.perf_counter()
    items = 0
    stream = iter(dataset)
    while (item := next(stream, None)) is not None:  # like a worker: an item is let go before the next is built
        items += not item["end"]
        del item
    return {"grouped": grouped, "batch": batch, "images": images, "image_size": size,
            "transforms": len(transforms), "items": items, "seconds": time.perf_counter() - start,
            "transformed_mb_per_image": (sum(per_image.values()) if grouped else ungrouped_bytes) / 2**20,
            "largest_group_mb_per_image": max(per_image.values()) / 2**20,
            "rss_mb_before": base, "peak_rss_mb": _hwm_mb(), "peak_rss_above_start_mb": _hwm_mb() - base}


def _hwm_mb() -> float:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmHWM"].split()[0]) / 1024


def child(name: str, *args) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", name, *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


CHILDREN = {"open": lambda root: child_open(root),
            "train": lambda root, k, batch, steps: child_train(root, int(k), int(batch), int(steps)),
            "embed": lambda grouped, batch, images, size: child_embed(grouped == "1", int(batch), int(images),
                                                                      int(size))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100_000, help=f"{CC595K} = CC-595k")
    parser.add_argument("--root", default="", help="cache folder (kept, reused); default a temp dir, removed")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--images", type=int, default=512, help="generated images for the embedding-worker part")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](*args.child[1:])))
        return {}
    root = Path(args.root or tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "samples": args.samples,
                  "cache": write_synthetic(root, args.samples)}
        result["open"] = child("open", root)
        result["train"] = [child("train", root, k, args.batch, args.steps) for k in (0, 4)]
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    result["embed_worker"] = [child("embed", 1, 256, args.images, args.image_size),
                              child("embed", 1, 64, args.images // 2, args.image_size),
                              child("embed", 0, 64, args.images // 2, args.image_size)]
    result["targets"] = targets(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    files.write_json(RESULTS / "bench_scale.json", stamp(result, vars(args)))
    print(json.dumps({"samples": args.samples, **result["targets"]}))
    return result


def targets(r: dict) -> dict:
    """The issue's bars (at 595,375 x ie30), with the measured value each is judged on."""
    train_peak = max(t["peak_rss_anon_above_open_mb"] for t in r["train"]) / 1024
    wait = max(t["data_wait_share"] for t in r["train"])
    worker = max(e["peak_rss_above_start_mb"] for e in r["embed_worker"] if e["grouped"]) / 1024
    return {"train_peak_rss_anon_gb": train_peak, "train_rss_ok": train_peak < 4,
            "data_wait_share": wait, "data_wait_ok": wait < 0.05,
            "open_s": r["open"]["open_s"], "open_ok": r["open"]["open_s"] < 10,
            "embed_worker_peak_gb": worker, "embed_worker_ok": worker < 2}


if __name__ == "__main__":
    main()
