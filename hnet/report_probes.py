"""Tables and plots of the long-tail view (hnet.eval.longtail) and the linear probe (hnet.eval.linear_probe), as
hnet.report renders them into eval.md, eval.csv and eval/<dataset>.json (kept apart from hnet/report.py by size)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hnet import files

SEGMENTS = ("many", "medium", "few")
LONGTAIL_COLUMNS = (*(f"longtail_{s}_acc1" for s in SEGMENTS), *(f"longtail_{s}_ece" for s in SEGMENTS),
                    "longtail_log_frequency_slope")


def _fraction(value: float | None) -> float | None:
    return None if value is None else value / 100


def longtail_metrics(view: dict | None, pair: str) -> dict:
    """One pair's long-tail figures in clip_benchmark's units (fractions; the slope: accuracy fraction per unit of
    log(1 + count)); empty when the view was omitted."""
    if not view or "omitted" in view or pair not in view.get("encoders", {}):
        return {}
    m = view["encoders"][pair]
    out = {f"longtail_{s}_acc1": _fraction(m[s]["top1"]) for s in SEGMENTS}
    out |= {f"longtail_{s}_ece": _fraction(m[s]["ece"]) for s in SEGMENTS}
    return out | {"longtail_log_frequency_slope": _fraction(m["log_frequency_slope"])}


def _pct(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else f"{value:{fmt}}"


def longtail_markdown(name: str, view: dict | None) -> list[str]:
    """The long-tail table of one data set: per pair, top-1 and ECE per segment and the log-frequency slope."""
    if not view:
        return []
    if "omitted" in view:
        return [f"Long-tail view of {name}: omitted, {view['omitted']}.", ""]
    b, k = view["boundaries"], view["segment_classes"]
    head = " | ".join(f"{s} ({b[s]}: {k[s]} classes) top-1 / ECE" for s in SEGMENTS)
    lines = [f"#### {name}: long tail (classes by training-caption count; {view['source']})", "",
             f"| pair | {head} | slope (points per log(1+count)) |", "|---|" + "---:|" * 4]
    for pair, m in view["encoders"].items():
        cells = " | ".join(f"{_pct(m[s]['top1'])} / {_pct(m[s]['ece'])}" for s in SEGMENTS)
        lines.append(f"| {pair} | {cells} | {_pct(m['log_frequency_slope'], '.2f')} |")
    return lines + ["", f"Segments: many > {view['many']} training captions, medium {view['few']}..{view['many']} "
                        f"(both included), few < {view['few']}; a class occurs in a caption when its name or simple "
                        f"plural appears as whole words (case-insensitive); ECE: 15 equal-width bins.", ""]


def probe_markdown(probes: dict) -> list[str]:
    """Per labelled folder: each image encoder's linear-probe top-1 (its ceiling) beside its pairs' zero-shot."""
    lines = []
    for name, r in probes.items():
        lines += [f"### {name}: linear probe (train {r['n_train']} images, test {r['n_test']}; L2 chosen on a "
                  f"{r['val_fraction']:.0%} validation split of train)", "",
                  "| image encoder | linear probe top-1 | L2 | zero-shot top-1 (pair: top-1) |", "|---|---:|---:|---|"]
        for enc, m in r["encoders"].items():
            zs = ", ".join(f"{p}: {v:.1f}" for p, v in r["zero_shot_top1"].items() if r["pairs"][p][0] == enc)
            lines.append(f"| {enc} | {m['top1']:.1f} | {m['l2']:g} | {zs} |")
        lines.append("")
    return lines


def plot_longtail(view: dict, name: str, out: str | Path) -> Path:
    """Per-class zero-shot top-1 against log(1 + training-caption count), one colour per pair with its
    least-squares line, the segment boundaries dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.log1p(np.asarray(view["counts"], dtype=float))
    fig, ax = plt.subplots(figsize=(6, 4))
    for pair, m in view["encoders"].items():
        keep = [i for i, a in enumerate(m["per_class_top1"]) if a is not None]
        y = np.asarray([m["per_class_top1"][i] for i in keep])
        dots = ax.scatter(x[keep], y, s=10, alpha=0.6, label=f"{pair} (slope {_pct(m['log_frequency_slope'], '.2f')})")
        if m["log_frequency_slope"] is not None:
            line = np.linspace(x[keep].min(), x[keep].max(), 2)
            ax.plot(line, y.mean() + m["log_frequency_slope"] * (line - x[keep].mean()), color=dots.get_facecolor()[0])
    for bound in (view["few"], view["many"]):
        ax.axvline(np.log1p(bound), color="grey", ls="--", lw=1)
    ax.set(xlabel="log(1 + training captions naming the class)", ylabel="zero-shot top-1 (%)",
           title=f"{name}: long tail (few < {view['few']} <= medium <= {view['many']} < many)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    out = files.write_figure(out, fig)
    plt.close(fig)
    return out
