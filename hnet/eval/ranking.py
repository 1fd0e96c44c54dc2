"""Ranking pairs (image encoder, text encoder): how well a method's scores pick and order the pairs of a grid search,
measured so that the figure can carry a decision.

- The method and its truth never share evaluation images: the images are split once, by a seeded permutation, into
  halves A and B; the method is scored on A, the truth on B. The truth's own agreement between A and B (its
  split-half ceiling) is reported next to every figure: no method can be expected to agree with the truth better
  than the truth agrees with itself.
- Ties are expected values: regret, top-1 hit and top-k recall average over every way of breaking the tied scores
  (Kendall's tau-b and Spearman's average ranks handle ties as scipy defines them).
- The truth is a grid search of separate connectors trained from seeds (init and data order) no method uses, averaged
  over several (`search.truth_seeds`), so a truncated or cheaper run is not partly a prefix of its own truth.
- Every figure carries a 95% bootstrap interval over evaluation images (resampled within each half) and over the
  truth's seeds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.stats import kendalltau, spearmanr

from hnet import files, runs

METRICS = ("kendall", "spearman", "regret", "top1_hit", "top3_recall")
BOOTSTRAP = 1000
SPLIT_SEED = 0


def _top1(run_dir: Path, dataset: str, names: list[str] | None = None) -> dict[str, float]:
    try:
        return runs.pair_top1(files.read_json(run_dir / runs.EVAL), dataset, names)
    except KeyError as err:
        raise KeyError(f"{run_dir}/{err.args[0]}") from None


def in_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Probability of each item being among the top k when ties are broken uniformly at random."""
    above = (scores[None, :] > scores[:, None]).sum(axis=1)
    tied = (scores[None, :] == scores[:, None]).sum(axis=1)
    return np.clip((k - above) / tied, 0.0, 1.0)


def agreement(predicted: dict[str, float], truth: dict[str, float]) -> dict:
    """How well scores `predicted` (any scale: accuracy, proxy) pick and order pairs whose true accuracy is `truth`
    (%): Spearman, Kendall, and, in expectation over tie breaks, top-1 hit, regret (points lost by taking the
    predicted best) and top-3 recall."""
    common = [n for n in truth if n in predicted]
    if len(common) < 2:
        raise ValueError(f"agreement needs >= 2 shared encoders; shared: {common}")
    p, t = np.array([predicted[n] for n in common], float), np.array([truth[n] for n in common], float)
    best_pred, best_true = p == p.max(), t == t.max()
    k = min(3, len(common))
    rho, tau = spearmanr(p, t).statistic, kendalltau(p, t).statistic
    return {"spearman": _finite(rho), "kendall": _finite(tau),
            "top1_hit": float(best_true[best_pred].mean()), "regret": float(t.max() - t[best_pred].mean()),
            "top3_recall": float((in_top_k(p, k) * in_top_k(t, k)).sum() / k),
            "predicted_best": [n for n, b in zip(common, best_pred) if b],
            "true_best": [n for n, b in zip(common, best_true) if b], "encoders": len(common)}


def _finite(x: float) -> float:
    """scipy gives NaN when one side is constant (no order to agree with): no agreement."""
    return 0.0 if not np.isfinite(x) else float(x)


def split_halves(n: int, seed: int = SPLIT_SEED, method_images: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation images 0..n-1 split into two disjoint halves (A, B) by a seeded permutation; `method_images` > 0:
    A is only that many of them (a random part of the first half, whatever order the images are stored in)."""
    order = np.random.default_rng([seed, n]).permutation(n)
    if method_images > n // 2:
        raise ValueError(f"method_images: {method_images} exceed half of the {n} evaluation images")
    return np.sort(order[: method_images or n // 2]), np.sort(order[n // 2:])


def halves_top1(hits: np.ndarray) -> dict[str, float]:
    """Top-1 (%) of one pair's per-image hits on all images, on validation (half A: where points are chosen) and on
    test (half B: where they are reported)."""
    a, b = split_halves(len(hits))
    return {"all": float(hits.mean() * 100), "val": float(hits[a].mean() * 100), "test": float(hits[b].mean() * 100)}


def mean_halves(halves: list[dict[str, float]]) -> dict[str, float]:
    """The mean over pairs of their `halves_top1` figures."""
    return {half: sum(h[half] for h in halves) / len(halves) for half in ("all", "val", "test")}


def _scores(hits: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Top-1 (%) of every pair (rows of `hits` [pairs, images]) under image weights (counts of a resample)."""
    return hits @ weights / weights.sum() * 100


def split_agreement(predicted_hits: np.ndarray, truth_hits: np.ndarray, names: list[str],
                    boot: int = BOOTSTRAP, seed: int = SPLIT_SEED, method_images: int = 0) -> dict:
    """Agreement of a method (its per-image zero-shot hits [pairs, images] on half A, or on `method_images` of it)
    with the truth (its hits on half B, [pairs, images] or [truth seeds, pairs, images]: the mean over seeds), the
    truth's split-half ceiling (the truth on the method's images of A vs the truth on B), and 95% bootstrap intervals
    of both over evaluation images and truth seeds. Every hit array covers the same images in the same order."""
    truth_hits = truth_hits[None] if truth_hits.ndim == 2 else truth_hits
    if predicted_hits.shape != truth_hits.shape[1:] or predicted_hits.shape[0] != len(names):
        raise ValueError(f"hits of {predicted_hits.shape} and {truth_hits.shape} for {len(names)} pairs")
    a, b = split_halves(truth_hits.shape[2], seed, method_images)  # a: the images the method is scored on
    seeds = len(truth_hits)
    ones = lambda n: np.ones(n)

    def both(wa, wb, ws) -> tuple[dict, dict]:
        truth = np.tensordot(ws / ws.sum(), truth_hits, axes=1)  # [pairs, images], the seeds' weighted mean
        return (_agree(names, predicted_hits[:, a], truth[:, b], wa, wb),
                _agree(names, truth[:, a], truth[:, b], wa, wb))

    point, ceiling = both(ones(len(a)), ones(len(b)), ones(seeds))
    rng = np.random.default_rng([seed, 1])
    resample = lambda n: rng.multinomial(n, ones(n) / n)  # counts of a bootstrap draw of n items
    draws = [both(resample(len(a)), resample(len(b)), resample(seeds)) for _ in range(boot)]
    return point | {"ci": interval([d[0] for d in draws]),
                    "ceiling": ceiling | {"ci": interval([d[1] for d in draws])},
                    "halves": {"method": len(a), "truth": len(b), "seed": seed, "bootstrap": boot,
                               "truth_seeds": seeds}}


def _agree(names, method_hits, truth_hits, method_weights, truth_weights) -> dict:
    return agreement(dict(zip(names, _scores(method_hits, method_weights))),
                     dict(zip(names, _scores(truth_hits, truth_weights))))


def scores_agreement(predicted: dict[str, float], truth_hits: np.ndarray, names: list[str],
                     boot: int = BOOTSTRAP, seed: int = SPLIT_SEED) -> dict:
    """Agreement of fixed scores (a method that evaluates on no truth image: halving on its own held-out search
    samples, a proxy, a prior) with the truth on half B of the evaluation images ([seeds, pairs, images] hits, as in
    `split_agreement`), with the truth's split-half ceiling; intervals over half B's images and the truth's seeds
    (the method's own sampling is not resampled)."""
    truth_hits = truth_hits[None] if truth_hits.ndim == 2 else truth_hits
    missing = [n for n in names if n not in predicted]
    if missing or truth_hits.shape[1] != len(names):
        raise ValueError(f"scores for {sorted(predicted)} and truth hits {truth_hits.shape} for {names}")
    a, b = split_halves(truth_hits.shape[2], seed)
    seeds, ones = len(truth_hits), np.ones
    mine = {n: float(predicted[n]) for n in names}
    best = dict(zip(names, _scores(truth_hits.mean(axis=0)[:, b], ones(len(b)))))  # the truth's own pick

    def both(wa, wb, ws) -> tuple[dict, dict, dict]:
        truth = np.tensordot(ws / ws.sum(), truth_hits, axes=1)
        truth_b = dict(zip(names, _scores(truth[:, b], wb)))
        return (agreement(mine, truth_b), _agree(names, truth[:, a], truth[:, b], wa, wb),
                agreement(best, truth_b))

    point, ceiling, own = both(ones(len(a)), ones(len(b)), ones(seeds))
    rng = np.random.default_rng([seed, 2])
    resample = lambda n: rng.multinomial(n, ones(n) / n)
    draws = [both(resample(len(a)), resample(len(b)), resample(seeds)) for _ in range(boot)]
    # the truth's resolution: the regret of picking its own best pair, under the same resamples (no method's upper
    # bound can be lower)
    resolution = {"regret": own["regret"], "ci": interval([d[2] for d in draws])["regret"]}
    return point | {"ci": interval([d[0] for d in draws]),
                    "ceiling": ceiling | {"ci": interval([d[1] for d in draws])}, "resolution": resolution,
                    "halves": {"method": 0, "truth": len(b), "seed": seed, "bootstrap": boot, "truth_seeds": seeds}}


def interval(draws: list[dict], level: float = 0.95) -> dict[str, list[float]]:
    """Percentile interval of each ranking figure over bootstrap draws."""
    tail = (1 - level) / 2 * 100
    return {m: [float(np.percentile([d[m] for d in draws], tail)), float(np.percentile([d[m] for d in draws],
                                                                                          100 - tail))]
            for m in METRICS}


def read_truth_hits(truth_runs: list[str | Path], dataset: str, names: list[str]) -> np.ndarray:
    """[seeds, pairs, images] per-image hits of the truth's runs (one per seed)."""
    return np.stack([runs.read_hits(run, dataset, names) for run in truth_runs])


def rank_encoders(hypernet_run: str | Path, truth_runs: list[str | Path], dataset: str) -> dict:
    """The hypernetwork's ranking of the pairs both trained (on evaluation half A) against the truth: separate
    connectors from independent seeds (`truth_runs`, half B), with intervals and the truth's split-half ceiling;
    top-1 on all images, and training FLOPs of the hypernetwork and of one grid search (the first truth run)."""
    truth_runs = [truth_runs] if isinstance(truth_runs, (str, Path)) else truth_runs
    hyper_dir, truth_dirs = Path(hypernet_run), [Path(r) for r in truth_runs]
    trained = runs.trained_pairs(files.read_json(hyper_dir / runs.MODEL))
    hyper = _top1(hyper_dir, dataset, trained)
    truths = [_top1(d, dataset) for d in truth_dirs]
    common = [n for n in hyper if all(n in t for t in truths)]
    if len(common) < 2:
        raise ValueError(f"ranking needs >= 2 encoders in both runs; shared: {common}")
    flops = {k: files.read_json(d / runs.FLOPS)["phases"]["train"]["flops"] for k, d in
             (("hypernet", hyper_dir), ("separate", truth_dirs[0]))}
    pairs = files.read_json(hyper_dir / runs.EVAL).get("pairs", {})
    split = split_agreement(runs.read_hits(hyper_dir, dataset, common), read_truth_hits(truth_dirs, dataset, common),
                            common)
    return split | {"dataset": dataset, "encoders": common, "pairs": {n: pairs[n] for n in common if n in pairs},
            "hypernet_top1": [hyper[n] for n in common],
            "separate_top1": [float(np.mean([t[n] for t in truths])) for n in common],
            "truth_runs": [str(d) for d in truth_dirs],
            "hypernet_train_flops": flops["hypernet"], "separate_train_flops": flops["separate"],
            "flops_ratio": flops["separate"] / flops["hypernet"] if flops["hypernet"] else None}
