"""The report of a budgeted search (halving, hypernet-halving, proxy): its rungs, its pick, its whole cost next to
the grid search's, and its agreement with the truth."""
from __future__ import annotations

from hnet.report import agreement_markdown


def budgeted_search_markdown(r: dict) -> str:
    """The report of a halving / hypernet-halving / proxy search (hnet.experiments.budgeted_search)."""
    b, f, g = r["budget"], r["flops"], r["grid_search"]
    what = {"proxy": f"training-free proxy {b['proxy']} on {b['proxy_samples']} samples",
            "halving": f"successive halving of separate connectors (eta {b['eta']})",
            "hypernet-halving": f"successive halving, one hypernetwork per rung (eta {b['eta']})"}[r["method"]]
    lines = [f"### Pair search: {what}", ""]
    for rung in r.get("rungs") or []:
        lines.append(f"- rung {rung['rung']}: {rung['pairs']} pairs, {rung['samples']} training samples, "
                     f"{rung['steps']} steps; kept {', '.join(rung['kept'])}")
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
