"""The long-tail view on the real zoo: zero-shot top-1 per segment of classes (many / medium / few, by how often the
class occurs in the Flickr8k TRAINING captions), mean over the pairs, for APE (the grid search at its own seed and
the truth's seeds) and for each hypernetwork run found, with the hypernetwork-minus-APE gap; 95% bootstrap
intervals over evaluation images (resampled within each class) and APE seeds.

Reads the runs benchmarks/search_cost.py --zoo real (APE seeds, the hypernetwork at the search's largest budget)
and benchmarks/real_zoo.py (the hypernetwork at the full schedule) leave under runs/real_zoo; trains nothing.
Writes benchmarks/results/longtail_real.json (stamped) and prints the table.

    python benchmarks/longtail_real.py [--out runs/real_zoo]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from hnet import files, runs
from hnet.config import dataset_name
from hnet.data.cache import CachedFeatures
from hnet.experiments.search import truth_configs
from hnet.provenance import stamp
from hnet.report_probes import SEGMENTS

sys.path.insert(0, str(Path(__file__).parent))
import real_zoo  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "longtail_real.json"
BOOTSTRAP = 2000
HYPERNETS = {"hypernet, full schedule (real_zoo.py)": "flickr8k_real_hypernet",
             "hypernet, 230 steps = APE's schedule (search_cost.py run)": "flickr8k_real_hyper_s230_k0_m6000_hypernet"}


def segment_scores(hits: np.ndarray, labels: np.ndarray, segment_of_class: list[str], weights: np.ndarray) -> dict:
    """Mean over pairs of each segment's top-1 (%); `hits` [pairs, images], `weights` [images] bootstrap counts."""
    out = {}
    for s in SEGMENTS:
        inside = np.isin(labels, [c for c, g in enumerate(segment_of_class) if g == s]) * weights
        out[s] = float((hits * inside).sum(axis=1).mean() / inside.sum() * 100) if inside.sum() else None
    return out


def longtail_table(ape: np.ndarray, hypernets: dict[str, np.ndarray], labels: np.ndarray, segments: list[str],
                   boot: int = BOOTSTRAP, seed: int = 0) -> dict:
    """`ape` [seeds, pairs, images] and each hypernetwork's [pairs, images] hits on the same pairs and images."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]

    def figures(weights, seed_weights) -> dict:
        ape_mean = np.tensordot(seed_weights / seed_weights.sum(), ape, axes=1)
        out = {"APE": segment_scores(ape_mean, labels, segments, weights)}
        for name, hits in hypernets.items():
            mine = segment_scores(hits, labels, segments, weights)
            out[name] = mine
            out[f"{name} minus APE"] = {s: None if mine[s] is None else mine[s] - out["APE"][s] for s in SEGMENTS}
        return out

    point = figures(np.ones(len(labels)), np.ones(len(ape)))
    draws = []
    for _ in range(boot):
        weights = np.zeros(len(labels))
        for members in by_class:  # each class keeps its image count: segments keep their make-up
            np.add.at(weights, rng.choice(members, len(members)), 1)
        draws.append(figures(weights, rng.multinomial(len(ape), np.ones(len(ape)) / len(ape)).astype(float)))
    ci = {row: {s: None if point[row][s] is None else
                [float(np.percentile([d[row][s] for d in draws], q)) for q in (2.5, 97.5)] for s in SEGMENTS}
          for row in point}
    return {"rows": point, "ci": ci, "bootstrap": boot}


def on_the_same_images(ape_dirs: list[Path], hypernets: dict[str, Path], dataset: str) -> tuple[str, dict]:
    """(why APE's runs cannot be compared, or ""; the hypernetwork runs scored on the images APE's were). A run scored
    on other images (real_zoo.py: 2,000; search_cost.py: all) is left out, and said so."""
    key = lambda d: files.read_json(d / runs.EVAL)["datasets"][dataset]["key"]
    images = key(ape_dirs[0])
    if other := [str(d) for d in ape_dirs[1:] if key(d) != images]:
        return f"{other} evaluated on other images than {ape_dirs[0]} (re-run search_cost.py)", {}
    same = {label: d for label, d in hypernets.items() if key(d) == images}
    for label in hypernets.keys() - same.keys():
        print(f"longtail_real: leaving out {label} ({hypernets[label]}): evaluated on other images than {ape_dirs[0]}")
    return "", same


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/real_zoo", help="where search_cost.py / real_zoo.py left their runs")
    parser.add_argument("--data", default=real_zoo.SHARED_DATA)
    parser.add_argument("--encoders", default=real_zoo.DEFAULT_ENCODERS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    data, encoders = Path(args.data).expanduser().resolve(), Path(args.encoders).expanduser().resolve()
    if missing := real_zoo.missing_inputs(data, encoders):
        print(f"SKIP longtail_real: missing {', '.join(missing)} (see ../shared/data/README.md)")
        return None
    cfg = real_zoo.real_config(data, encoders, out, [])
    ape_dirs = [out / f"{cfg.name}_grid_separate", *(t.run_dir for t in truth_configs(cfg))]
    if not all((d / runs.EVAL).exists() for d in ape_dirs):
        print(f"SKIP longtail_real: run benchmarks/search_cost.py --zoo real first (no eval.json in {ape_dirs})")
        return None
    dataset = dataset_name(cfg.eval.datasets[0])
    result = files.read_json(ape_dirs[0] / runs.EVAL)["datasets"][dataset]
    skip, found = on_the_same_images(ape_dirs, {label: out / name for label, name in HYPERNETS.items()
                                                if (out / name / runs.EVAL).exists()}, dataset)
    if skip:
        print(f"SKIP longtail_real: {skip}")
        return None
    names = [n for n in result["encoders"]
             if all(n in files.read_json(d / runs.EVAL)["datasets"][dataset]["encoders"] for d in found.values())]
    view = result["longtail"]
    labels = np.asarray(CachedFeatures(cfg.cache_root / "eval" / result["key"], ["labels"])["labels"])
    segments = [("many" if n > view["many"] else "few" if n < view["few"] else "medium") for n in view["counts"]]
    table = longtail_table(np.stack([runs.read_hits(d, dataset, names) for d in ape_dirs]).astype(float),
                           {k: runs.read_hits(d, dataset, names).astype(float) for k, d in found.items()},
                           labels, segments)
    summary = {"dataset": dataset, "pairs": names, "images": len(labels), "ape_seeds": [str(d) for d in ape_dirs],
               "hypernets": {k: str(d) for k, d in found.items()}, "classes": result["classes"],
               "counts": view["counts"], "segments": segments, "boundaries": view["boundaries"],
               "matching": view["matching"], "source": view["source"], **table}
    files.write_json(RESULTS, stamp(summary, cfg))
    print(json.dumps({k: summary[k] for k in ("rows", "ci")}, indent=1))
    return summary


if __name__ == "__main__":
    main()
