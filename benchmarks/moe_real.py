"""Mixture-of-experts vs dense connectors on the real zoo: APE (one connector per pair, all 21 pairs of
configs/flickr8k_real.yaml, its 10-epoch schedule) with each connector below, at --seeds seeds (default 3):

  dense          mlp, depth 2, hidden H (--hidden, default 512)
  moe            E = 4 mlp experts of hidden H/2, top-2, Switch balance loss 0.01 (matched ACTIVE parameters: two
                 experts of H/2 hold what the dense H holds, plus the gate's in x E)
  dense_flops    mlp of the hidden H_f whose ledger training MACs over the zoo's pairs equal the moe's (the gate's
                 share added to the dense connector: matched FLOPs)
  linear         the real zoo's own connector (reference)

Scored on CIFAR-10 zero-shot top-1 (the class-balanced 2,000 test images), mean over the pairs; each comparison is
moe minus its dense match, with a 95% bootstrap interval over evaluation images and seeds (resampled jointly: seed i
gives both variants the same data order), and the pairs where the moe's seed-mean is higher. A winner is named only
where the interval excludes 0. Reads the caches benchmarks/real_zoo.py --phase embed leaves under runs/real_zoo;
finished runs of the same config are reused. Writes benchmarks/results/moe_real.json (stamped).

    python benchmarks/real_zoo.py --phase embed eval.retrieval=     # once (~75 min on 2 CPU cores)
    python benchmarks/moe_real.py [--seeds 3] [--hidden 512]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import real_zoo  # noqa: E402  (sets HF_HUB_OFFLINE before hnet imports the text encoders)

from hnet import files, runs  # noqa: E402
from hnet.config import Config, ConnectorConfig, dataset_name  # noqa: E402
from hnet.experiments.train_run import trained_and_evaluated  # noqa: E402
from hnet.flops import shape_macs  # noqa: E402
from hnet.models.connectors import ConnectorShape  # noqa: E402
from hnet.provenance import stamp  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "moe_real.json"
BOOTSTRAP = 2000
EXPERTS, TOP_K = 4, 2
COMPARISONS = {"matched active parameters": ("moe", "dense"), "matched FLOPs": ("moe", "dense_flops")}


def _shape(c: ConnectorConfig, widths: list[tuple[int, int]]) -> ConnectorShape:
    return ConnectorShape.from_config(c, max(w for w, _ in widths), max(t for _, t in widths))


def train_macs(c: ConnectorConfig, widths: list[tuple[int, int]]) -> int:
    """Forward + backward MACs per training row of every pair's connector at its true widths (the ledger's
    formula, hnet.flops.shape_macs)."""
    shape = _shape(c, widths)
    return sum(sum(shape_macs(shape, 1, 1, shape.true_layers(w, t)).values()) for w, t in widths)


def active_params(c: ConnectorConfig, widths: list[tuple[int, int]]) -> float:
    """Mean over pairs of the parameters one sample passes through (moe: the gate and k experts)."""
    shape = _shape(c, widths)
    if shape.kind != "moe":
        return total_params(c, widths)
    gate = lambda w, t: shape.true_layers(w, t)[0][0] * shape.experts
    return float(np.mean([gate(w, t) + shape.top_k * shape.expert.num_params(w, t) for w, t in widths]))


def total_params(c: ConnectorConfig, widths: list[tuple[int, int]]) -> float:
    shape = _shape(c, widths)
    return float(np.mean([shape.num_params(w, t) for w, t in widths]))


def flops_matched_hidden(moe: ConnectorConfig, widths: list[tuple[int, int]]) -> int:
    """The dense mlp hidden width whose training MACs over these pairs come closest to the moe's."""
    target = train_macs(moe, widths)
    dense = lambda h: dataclasses.replace(moe, kind="mlp", hidden=h)
    start = moe.top_k * moe.hidden
    return min(range(max(1, start - 64), start + 256), key=lambda h: abs(train_macs(dense(h), widths) - target))


def connectors(hidden: int, widths: list[tuple[int, int]]) -> dict[str, ConnectorConfig]:
    moe = ConnectorConfig(kind="moe", expert_kind="mlp", depth=2, hidden=hidden // TOP_K, experts=EXPERTS,
                          top_k=TOP_K, balance_alpha=0.01)
    return {"dense": ConnectorConfig(kind="mlp", depth=2, hidden=hidden), "moe": moe,
            "dense_flops": ConnectorConfig(kind="mlp", depth=2, hidden=flops_matched_hidden(moe, widths)),
            "linear": ConnectorConfig(kind="linear")}


def _interval(statistic, seeds: int, images: int, boot: int, seed: int) -> list[float]:
    """95% percentile interval of statistic(seed indices, image indices) over joint bootstrap draws of both."""
    rng = np.random.default_rng(seed)
    draws = [statistic(rng.integers(0, seeds, seeds), rng.integers(0, images, images)) for _ in range(boot)]
    return [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]


def paired_gap(a: np.ndarray, b: np.ndarray, boot: int = BOOTSTRAP, seed: int = 0) -> dict:
    """a, b: hits [seeds, pairs, images] of two variants on the same pairs and images; a - b in points, mean over
    pairs and seeds, with a 95% interval over images and seeds (one draw of each serves both variants)."""
    seeds, _, images = a.shape
    gap = lambda sd, img: (a[sd][:, :, img].mean() - b[sd][:, :, img].mean()) * 100
    per_pair = a.mean(axis=(0, 2)) - b.mean(axis=(0, 2))
    return {"gap": float(gap(np.arange(seeds), np.arange(images))), "ci": _interval(gap, seeds, images, boot, seed),
            "pairs_higher": int((per_pair > 0).sum()), "pairs_lower": int((per_pair < 0).sum()),
            "n_pairs": int(a.shape[1]), "seeds": int(seeds)}


def mean_ci(hits: np.ndarray, boot: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Mean top-1 (%) of hits [seeds, pairs, images] with a 95% interval over images and seeds."""
    seeds, _, images = hits.shape
    mean = lambda sd, img: hits[sd][:, :, img].mean() * 100
    return {"top1": float(hits.mean() * 100), "ci": _interval(mean, seeds, images, boot, seed),
            "per_seed": [float(s.mean() * 100) for s in hits]}


def verdict(gap: dict) -> str:
    low, high = gap["ci"]
    if low > 0:
        return "moe wins"
    if high < 0:
        return "dense wins"
    return "no winner: the interval holds 0"


def run_configs(cfg: Config, connector: ConnectorConfig, name: str, seeds: int) -> list[Config]:
    return [dataclasses.replace(cfg, name=f"{cfg.name}_conn_{name}_h{connector.hidden}_s{i}", method="separate",
                                held_out_pairs=[], connector=connector,
                                train=dataclasses.replace(cfg.train, seed=cfg.train.seed + i, eval_every=0))
            for i in range(seeds)]


def _routing(run_dir: Path, dataset: str) -> dict | None:
    per_pair = files.read_json(run_dir / runs.EVAL)["datasets"][dataset]["encoders"].values()
    routing = [r["routing"] for r in per_pair if "routing" in r]
    if not routing:
        return None
    return {"routing_entropy": float(np.mean([r["routing_entropy"] for r in routing])),
            "dead_experts": int(sum(r["dead_experts"] for r in routing))}


def measure_variant(cfgs: list[Config], connector: ConnectorConfig, widths, dataset: str,
                    pairs: list[str]) -> tuple[dict, np.ndarray]:
    """A variant's summary and its hits [seeds, pairs, images]."""
    seconds = [trained_and_evaluated(c, [dataset]) for c in cfgs]
    hits = np.stack([runs.read_hits(c.run_dir, dataset, pairs) for c in cfgs])
    ledger = [files.read_json(c.run_dir / runs.FLOPS)["phases"]["train"]["flops"] for c in cfgs]
    return {"connector": dataclasses.asdict(connector), "active_params_per_pair": active_params(connector, widths),
            "params_per_pair": total_params(connector, widths), "train_macs_per_row": train_macs(connector, widths),
            "ledger_train_flops": float(np.mean(ledger)), "train_seconds": seconds,
            "routing": _routing(cfgs[0].run_dir, dataset), **mean_ci(hits)}, hits


def pair_widths(run_dir: Path) -> tuple[list[str], list[tuple[int, int]]]:
    """A run's pairs and each pair's (image width, text width)."""
    meta = files.read_json(run_dir / runs.MODEL)
    _, image_widths, _, text_widths, pairs = runs.run_encoders(run_dir, meta)
    widths = [(image_widths[i], text_widths[j]) for i, j in pairs.as_list()]
    return meta["names"], widths


def measure(cfg: Config, seeds: int, hidden: int) -> dict:
    """Every variant's runs trained (or reused) and scored; the linear reference's first run comes first: its
    model.json names the pairs and their widths, which the matched-FLOPs width needs."""
    dataset = dataset_name(cfg.eval.datasets[0])
    reference = run_configs(cfg, ConnectorConfig(kind="linear"), "linear", 1)[0]
    trained_and_evaluated(reference, [dataset])
    pairs, widths = pair_widths(reference.run_dir)
    out, hits = {}, {}
    for name, connector in connectors(hidden, widths).items():
        out[name], hits[name] = measure_variant(run_configs(cfg, connector, name, seeds), connector, widths, dataset,
                                                pairs)
    comparisons = {}
    for label, (a, b) in COMPARISONS.items():
        gap = paired_gap(hits[a], hits[b])
        ratio = lambda key: out[a][key] / out[b][key]
        comparisons[label] = {"moe": a, "dense": b, **gap, "verdict": verdict(gap),
                              "flops_ratio": ratio("ledger_train_flops"),
                              "active_params_ratio": ratio("active_params_per_pair")}
    return {"dataset": dataset, "pairs": pairs, "seeds": seeds, "hidden": hidden, "variants": out,
            "comparisons": comparisons}


def print_table(result: dict) -> None:
    print(f"\n{result['dataset']} zero-shot top-1, mean over {len(result['pairs'])} pairs, {result['seeds']} seeds")
    for name, v in result["variants"].items():
        print(f"  {name:12s} {v['top1']:6.2f} [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}]  active params "
              f"{v['active_params_per_pair']:,.0f}  train FLOPs {v['ledger_train_flops']:.3g}")
    for label, c in result["comparisons"].items():
        print(f"  {label}: moe - {c['dense']} = {c['gap']:+.2f} [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}] "
              f"({c['pairs_higher']} of {c['n_pairs']} pairs higher): {c['verdict']}")


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=real_zoo.SHARED_DATA, help="folder described by ../shared/data/README.md")
    parser.add_argument("--encoders", default=real_zoo.DEFAULT_ENCODERS, help="OUT folder of real_encoders/build.sh")
    parser.add_argument("--out", default="runs/real_zoo", help="runs and caches (benchmarks/real_zoo.py's)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512, help="the dense mlp's hidden width H")
    args = parser.parse_args(argv)
    data, encoders = Path(args.data).expanduser().resolve(), Path(args.encoders).expanduser().resolve()
    if missing := real_zoo.missing_inputs(data, encoders):
        print(f"SKIP moe_real: missing {', '.join(missing)} (see ../shared/data/README.md)")
        return None
    cfg = real_zoo.real_config(data, encoders, Path(args.out), ["eval.retrieval="])
    result = measure(cfg, args.seeds, args.hidden)
    print_table(result)
    files.write_json(RESULTS, stamp(result, cfg))
    print(f"wrote {RESULTS}")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
