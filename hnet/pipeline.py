"""The main job end to end (what `make demo` runs, and benchmarks/real_zeroshot.py on real data):

embed -> separate baseline on every encoder -> hypernetwork on every encoder but `held_out` -> zero-shot eval ->
auto-decode the held-out encoder, against a separate connector trained from scratch on it -> encoder ranking ->
shuffled-caption control -> FLOPs table and accuracy-vs-FLOPs plot.
"""
from __future__ import annotations

import dataclasses

from hnet import io
from hnet.autodecode import autodecode, compare_to_separate
from hnet.config import Config, ConfigError
from hnet.evaluate import evaluate_run
from hnet.ranking import rank_encoders, ranking_markdown
from hnet.report import build_table, plot_accuracy_vs_flops, render
from hnet.run import train_run
from hnet.zoo import read_encoder_list


def mean_top1(results: dict, dataset: str) -> float:
    encoders = results["datasets"][dataset]["encoders"]
    return sum(m["top1"] for m in encoders.values()) / len(encoders)


def _variant(cfg: Config, suffix: str, method: str, **changes) -> Config:
    return dataclasses.replace(cfg, name=f"{cfg.name}{suffix}", method=method, **changes)


def _train_and_eval(cfg: Config, datasets: list[str], show: bool = True) -> dict:
    train_run(cfg)
    result = evaluate_run(cfg, cfg.run_dir, datasets)
    if show:
        print(f"\n== {cfg.run_dir.name}: zero-shot ==\n{(cfg.run_dir / 'eval.md').read_text()}")
    return result


def _curve(run_dir, encoder: str) -> list[dict]:
    """Accuracy vs training FLOPs of one encoder along a run (rows logged with train.eval_every)."""
    key = f"zeroshot_top1/{encoder}"
    return [{"flops": r["train_flops_cum"], "top1": r[key]} for r in io.read_jsonl(run_dir / "metrics.jsonl")
            if key in r]


def held_out_study(cfg: Config, specs, dataset: str) -> dict:
    """Auto-decode the held-out encoder in the hypernetwork run; train a separate connector for it alone."""
    held = next(s for s in specs if s.name == cfg.held_out)
    hyper = dataclasses.replace(cfg, method="hypernet")
    decoded = autodecode(hyper, hyper.run_dir, held.name, held.weights)
    alone = _variant(cfg, "_heldout", "separate", encoders=[{"name": held.name, "weights": held.weights}],
                     train=dataclasses.replace(cfg.train, eval_every=max(1, cfg.autodecode.eval_every)))
    train_run(alone)
    comparison = compare_to_separate(decoded, _curve(alone.run_dir, held.name))
    print(f"\n== auto-decoding {held.name} (never seen by the hypernetwork) ==\n"
          f"auto-decoded: {decoded['top1']:.1f}% top-1 for {decoded['flops']:.3g} FLOPs ({decoded['steps']} steps)\n"
          f"separate from scratch: {comparison['separate_final_top1']:.1f}% for "
          f"{comparison['separate_total_flops']:.3g} FLOPs; at equal FLOPs it had "
          f"{_pct(comparison['separate_top1_at_equal_flops'])}; it first matched the auto-decoded accuracy after "
          f"{_sci(comparison['separate_flops_to_equal_top1'])} FLOPs; "
          f"FLOPs ratio (full baseline / auto-decoding) x{comparison['separate_total_flops_ratio']:.1f}")
    return {"encoder": held.name, **comparison}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}%"


def _sci(x: float | None) -> str:
    return "never" if x is None else f"{x:.3g}"


def run_pipeline(cfg: Config, control: bool = True) -> dict:
    specs = read_encoder_list(cfg.encoders, cfg.image_weights)
    names = [s.name for s in specs]
    if cfg.held_out and cfg.held_out not in names:
        raise ConfigError(f"held_out: '{cfg.held_out}' is not one of the configured encoders")
    dataset = cfg.eval.datasets[0]
    separate = _variant(cfg, "", "separate")
    evals = {"separate": _train_and_eval(separate, cfg.eval.datasets)}
    seen = [{"name": s.name, "weights": s.weights} for s in specs if s.name != cfg.held_out]
    hyper = _variant(cfg, "", "hypernet", encoders=seen)
    evals["hypernet"] = _train_and_eval(hyper, cfg.eval.datasets)
    summary: dict = {"datasets": {}}
    for name in cfg.eval.datasets:
        summary["datasets"][name] = {"chance": evals["hypernet"]["datasets"][name]["chance_top1"],
                                     **{m: mean_top1(evals[m], name) for m in evals}}
    if cfg.held_out:
        summary["held_out"] = held_out_study(hyper, specs, dataset)
        evals["hypernet"] = evaluate_run(hyper, hyper.run_dir, cfg.eval.datasets)
    ranking = rank_encoders(hyper.run_dir, separate.run_dir, dataset)
    summary["ranking"] = {k: ranking[k] for k in ("spearman", "kendall", "top1_agreement", "flops_ratio")}
    print("\n" + ranking_markdown(ranking))
    if control:
        shuffled = _variant(hyper, "_shuffled", "hypernet", data=dataclasses.replace(cfg.data, shuffle_pairs=True),
                            train=dataclasses.replace(cfg.train, eval_every=0))
        result = _train_and_eval(shuffled, cfg.eval.datasets, show=False)
        for name in cfg.eval.datasets:
            summary["datasets"][name]["shuffled_control"] = mean_top1(result, name)
    _print_summary(summary, control)
    run_dirs = [hyper.run_dir, separate.run_dir]
    print("\n== FLOPs ==\n" + render(build_table(run_dirs)))
    curves = run_dirs + ([_variant(cfg, "_heldout", "separate").run_dir] if cfg.held_out else [])
    summary["plot"] = str(plot_accuracy_vs_flops(curves, cfg.run_dir.parent / f"{cfg.name}_accuracy_vs_flops.png"))
    print(f"plot: {summary['plot']}")
    summary["runs"] = {"hypernet": str(hyper.run_dir), "separate": str(separate.run_dir)}
    summary["by_encoder"] = {m: {n: r["top1"] for n, r in evals[m]["datasets"][dataset]["encoders"].items()}
                             for m in evals}
    return summary


def _print_summary(summary: dict, control: bool) -> None:
    print("\n== zero-shot top-1, mean over encoders (%) ==")
    for name, row in summary["datasets"].items():
        print(f"{name}: hypernet {row['hypernet']:.1f} | separate {row['separate']:.1f} | chance {row['chance']:.1f}"
              + (f" | shuffled-caption control {row['shuffled_control']:.1f}" if control else "")
              + f"  -> hypernet beats chance by {row['hypernet'] - row['chance']:.1f} points")
