"""Real-data check: DeiT-tiny (real weights) + all-MiniLM-L6-v2 on 1,000 captioned ImageNet images, zero-shot on
the 10,000 CIFAR-10 test images.

A zoo of DeiT-tiny variants (input resolution with position-embedding resampling, features after block 8/10,
mean pooling) is built from the one real encoder. The separate baseline trains one connector per variant; the
hypernetwork trains on the variants minus one held out, which is then auto-decoded and compared with a separate
connector trained from scratch on it; the rankings of the variants under both are compared. Runs the whole
pipeline (hnet/pipeline.py) with the real data in place of the built-in one. Prints one JSON line last and writes
benchmarks/results/real_zeroshot.json. Skips cleanly when the data folder is absent.

    python benchmarks/real_zeroshot.py --data ../shared/data
    python benchmarks/real_zeroshot.py --data ../shared/data --text-encoders all-MiniLM-L6-v2,all-MiniLM-L6-v2@layers=3
        (N x M: every variant with each text encoder; writes benchmarks/results/real_zeroshot_pairs.json)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from hnet import files  # noqa: E402
from hnet.config import load_config  # noqa: E402
from hnet.experiments.pipeline import run_pipeline  # noqa: E402
from hnet.provenance import stamp  # noqa: E402

BASE = "deit_tiny_patch16_224"
VARIANTS = [BASE, f"{BASE}@img_size=160", f"{BASE}@img_size=192", f"{BASE}@depth=10", f"{BASE}@depth=8",
            f"{BASE}@pool=avg"]
RESULTS = Path(__file__).parent / "results" / "real_zeroshot.json"
PAIRS_RESULTS = Path(__file__).parent / "results" / "real_zeroshot_pairs.json"


def real_config(data: Path, out_root: Path, held_out: str, extra: list[str]):
    weights = data / "weights" / f"{BASE}.safetensors"
    overrides = [
        f"out_root={out_root}", "name=real", "text_encoder=all-MiniLM-L6-v2", "data.source=cc595k",
        f"data.metadata={data / 'imagenet-sample-595k-format' / 'metadata.json'}",
        f"data.images={data / 'imagenet-sample-595k-format' / 'images'}", "data.shard_size=250",
        "data.embed_batch_size=50", f"eval.cifar10={data / 'cifar10-test'}", "eval.datasets=[cifar10]",
        "eval.templates=cifar", "eval.batch_size=250", "train.batch_size=250", "train.epochs=150",
        "train.lr=2e-3", "train.warmup_steps=20", "train.weight_decay=1.0", "train.log_every=50",
        "train.ckpt_every=1000", "train.eval_every=50", f"held_out={held_out}", "autodecode.steps=30",
        "autodecode.lr=3e-2", "autodecode.batch_size=250", "autodecode.eval_every=5",
    ]
    cfg = load_config(None, overrides + extra)
    return dataclasses.replace(cfg, encoders=[{"name": e, "weights": str(weights)} for e in VARIANTS])


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data", help="folder described by ../shared/data/README.md")
    parser.add_argument("--out", default="runs/real", help="where runs and caches go")
    parser.add_argument("--held-out", default=f"{BASE}@img_size=192")
    parser.add_argument("--text-encoders", default="", help="comma-separated: stitch every variant with each")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    texts = [t for t in args.text_encoders.split(",") if t]
    if texts:
        args.overrides = [f"text_encoders={texts}", *args.overrides]
    data = Path(args.data)
    if not (data / "weights" / f"{BASE}.safetensors").exists():
        print(json.dumps({"skipped": f"no real data under {data}"}))
        return None
    cfg = real_config(data, Path(args.out), args.held_out, args.overrides)
    summary = run_pipeline(cfg, control=True)
    if len(texts) > 1:
        return _write(PAIRS_RESULTS, pairs_result(summary, texts), cfg)
    by = summary["by_encoder"]
    held = summary["held_out"]
    result = {"separate_cifar10_top1": by["separate"][BASE], "hypernet_cifar10_top1": by["hypernet"][BASE],
              "autodecode_cifar10_top1": held["autodecode_top1"],
              "autodecode_separate_cifar10_top1": held["separate_final_top1"],
              "autodecode_flops_ratio": held["flops_ratio"],
              "autodecode_flops_ratio_with_embed": held["flops_ratio_with_embed"],
              "ranking_spearman": summary["ranking"]["spearman"],
              "ranking_kendall": summary["ranking"]["kendall"],
              "shuffled_control_cifar10_top1": summary["datasets"]["cifar10"]["shuffled_control"],
              "held_out": held, "by_encoder": by,
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    return _write(RESULTS, result, cfg)


def pairs_result(summary: dict, texts: list[str]) -> dict:
    """Per text encoder: DeiT-tiny's top-1 under both methods; the pair ranking; the held-out variant."""
    by, held = summary["by_encoder"], summary["held_out"]
    return {"text_encoders": texts,
            "separate_cifar10_top1": {t: by["separate"][f"{BASE} + {t}"] for t in texts},
            "hypernet_cifar10_top1": {t: by["hypernet"][f"{BASE} + {t}"] for t in texts},
            "mean_over_trained_pairs": summary["datasets"]["cifar10"],
            "autodecode_cifar10_top1_mean_over_text_encoders": held["autodecode_top1"],
            "autodecode_separate_cifar10_top1": held["separate_final_top1"],
            "autodecode_flops_ratio": held["flops_ratio"],
            "autodecode_flops_ratio_with_embed": held["flops_ratio_with_embed"],
            "ranking": summary["ranking"], "held_out": held, "by_encoder": by,
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def _write(path: Path, result: dict, cfg) -> dict:
    result = stamp(result, cfg)
    files.write_json(path, result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
