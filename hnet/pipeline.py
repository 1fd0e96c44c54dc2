"""The main job end to end (what `make demo` runs): embed -> train hypernetwork and separate baseline ->
zero-shot evaluation -> shuffled-caption control -> FLOPs table and plot."""
from __future__ import annotations

import dataclasses

from hnet.config import Config
from hnet.evaluate import evaluate_run
from hnet.report import build_table, plot_accuracy_vs_flops, render
from hnet.run import train_run


def _mean_top1(results: dict, dataset: str) -> float:
    encoders = results["datasets"][dataset]["encoders"]
    return sum(m["top1"] for m in encoders.values()) / len(encoders)


def run_pipeline(cfg: Config, control: bool = True) -> dict:
    datasets = cfg.eval.datasets
    runs, evals = {}, {}
    for method in ("hypernet", "separate"):
        run_cfg = dataclasses.replace(cfg, method=method)
        train_run(run_cfg)
        evals[method] = evaluate_run(run_cfg, run_cfg.run_dir, datasets)
        runs[method] = run_cfg.run_dir
        print(f"\n== {method}: zero-shot ==\n{(run_cfg.run_dir / 'eval.md').read_text()}")
    summary = {"datasets": {}}
    for name in datasets:
        chance = evals["hypernet"]["datasets"][name]["chance_top1"]
        summary["datasets"][name] = {"chance": chance, **{m: _mean_top1(evals[m], name) for m in evals}}
    if control:
        shuffled = dataclasses.replace(cfg, name=f"{cfg.name}_shuffled", method="hypernet",
                                       data=dataclasses.replace(cfg.data, shuffle_pairs=True))
        train_run(shuffled)
        result = evaluate_run(shuffled, shuffled.run_dir, datasets)
        for name in datasets:
            summary["datasets"][name]["shuffled_control"] = _mean_top1(result, name)
    print("\n== zero-shot top-1, mean over encoders (%) ==")
    for name, row in summary["datasets"].items():
        print(f"{name}: hypernet {row['hypernet']:.1f} | separate {row['separate']:.1f} | chance {row['chance']:.1f}"
              + (f" | shuffled-caption control {row['shuffled_control']:.1f}" if control else "")
              + f"  -> hypernet beats chance by {row['hypernet'] - row['chance']:.1f} points")
    run_dirs = list(runs.values())
    print("\n== FLOPs ==\n" + render(build_table(run_dirs)))
    plot = plot_accuracy_vs_flops(run_dirs, cfg.run_dir.parent / f"{cfg.name}_accuracy_vs_flops.png")
    print(f"plot: {plot}")
    summary["runs"] = {k: str(v) for k, v in runs.items()}
    return summary
