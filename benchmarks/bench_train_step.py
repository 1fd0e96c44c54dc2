"""Training-step speed on cached features, measured side by side in one process (report ratios, not bare times).

- achieved FLOP/s of a full hypernetwork step (FLOPs from the ledger formulas / wall time) against a plain dense
  matmul of the same dtype and comparable size: `matmul_peak_ratio`
- the batched path (one bmm over N encoders) against a Python loop over encoders: `loop_speedup`
- step time vs number of encoders N and batch B (table + plot)
- data feeding: batch gather time from a memory-mapped fp16 cache as a share of step time, and RSS while
  streaming a large synthetic cache (memory must not grow with the data set)

    python benchmarks/bench_train_step.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hnet import files  # noqa: E402
from hnet.data.cache import CachedFeatures, write_cache  # noqa: E402
from hnet.models.encoders import text_key  # noqa: E402
from hnet.provenance import stamp  # noqa: E402

TEXT_ENCODER = "all-MiniLM-L6-v2"
from hnet.config import HypernetConfig  # noqa: E402
from hnet.data.features import FeatureBatches, Prefetcher  # noqa: E402
from hnet.flops import train_step_flops  # noqa: E402
from hnet.models.connectors import ConnectorShape, connector_forward  # noqa: E402
from hnet.models.losses import clip_loss, encoder_chunk, loss_and_surrogate  # noqa: E402
from hnet.models.stitch import StitchModel  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WIDTHS_10 = [384, 384, 384, 768, 768, 768, 1024, 1024, 1024, 1024]


def timed(fn, repeat: int, warmup: int = 1) -> float:
    """Median seconds of fn() over `repeat` runs after `warmup`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def make_step(method: str, widths: list[int], batch: int, text: int = 384, dtype=torch.float32):
    shape = ConnectorShape("linear", "image_to_text", max(widths), text)
    model = StitchModel(method, shape, widths, HypernetConfig()).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    n = len(widths)
    image = torch.zeros(n, batch, max(widths), dtype=dtype)
    for i, w in enumerate(widths):
        image[i, :, :w] = F.normalize(torch.randn(batch, w), dim=-1)
    txt = F.normalize(torch.randn(batch, text), dim=-1).to(dtype)
    index = torch.arange(n)

    def step():  # the training loop's path (hnet/train.py)
        a, b, scale = model(index, image, txt)
        _, surrogate = loss_and_surrogate(a, b, scale, encoder_chunk(batch))
        opt.zero_grad(set_to_none=True)
        surrogate.backward()
        opt.step()

    return step, train_step_flops(model, n, batch)["total"]


def looped_step(widths: list[int], batch: int, text: int = 384):
    """The same separate connectors, one encoder at a time (what batching replaces)."""
    weights = [torch.nn.Parameter(torch.randn(w, text) / w ** 0.5) for w in widths]
    biases = [torch.nn.Parameter(torch.zeros(text)) for _ in widths]
    opt = torch.optim.AdamW(weights + biases, lr=1e-3)
    images = [F.normalize(torch.randn(batch, w), dim=-1) for w in widths]
    txt = F.normalize(torch.randn(batch, text), dim=-1)
    scale = torch.tensor(14.3)

    def step():
        opt.zero_grad(set_to_none=True)
        for x, w, b in zip(images, weights, biases):
            a = F.normalize(connector_forward(x[None], [(w[None], b[None])]), dim=-1)
            clip_loss(a, txt, scale, gather=False).div(len(widths)).backward()
        opt.step()

    return step


def matmul_rate(batch: int, text: int, repeat: int) -> float:
    a, b = torch.randn(batch, text), torch.randn(text, batch)
    return 2 * batch * batch * text / timed(lambda: a @ b, repeat)


def rss_anon_mb() -> float:
    """Anonymous resident memory (heap): file-backed memmap pages are page cache, not training memory."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_cache(root: Path, rows: int, width: int, chunk: int = 100_000) -> None:
    """A rows x width fp16 cache written chunk by chunk (never whole in memory)."""
    rng = np.random.default_rng(0)
    path = root / "big.f16.npy"
    root.mkdir(parents=True, exist_ok=True)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, width))
    for start in range(0, rows, chunk):
        array[start:start + chunk] = rng.standard_normal((min(chunk, rows - start), width), dtype=np.float32)
    array.flush()
    del array
    big = np.load(path, mmap_mode="r")
    write_cache(root, [f"k{i}" for i in range(rows)], {"enc": big, text_key(TEXT_ENCODER): big[:, :384]})


def feeding(tmp: Path, rows: int, width: int, batch: int, step, steps: int) -> dict:
    """Data wait while training from a large memmapped cache through the training loop's Prefetcher (10
    encoders per batch), and heap memory before/after streaming (must not grow with the data set)."""
    synthetic_cache(tmp, rows, width)
    cache = CachedFeatures(tmp, ["enc", text_key(TEXT_ENCODER)], verify=False)
    data = FeatureBatches(cache, ["enc"] * len(WIDTHS_10), [TEXT_ENCODER], batch)
    everyone = np.arange(len(WIDTHS_10))
    feed = Prefetcher(data, lambda micro: (everyone, np.zeros(1, np.int64)))
    before = rss_anon_mb()
    gather = timed(lambda: data.batch(int(np.random.default_rng().integers(1 << 20)), everyone), 3)
    wait = total = 0.0
    for s in range(steps):
        start = time.perf_counter()
        feed.get(s)
        waited = time.perf_counter()
        step()
        wait, total = wait + waited - start, total + time.perf_counter() - start
    return {"rows": rows, "width": width, "cache_gb": rows * width * 2 / 1e9, "gather_s": gather,
            "data_wait_share": wait / total, "rss_anon_mb_before": before, "rss_anon_mb_after": rss_anon_mb()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    batch, repeat = (1024, 2) if args.quick else (4096, 3)
    step, flops = make_step("hypernet", WIDTHS_10, batch)
    step_s = timed(step, repeat)
    mm = matmul_rate(batch, 384, repeat + 2)
    sep_step, sep_flops = make_step("separate", WIDTHS_10, batch)
    sep_s = timed(sep_step, repeat)
    loop_s = timed(looped_step(WIDTHS_10, batch), repeat)
    scaling_n = [{"N": n, "B": 1024, "step_s": timed(make_step("hypernet", (WIDTHS_10 * 3)[:n], 1024)[0], 2)}
                 for n in (1, 2, 5, 10, 20, 30)]
    scaling_b = [{"N": 10, "B": b, "step_s": timed(make_step("hypernet", WIDTHS_10, b)[0], 2)}
                 for b in ((512, 1024, 2048) if args.quick else (512, 1024, 2048, 4096, 8192))]
    with tempfile.TemporaryDirectory() as tmp:
        feed = feeding(Path(tmp), 100_000 if args.quick else 1_000_000, 1024, batch, step, 6)
    result = {
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "dtype": "float32", "N": len(WIDTHS_10), "B": batch, "T": 384,
        "step_flops": flops, "step_s": step_s, "step_flops_per_s": flops / step_s, "matmul_flops_per_s": mm,
        "matmul_peak_ratio": flops / step_s / mm,
        "separate_step_s": sep_s, "separate_flops_per_s": sep_flops / sep_s, "loop_step_s": loop_s,
        "loop_speedup": loop_s / sep_s, "scaling_n": scaling_n, "scaling_b": scaling_b, "feeding": feed,
        "data_wait_share": feed["data_wait_share"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    files.write_json(RESULTS / "bench_train_step.json", stamp(result, vars(args)))
    _plot(scaling_n, scaling_b, RESULTS / "bench_train_step.png")
    print(json.dumps({k: result[k] for k in ("matmul_peak_ratio", "loop_speedup", "data_wait_share",
                                            "step_flops_per_s", "matmul_flops_per_s")}))
    return result


def _plot(scaling_n, scaling_b, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    axes[0].plot([r["N"] for r in scaling_n], [r["step_s"] for r in scaling_n], marker="o")
    axes[0].set(xlabel="encoders N (B=1024)", ylabel="step time (s)")
    axes[1].plot([r["B"] for r in scaling_b], [r["step_s"] for r in scaling_b], marker="o")
    axes[1].set(xlabel="batch B (N=10)", ylabel="step time (s)", xscale="log", yscale="log")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
