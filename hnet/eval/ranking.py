"""Encoder ranking: does the hypernetwork rank encoders (pairs of image and text encoders) like the separate grid
search, and at what cost?"""
from __future__ import annotations

from pathlib import Path

from scipy.stats import kendalltau, spearmanr

from hnet import files, runs


def _top1(run_dir: Path, dataset: str, names: list[str] | None = None) -> dict[str, float]:
    try:
        return runs.pair_top1(files.read_json(run_dir / runs.EVAL), dataset, names)
    except KeyError as err:
        raise KeyError(f"{run_dir}/{err.args[0]}") from None


def rank_encoders(hypernet_run: str | Path, separate_run: str | Path, dataset: str) -> dict:
    """Spearman/Kendall between the two rankings over the encoders both trained, top-1 agreement, FLOPs."""
    hyper_dir, sep_dir = Path(hypernet_run), Path(separate_run)
    trained = runs.trained_pairs(files.read_json(hyper_dir / runs.MODEL))
    hyper = _top1(hyper_dir, dataset, trained)
    sep = _top1(sep_dir, dataset)
    common = [n for n in hyper if n in sep]
    if len(common) < 2:
        raise ValueError(f"ranking needs >= 2 encoders in both runs; shared: {common}")
    h, s = [hyper[n] for n in common], [sep[n] for n in common]
    flops = {k: files.read_json(d / runs.FLOPS)["phases"]["train"]["flops"] for k, d in
             (("hypernet", hyper_dir), ("separate", sep_dir))}
    best_h, best_s = max(common, key=hyper.get), max(common, key=sep.get)
    pairs = files.read_json(hyper_dir / runs.EVAL).get("pairs", {})
    return {"dataset": dataset, "encoders": common, "pairs": {n: pairs[n] for n in common if n in pairs},
            "hypernet_top1": h, "separate_top1": s,
            "spearman": float(spearmanr(h, s).statistic), "kendall": float(kendalltau(h, s).statistic),
            "top1_agreement": best_h == best_s, "best_hypernet": best_h, "best_separate": best_s,
            "hypernet_train_flops": flops["hypernet"], "separate_train_flops": flops["separate"],
            "flops_ratio": flops["separate"] / flops["hypernet"] if flops["hypernet"] else None}


def agreement(predicted: dict[str, float], truth: dict[str, float]) -> dict:
    """How well scores `predicted` (any scale: accuracy, proxy) pick and order encoders whose true accuracy is
    `truth` (%): Spearman, Kendall, top-1 hit, regret (points lost by taking the predicted best), top-3 recall."""
    common = [n for n in truth if n in predicted]
    if len(common) < 2:
        raise ValueError(f"agreement needs >= 2 shared encoders; shared: {common}")
    p, t = [predicted[n] for n in common], [truth[n] for n in common]
    best_pred, best_true = max(common, key=predicted.get), max(common, key=truth.get)
    top = lambda scores: set(sorted(common, key=scores.get, reverse=True)[:3])
    return {"spearman": float(spearmanr(p, t).statistic), "kendall": float(kendalltau(p, t).statistic),
            "top1_hit": best_pred == best_true, "regret": truth[best_true] - truth[best_pred],
            "top3_recall": len(top(predicted) & top(truth)) / min(3, len(common)),
            "predicted_best": best_pred, "true_best": best_true, "encoders": len(common)}
