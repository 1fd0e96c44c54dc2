"""Reports of rankings and searches: the N x M view of pair scores, an agreement with its intervals next to the
truth's own split-half ceiling, the hypernetwork's ranking and search, and a budgeted search (halving,
hypernet-halving, proxy): its rungs, its pick, its whole cost next to the grid search's."""
from __future__ import annotations


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


AGREEMENT_ROWS = (("kendall", "Kendall", ".3f"), ("spearman", "Spearman", ".3f"),
                  ("regret", "regret (points)", ".1f"), ("top1_hit", "same best pair", ".2f"),
                  ("top3_recall", "top-3 recall", ".2f"))


def agreement_markdown(a: dict, method: str, truth: str) -> list[str]:
    """A split-half agreement (hnet.eval.ranking.split_agreement) with its 95% intervals, next to the truth's own
    split-half agreement: the ceiling of what any method could reach against it."""
    cell = lambda d, key, fmt: f"{d[key]:{fmt}} [{d['ci'][key][0]:{fmt}}, {d['ci'][key][1]:{fmt}}]"
    h = a["halves"]
    lines = [f"| figure | {method} vs {truth} (95% CI) | {truth} vs itself: split-half ceiling (95% CI) |",
             "|---|---:|---:|"]
    lines += [f"| {label} | {cell(a, key, fmt)} | {cell(a['ceiling'], key, fmt)} |"
              for key, label, fmt in AGREEMENT_ROWS]
    seeds = h.get("truth_seeds", 1)
    scored = (f"{method} scored on {h['method']} evaluation images" if h["method"] else
              f"{method} decided on held-out search samples (no evaluation image)")
    other = "the other " if h["method"] else ""
    lines += ["", f"{scored}, {truth} ({seeds} seed{'s' * (seeds > 1)} no "
                  f"method uses) on {other}{h['truth']} (seeded split); intervals: {h['bootstrap']} bootstrap "
                  f"resamples of the images and truth seeds. Best pair by {method}: "
                  f"{', '.join(a['predicted_best'])}; by {truth}: {', '.join(a['true_best'])} (ties count as expected "
                  f"values)." + _resolution(a.get("resolution"))]
    return lines


def _resolution(r: dict | None) -> str:
    if not r:
        return ""
    return (f" The truth's resolution: a method that picks the truth's own best pair shows regret {r['regret']:.1f} "
            f"[{r['ci'][0]:.1f}, {r['ci'][1]:.1f}].")


def ranking_markdown(r: dict) -> str:
    lines = [f"### Encoder ranking on {r['dataset']}", ""]
    pairs = r.get("pairs", {})
    if len({t for _, t in pairs.values()}) > 1:
        scores = {m: dict(zip(r["encoders"], r[f"{m}_top1"])) for m in ("hypernet", "separate")}
        lines += pair_grid_markdown(pairs, scores) + [""]
    lines += ["| encoder | hypernet top-1 | separate top-1 (truth: mean over its seeds) |", "|---|---:|---:|"]
    lines += [f"| {n} | {h:.1f} | {s:.1f} |" for n, h, s in zip(r["encoders"], r["hypernet_top1"], r["separate_top1"])]
    lines += ["", *agreement_markdown(r, "hypernet", "separate"), "",
              f"Training FLOPs separate (one grid search) / hypernet = {r['flops_ratio']:.2f}"]
    return "\n".join(lines)


def search_markdown(r: dict) -> str:
    b, f, g = r["budget"], r["flops"], r["grid_search"]
    lines = [f"### Encoder search on {r['dataset']} (hypernetwork: {f['steps']} steps, "
             f"k={b['encoders_per_step'] or 'all'}, {f['samples_embedded']} pairs embedded per encoder)", "",
             "| rank | encoder | predicted zero-shot top-1 |", "|---:|---|---:|"]
    lines += [f"| {row['rank']} | {row['encoder']} | {row['predicted_top1']:.1f} |" for row in r["ranking"]]
    pairs = r.get("pairs", {})
    if len({t for _, t in pairs.values()}) > 1:
        lines += ["", *pair_grid_markdown(pairs, {"search": {row["encoder"]: row["predicted_top1"]
                                                             for row in r["ranking"]}})]
    lines += ["", "| FLOPs | search (hypernetwork) | grid search (APE, estimated) | grid / search |",
              "|---|---:|---:|---:|"]
    for key, label in (("train", "training"), ("total", "training + evaluation heads"),
                       ("total_with_embed", "with every embedding pass")):
        lines.append(f"| {label} | {f[key]:.3g} | {g[key]:.3g} | x{r['ratio'][key]:.2f} |")
    lines.append(f"\nGrid search: {g['steps']} steps per connector over {g['samples']} pairs; both sides pay the same "
                 f"evaluation-set embedding ({f['eval_embed']:.3g} FLOPs).")
    if "agreement" in r:
        truth = r["agreement"]["separate"]
        lines += ["", f"Against the finished grid search ({', '.join(truth) if isinstance(truth, list) else truth}):",
                  "",
                  *agreement_markdown(r["agreement"], "search", "grid search")]
    return "\n".join(lines) + "\n"


def budgeted_search_markdown(r: dict) -> str:
    """The report of a halving / hypernet-halving / proxy search (hnet.experiments.budgeted_search)."""
    b, f, g = r["budget"], r["flops"], r["grid_search"]
    what = {"proxy": f"training-free proxy {b['proxy']} on {b['proxy_samples']} samples",
            "halving": f"successive halving of separate connectors (eta {b['eta']})",
            "hypernet-halving": f"successive halving, one hypernetwork per rung (eta {b['eta']})"}[r["method"]]
    lines = [f"### Pair search: {what}", ""]
    if r.get("prefilter"):
        p = r["prefilter"]
        lines.append(f"- before rung 0: {p['proxy']} on the held-out search samples kept {len(p['kept'])} of "
                     f"{len(p['scores'])} pairs")
    for rung in r.get("rungs") or []:
        tried = rung.get("tries", [])
        options = ", ".join(f"{t['lr']:g}" for t in tried)
        lr = f" at lr {rung['lr']:g} (best of {options})" if len(tried) > 1 else ""
        lines.append(f"- rung {rung['rung']}: {rung['pairs']} pairs, {rung['samples']} training samples, "
                     f"{rung['steps']} steps{lr}; kept {', '.join(rung['kept'])}")
    lines += ["", f"Best pair: {', '.join(r['best'])}", "",
              "| FLOPs | this search | grid search (every pair, full schedule) | grid / search |",
              "|---|---:|---:|---:|"]
    for key, label in (("total", "training + scoring"), ("total_with_embed", "with every embedding pass")):
        ratio = r["ratio"][key]
        lines.append(f"| {label} | {f[key]:.3g} | {g[key]:.3g} | {'-' if ratio is None else f'x{ratio:.2f}'} |")
    embedded = ", ".join(f"{n}: {p['rows']} rows" for n, p in f["embed_parts"].items())
    lines.append(f"\nThe search embedded {embedded}; "
                 f"the grid search embeds {g['samples']} samples with every encoder"
                 + (f" and evaluates every pair ({g['eval_embed']:.3g} FLOPs of evaluation-set forwards)."
                    if g["eval_embed"] else " (its evaluation is not counted: no truth run given)."))
    if "agreement" in r:
        lines += ["", "Against the grid search's truth:", "",
                  *agreement_markdown(r["agreement"], r["method"], "grid search")]
    return "\n".join(lines) + "\n"


def halving_rungs_markdown(r: dict) -> list[str]:
    """Where each halving search of a search-cost result (benchmarks/search_cost.py) lost or kept the true best pair,
    and its decision signal at full training."""
    lines = ["", "Halving, rung by rung against the truth (Kendall over the rung's pairs; kept = the true best pair "
                 "survived the rung):", ""]
    for p in (p for p in r["points"] if p.get("rungs")):
        steps = "; ".join((f"prefilter ({g['pairs']} pairs, {g['samples']} held-out samples" if g["rung"] < 0 else
                           f"rung {g['rung']} ({g['pairs']} pairs, {g['samples']} samples, {g['steps']} steps")
                          + (f", lr {g['lr']:g}" if g.get("lr") else "") + f"): Kendall {g['kendall']:.2f} "
                          f"[{g['kendall_ci'][0]:.2f}, {g['kendall_ci'][1]:.2f}], "
                          + ("kept" if g["true_best_kept"] else "lost" if g["true_best_in"] else "gone before")
                          for g in p["rungs"])
        lines.append(f"- {p['method']}, {p['budget']}: {steps}")
    signal = r.get("retrieval_signal")
    if signal:
        ci = signal["ci"]
        lines += ["", f"The decision signal at full training (caption retrieval of the grid search's own connectors, "
                      f"mean R@1/5/10 both ways, on the retrieval set) against the zero-shot truth: Kendall "
                      f"{signal['kendall']:.2f} [{ci['kendall'][0]:.2f}, {ci['kendall'][1]:.2f}], regret "
                      f"{signal['regret']:.1f} [{ci['regret'][0]:.1f}, {ci['regret'][1]:.1f}] points (best by it: "
                      f"{', '.join(signal['predicted_best'])})."]
    return lines if len(lines) > 3 else []


def truth_resolution_markdown(r: dict) -> str:
    """What the truth of a search-cost result can resolve: the regret interval of a pick of its own best pair."""
    return _resolution(r.get("resolution"))


def search_series(point: dict) -> str:
    """The method a search-cost point belongs to; each proxy is its own (its budgets are sample counts)."""
    return f"proxy: {point['budget'].split()[0]}" if point["method"] == "proxy" else point["method"]


def cheapest_at_target(points: list[dict], target: dict, upper_bound: bool = True) -> dict:
    """Per method (search_series): the smallest share of the grid search's cost at which its expected regret <=
    target["regret"] and its upper 95% bound <= target["regret_upper"] (upper_bound=False: the expected regret
    alone), or None."""
    out: dict[str, float | None] = {}
    for p in points:
        good = p["regret"] <= target["regret"] and (not upper_bound or p["ci"]["regret"][1] <= target["regret_upper"])
        method = search_series(p)
        best = out.get(method)
        out[method] = (p["share"] if best is None else min(best, p["share"])) if good else best
    return out


def share_text(share: float | None) -> str:
    """A cheapest share as the tables print it."""
    return "never" if share is None else f"{share:.4f}"
