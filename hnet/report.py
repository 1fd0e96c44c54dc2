"""FLOPs report: one row per run dir (from config.yaml, flops.json, metrics.jsonl, eval.json), rendered as
markdown, csv, json or LaTeX, plus an accuracy-vs-FLOPs plot."""
from __future__ import annotations

import csv
import io as pyio
import json
from pathlib import Path

import yaml

from hnet import files, runs
from hnet.config import RECALL_KS
from hnet.report_probes import LONGTAIL_COLUMNS, longtail_markdown, longtail_metrics, probe_markdown
from hnet.text_folders import text_entry_name


def _sci(x: float | None) -> str:
    return "" if x is None else f"{x:.3g}"


def run_row(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / runs.FLOPS).exists():
        raise FileNotFoundError(f"{run_dir}: no flops.json (is this a run dir?)")
    cfg = yaml.safe_load((run_dir / runs.CONFIG).read_text())
    ledger = files.read_json(run_dir / runs.FLOPS)
    phases = ledger["phases"]
    meta = files.read_json(run_dir / runs.MODEL) if (run_dir / runs.MODEL).exists() else {"names": []}
    n_enc = len(meta["names"]) or 1
    metrics = files.read_jsonl(run_dir / runs.METRICS)
    train_flops = phases["train"]["flops"] + phases["autodecode"]["flops"]
    row = {"run": run_dir.name, "method": cfg["method"], "encoders": len(meta["names"]),
           "text_encoder": ", ".join(map(text_entry_name, cfg.get("text_encoders") or [cfg["text_encoder"]])),
           "connector": f"{cfg['connector']['kind']} {cfg['connector']['direction']}",
           "batch": cfg["train"]["batch_size"], "steps": phases["train"]["steps"],
           "epochs": round(metrics[-1]["epoch"], 2) if metrics else 0,
           "flops_per_step": phases["train"]["parts"].get("total"), "flops_per_encoder": train_flops / n_enc,
           "train_flops": train_flops, "total_flops": ledger["total_flops_without_embed"],
           "total_flops_with_embed": ledger["total_flops"], "zeroshot_top1": None, "vs_separate": ""}
    if (run_dir / runs.EVAL).exists():
        evals = files.read_json(run_dir / runs.EVAL)
        means = {name: runs.pair_top1(evals, name) for name in evals["datasets"]}
        row["zeroshot_top1"] = {name: sum(top1.values()) / len(top1) for name, top1 in means.items()}
    return row


def grid_search_row(run_dir: Path, row: dict) -> dict | None:
    """For a search run (scripts/search.py): the estimated full grid search over the same zoo, as a row."""
    path = Path(run_dir) / runs.SEARCH
    if not path.exists():
        return None
    grid = files.read_json(path)["grid_search"]
    return {**{k: None for k in row}, "run": f"grid search for {row['run']} (APE, estimated)",
            "method": "separate (estimated)",
            "encoders": row["encoders"], "text_encoder": row["text_encoder"], "connector": row["connector"],
            "batch": grid.get("batch", row["batch"]), "steps": grid["steps"],
            "flops_per_encoder": grid["train"] / row["encoders"],
            "train_flops": grid["train"], "total_flops": grid["total"],
            "total_flops_with_embed": grid["total_with_embed"], "vs_separate": ""}


def build_table(run_dirs: list[str | Path]) -> list[dict]:
    rows = []
    for run_dir in run_dirs:
        rows.append(run_row(run_dir))
        grid = grid_search_row(run_dir, rows[-1])
        if grid:
            rows.append(grid)
    separate = [r for r in rows if r["method"] == "separate"]
    for row in rows:  # the baseline: a separate run over the same number of encoders, else the first one
        base = next((s for s in separate if s["encoders"] == row["encoders"]), separate[0] if separate else None)
        if base and row is not base and row["train_flops"]:
            ratio = base["train_flops"] / row["train_flops"]
            row["vs_separate"] = f"x{ratio:.1f} cheaper" if ratio >= 1 else f"x{1 / ratio:.1f} costlier"
    return rows


def _cell(row: dict, col: str) -> str:
    value = row[col]
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:.1f}" for k, v in value.items())
    if isinstance(value, float) or (isinstance(value, int) and "flops" in col):
        return _sci(value)
    return "" if value is None else str(value)


def render(rows: list[dict], fmt: str = "md") -> str:
    """Rows (dicts with the same keys, in column order) as md, csv, json or LaTeX."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    columns = list(rows[0]) if rows else []
    if fmt == "csv":
        buf = pyio.StringIO()
        writer = csv.writer(buf)
        writer.writerow(columns)
        writer.writerows([[_cell(r, c) for c in columns] for r in rows])
        return buf.getvalue()
    if fmt == "latex":
        lines = [r"\begin{tabular}{" + "l" * len(columns) + "}", " & ".join(c.replace("_", r"\_") for c in columns)
                 + r" \\ \hline"]
        lines += [" & ".join(_cell(r, c).replace("_", r"\_").replace("%", r"\%") for c in columns) + r" \\"
                  for r in rows]
        return "\n".join(lines + [r"\end{tabular}"])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_accuracy_vs_flops(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Zero-shot top-1 against cumulative training FLOPs: per run the mean over encoders at each mid-run
    evaluation (train.eval_every), plus every auto-decoding curve stored in the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for run in map(Path, run_dirs):
        points = [(r["train_flops_cum"], r["zeroshot_top1"]) for r in files.read_jsonl(run / runs.METRICS)
                  if "zeroshot_top1" in r]
        if points:
            ax.plot(*zip(*points), marker="o", ms=3, label=f"{run_row(run)['method']} ({run.name}), mean")
        for path in sorted((run / runs.AUTODECODE).glob("*.json")):
            curve = [p for p in files.read_json(path)["curve"] if p["flops"] > 0]  # log axis: no step-0 point
            ax.plot([p["flops"] for p in curve], [p["top1"] for p in curve], marker="s", ms=3,
                    label=f"autodecode {files.read_json(path)['encoder']}")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (forward + backward)")
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = files.write_figure(out, fig, dpi=120)
    plt.close(fig)
    return out


def seed_setting_table(batch: int = 2 ** 14, samples: int = 595_375) -> list[dict]:
    """Per-step and per-epoch FLOPs of single linear connectors in the research setting, computed by the tool."""
    import torch

    from hnet.config import HypernetConfig
    from hnet.flops import train_step_flops
    from hnet.models.connectors import ConnectorShape
    from hnet.models.stitch import StitchModel

    rows = []
    for d_in, d_out in ((768, 384), (768, 768), (1024, 1024)):
        shape = ConnectorShape("linear", "image_to_text", d_in, d_out)
        with torch.device("meta"):
            model = StitchModel("separate", shape, [d_in], HypernetConfig())
        step = train_step_flops(model, 1, batch)
        rows.append({"connector": f"linear {d_in}->{d_out}", "batch": batch, "flops_per_step": step["total"],
                     "connector_flops": step["connectors"], "logits_loss_flops": step["logits_loss"],
                     "steps_per_epoch": samples // batch,
                     "flops_per_epoch": step["total"] * (samples // batch)})
    return rows



def plot_reliability(dataset_result: dict, name: str, out: str | Path) -> Path:
    """Reliability diagram: accuracy vs confidence per bin, one line per encoder, with the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    for enc, m in dataset_result["encoders"].items():
        bins = m["reliability"]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker=".",
                label=f"{enc} (ECE {m['ece']:.1f})")
    ax.set(xlabel="confidence", ylabel="accuracy", title=f"{name}: reliability", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=6)
    fig.tight_layout()
    out = files.write_figure(out, fig)
    plt.close(fig)
    return out


# ---- reports: clip_benchmark-style JSON per (run, data set), CSV and markdown over data sets and encoders --------

CSV_COLUMNS = ("run", "dataset", "task", "encoder", "n", "acc1", "acc5", "mean_per_class_recall", "ece", "nll",
               *(f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in RECALL_KS), *LONGTAIL_COLUMNS)


def _clip_benchmark_metrics(m: dict) -> dict:
    """Our percentages as clip_benchmark's keys and units (fractions in [0, 1])."""
    return {"acc1": m["top1"] / 100, "acc5": m["top5"] / 100,
            "mean_per_class_recall": m["mean_per_class_recall"] / 100, "ece": m["ece"] / 100, "nll": m["nll"]}


def _retrieval_metrics(r: dict) -> dict:
    """image_retrieval = text->image, text_retrieval = image->text, as clip_benchmark names them."""
    out = {f"image_retrieval_recall@{k}": r["text_to_image"][f"R@{k}"] / 100 for k in RECALL_KS}
    out.update({f"text_retrieval_recall@{k}": r["image_to_text"][f"R@{k}"] / 100 for k in RECALL_KS})
    return out


def dataset_reports(run_dir: Path, results: dict) -> dict[str, dict]:
    """{file stem: content} of the per-data-set JSON files."""
    run = Path(run_dir).name
    reports = {}
    for name, r in results["datasets"].items():
        reports[name] = {"run": run, "dataset": name, "task": "zeroshot_classification", "path": r.get("path", ""),
                         "layout": r.get("layout", ""), "n": r.get("n"), "text_encoder": results["text_encoder"],
                         "templates": r.get("templates"), "n_templates": r.get("n_templates"),
                         "metrics": {enc: _clip_benchmark_metrics(m) | longtail_metrics(r.get("longtail"), enc)
                                     for enc, m in r["encoders"].items()}}
    for name, r in results.get("linear_probe", {}).items():  # each image encoder's ceiling on the test split
        reports[f"linear_probe_{name}"] = {"run": run, "dataset": name, "task": "linear_probe", "n": r["n_test"],
                                           "metrics": {e: _clip_benchmark_metrics(m) for e, m in r["encoders"].items()}}
    if results.get("retrieval"):
        first = next(iter(results["retrieval"].values()))
        reports["retrieval"] = {"run": run, "dataset": first.get("dataset", "retrieval"), "task": "zeroshot_retrieval",
                                "n": first["n"], "n_texts": first.get("n_texts", first["n"]),
                                "text_encoder": results["text_encoder"],
                                "metrics": {enc: _retrieval_metrics(r) for enc, r in results["retrieval"].items()}}
    return reports


def csv_rows(reports: dict[str, dict]) -> list[dict]:
    return [{"run": rep["run"], "dataset": rep["dataset"], "task": rep["task"], "encoder": enc, "n": rep["n"], **m}
            for rep in reports.values() for enc, m in rep["metrics"].items()]


def csv_table(rows: list[dict]) -> str:
    def cell(v):
        return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
    lines = [",".join(CSV_COLUMNS)]
    lines += [",".join(cell(row.get(c)) for c in CSV_COLUMNS) for row in rows]
    return "\n".join(lines) + "\n"


def write_reports(run_dir: Path, results: dict) -> None:
    reports = dataset_reports(run_dir, results)
    for stem, report in reports.items():
        files.write_json(Path(run_dir) / runs.EVAL_REPORTS / f"{stem}.json", report)
    files.write_text(Path(run_dir) / runs.EVAL_CSV, csv_table(csv_rows(reports)))
    files.write_text(Path(run_dir) / runs.EVAL_MD, markdown_table(results))


def markdown_table(results: dict) -> str:
    lines = []
    for enc, r in results.get("retrieval", {}).items():
        i2t, t2i = r["image_to_text"], r["text_to_image"]
        lines.append(f"retrieval {enc} (n={r['n']} images, {r.get('n_texts', r['n'])} captions): image->text "
                     + " ".join(f"{k} {v:.1f}" for k, v in i2t.items())
                     + " | text->image " + " ".join(f"{k} {v:.1f}" for k, v in t2i.items()))
    for name, r in results["datasets"].items():
        lines += [f"### {name} (zero-shot, {r.get('layout', '')} layout, templates: {r.get('templates')}, "
                  f"chance {r['chance_top1']:.1f}%)", "",
                  "| encoder | top-1 | top-5 | mean per-class recall | NLL | ECE |", "|---|---:|---:|---:|---:|---:|"]
        for enc, m in r["encoders"].items():
            lines.append(f"| {enc} | {m['top1']:.1f} | {m['top5']:.1f} | {m['mean_per_class_recall']:.1f} "
                         f"| {m['nll']:.3f} | {m['ece']:.1f} |")
        lines += ["", *longtail_markdown(name, r.get("longtail"))]
    return "\n".join(lines + probe_markdown(results.get("linear_probe", {})))
