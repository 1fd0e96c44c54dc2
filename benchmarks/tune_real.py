"""Training settings for the real-data check, chosen on the training captions only (never on CIFAR-10): separate
DeiT-tiny connectors are trained on the first 750 of the 1,000 captioned ImageNet images (three shards) and scored by
image<->caption retrieval on the last 250 (the fourth shard), over a small grid of learning rate, weight decay and
epochs. Prints one JSON line last and writes benchmarks/results/real_tune.json; real_zeroshot.py then uses the best.

    python benchmarks/tune_real.py --data ../shared/data
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from real_zeroshot import BASE, real_config  # noqa: E402

from hnet import files  # noqa: E402
from hnet.data.shards import expand_urls  # noqa: E402
from hnet.data.sources import prepare_shards  # noqa: E402
from hnet.eval.evaluate import evaluate_run  # noqa: E402
from hnet.experiments.train_run import train_run  # noqa: E402
from hnet.provenance import stamp  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "real_tune.json"
GRID = {"lr": (2e-3, 1e-2), "weight_decay": (0.1, 1.0, 5.0), "epochs": (20, 50, 150)}


def score(cfg) -> float:
    """Mean of R@1 and R@5, both directions, on the held-out shard."""
    train_run(cfg)
    r = evaluate_run(cfg, cfg.run_dir, [])["retrieval"][BASE]
    return sum(r[d][k] for d in ("image_to_text", "text_to_image") for k in ("R@1", "R@5")) / 4


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--out", default="runs/real_tune")
    args = parser.parse_args(argv)
    data = Path(args.data)
    if not (data / "weights" / f"{BASE}.safetensors").exists():
        print(json.dumps({"skipped": f"no real data under {data}"}))
        return None
    base = real_config(data, Path(args.out), "", ["train.eval_every=0", "data.samples_per_encoder=750"])
    base = dataclasses.replace(base, method="separate", encoders=base.encoders[:1])
    held_out_shard = expand_urls(prepare_shards(base))[-1]
    base = dataclasses.replace(base, eval=dataclasses.replace(base.eval, retrieval=held_out_shard))
    rows = []
    for lr, wd, epochs in itertools.product(*GRID.values()):
        cfg = dataclasses.replace(base, name=f"tune_lr{lr:g}_wd{wd:g}_e{epochs}",
                                  train=dataclasses.replace(base.train, lr=lr, weight_decay=wd, epochs=epochs))
        rows.append({"lr": lr, "weight_decay": wd, "epochs": epochs, "retrieval": score(cfg)})
    best = max(rows, key=lambda r: r["retrieval"])
    result = {"validation": f"retrieval on {held_out_shard} (250 pairs), trained on the first 750", "rows": rows,
              "best": best}
    files.write_json(RESULTS, stamp(result, vars(args)))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
