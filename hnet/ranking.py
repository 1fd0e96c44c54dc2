"""Encoder ranking: does the hypernetwork rank encoders (pairs of image and text encoders) like the separate grid
search, and at what cost?"""
from __future__ import annotations

from pathlib import Path

from scipy.stats import kendalltau, spearmanr

from hnet import io


def _top1(run_dir: Path, dataset: str, names: list[str] | None = None) -> dict[str, float]:
    evals = io.read_json(run_dir / "eval.json")["datasets"]
    if dataset not in evals:
        raise KeyError(f"{run_dir}/eval.json: no results for '{dataset}' (has: {', '.join(evals)})")
    return {n: m["top1"] for n, m in evals[dataset]["encoders"].items() if names is None or n in names}


def rank_encoders(hypernet_run: str | Path, separate_run: str | Path, dataset: str) -> dict:
    """Spearman/Kendall between the two rankings over the encoders both trained, top-1 agreement, FLOPs."""
    hyper_dir, sep_dir = Path(hypernet_run), Path(separate_run)
    trained = io.read_json(hyper_dir / "model.json").get("trained") or io.read_json(hyper_dir / "model.json")["names"]
    hyper = _top1(hyper_dir, dataset, trained)
    sep = _top1(sep_dir, dataset)
    common = [n for n in hyper if n in sep]
    if len(common) < 2:
        raise ValueError(f"ranking needs >= 2 encoders in both runs; shared: {common}")
    h, s = [hyper[n] for n in common], [sep[n] for n in common]
    flops = {k: io.read_json(d / "flops.json")["phases"]["train"]["flops"] for k, d in
             (("hypernet", hyper_dir), ("separate", sep_dir))}
    best_h, best_s = max(common, key=hyper.get), max(common, key=sep.get)
    pairs = io.read_json(hyper_dir / "eval.json").get("pairs", {})
    return {"dataset": dataset, "encoders": common, "pairs": {n: pairs[n] for n in common if n in pairs}, "hypernet_top1": h, "separate_top1": s,
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


def pair_grid(pairs: dict[str, list[str]], scores: dict[str, dict[str, float]]) -> dict:
    """The N x M view of pair scores ({method: {pair: top-1}}): per method the best pair, and per image encoder
    the best text encoder."""
    images = list(dict.fromkeys(i for i, _ in pairs.values()))
    texts = list(dict.fromkeys(t for _, t in pairs.values()))
    cell = {(i, t): label for label, (i, t) in pairs.items()}
    out = {"images": images, "texts": texts, "best_pair": {}, "best_text": {}}
    for method, score in scores.items():
        out["best_pair"][method] = max(pairs, key=score.get)
        out["best_text"][method] = {i: max((t for t in texts if (i, t) in cell), key=lambda t: score[cell[i, t]])
                                    for i in images}
    return out


def pair_grid_markdown(pairs: dict[str, list[str]], scores: dict[str, dict[str, float]]) -> list[str]:
    """Rows: image encoders; columns: text encoders; cells: top-1 per method (hypernet / separate)."""
    grid = pair_grid(pairs, scores)
    cell = {(i, t): label for label, (i, t) in pairs.items()}
    methods = list(scores)
    lines = [f"| image encoder \\ text encoder ({' / '.join(methods)}) | " + " | ".join(grid["texts"])
             + " | best text encoder |", "|---|" + "---:|" * len(grid["texts"]) + "---|"]
    for i in grid["images"]:
        cells = [" / ".join(f"{scores[m][cell[i, t]]:.1f}" for m in methods) if (i, t) in cell else "-"
                 for t in grid["texts"]]
        best = " / ".join(grid["best_text"][m][i] for m in methods)
        lines.append(f"| {i} | " + " | ".join(cells) + f" | {best} |")
    lines += ["", "Best pair: " + "; ".join(f"{m} {grid['best_pair'][m]}" for m in methods)]
    return lines


def ranking_markdown(r: dict) -> str:
    lines = [f"### Encoder ranking on {r['dataset']}", ""]
    pairs = r.get("pairs", {})
    if len({t for _, t in pairs.values()}) > 1:
        scores = {m: dict(zip(r["encoders"], r[f"{m}_top1"])) for m in ("hypernet", "separate")}
        lines += pair_grid_markdown(pairs, scores) + [""]
    lines += ["| encoder | hypernet top-1 | separate top-1 |", "|---|---:|---:|"]
    lines += [f"| {n} | {h:.1f} | {s:.1f} |" for n, h, s in zip(r["encoders"], r["hypernet_top1"], r["separate_top1"])]
    lines += ["", f"Spearman {r['spearman']:.3f}, Kendall {r['kendall']:.3f}, same best encoder: "
                  f"{'yes' if r['top1_agreement'] else 'no'} ({r['best_hypernet']} vs {r['best_separate']}); "
                  f"training FLOPs separate / hypernet = {r['flops_ratio']:.2f}"]
    return "\n".join(lines)
