"""Embedding-pass speed, side by side in one process, on the demo zoo and built-in shards:

- images/s of the full pass (read shard, decode once, transform per encoder, forward all encoders) against
  forward-only images/s on pre-made tensors for the same encoders: `pass_vs_forward_ratio`
- one pass for N encoders against N single-encoder passes (each decoding every image again): `one_pass_speedup`

    python benchmarks/bench_embed.py [--samples 1000] [--workers 0]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hnet import files  # noqa: E402
from hnet.config import load_config  # noqa: E402
from hnet.data.embed import embed_pass  # noqa: E402
from hnet.data.sources import prepare_shards, shard_units  # noqa: E402
from hnet.models.encoders import ImageEncoder, read_encoder_list  # noqa: E402
from hnet.provenance import stamp  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def pass_seconds(units, encoders, batch: int, workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        embed_pass(Path(tmp), units, encoders, None, batch, workers, torch.device("cpu"))
        return time.perf_counter() - start


@torch.no_grad()
def forward_seconds(encoders, images: int, batch: int) -> float:
    inputs = {n: torch.randn(batch, *e.input_size) for n, e in encoders.items()}
    for n, e in encoders.items():  # warm-up
        e(inputs[n])
    start = time.perf_counter()
    for _ in range(images // batch):
        for n, e in encoders.items():
            e(inputs[n])
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for decode + transforms")
    parser.add_argument("--out-root", default="runs/bench")
    args = parser.parse_args(argv)
    cfg = load_config("configs/demo.yaml", [f"out_root={args.out_root}", f"data.demo_samples={args.samples}",
                                            "data.shard_size=250"])
    units = shard_units(prepare_shards(cfg))
    specs = read_encoder_list(cfg.encoders, cfg.image_weights)
    encoders = {s.name: ImageEncoder(s) for s in specs}
    batch = cfg.data.embed_batch_size
    one_pass = pass_seconds(units, encoders, batch, args.workers)
    forward = forward_seconds(encoders, args.samples, batch)
    singles = sum(pass_seconds(units, {n: e}, batch, args.workers) for n, e in encoders.items())
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "encoders": list(encoders), "samples": args.samples,
              "workers": args.workers, "pass_images_per_s": args.samples / one_pass,
              "forward_images_per_s": args.samples / forward, "pass_vs_forward_ratio": forward / one_pass,
              "single_passes_s": singles, "one_pass_s": one_pass, "one_pass_speedup": singles / one_pass}
    RESULTS.mkdir(parents=True, exist_ok=True)
    files.write_json(RESULTS / "bench_embed.json", stamp(result, vars(args)))
    print(json.dumps({k: result[k] for k in ("pass_vs_forward_ratio", "one_pass_speedup", "pass_images_per_s",
                                            "forward_images_per_s")}))
    return result


if __name__ == "__main__":
    main()
