"""The main job end to end (what `make demo` runs, and benchmarks/real_zoo.py on real data):

embed -> separate baseline on every encoder (+ zero-shot eval) -> hypernetwork on every encoder but `held_out` ->
auto-decode the held-out encoder, against a separate connector trained from scratch on it -> zero-shot eval of the
hypernetwork run (once, auto-decoded encoder included) -> encoder ranking -> shuffled-caption control -> FLOPs
table and accuracy-vs-FLOPs plot.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from hnet import files, runs
from hnet.config import Config, ConfigError, dataset_name
from hnet.eval.evaluate import evaluate_run
from hnet.eval.ranking import rank_encoders
from hnet.experiments.autodecode import autodecode, compare_to_separate
from hnet.experiments.budgeted_search import run_budgeted_search
from hnet.experiments.search import has_budget, run_search, train_truth
from hnet.experiments.train_run import train_run
from hnet.models.encoders import TEXT_PREFIX, read_encoder_list
from hnet.models.pairs import held_labels, resolve_pairs
from hnet.report import build_table, plot_accuracy_vs_flops, render
from hnet.report_ranking import budgeted_search_markdown, ranking_markdown, search_markdown


def mean_top1(results: dict, dataset: str, names: list[str] | None = None) -> float:
    top1 = runs.pair_top1(results, dataset, names)
    return sum(top1.values()) / len(top1)


def variant(cfg: Config, suffix: str, method: str, **changes) -> Config:
    """cfg as another run of the same job: named NAME+suffix, with `method` and `changes`."""
    return dataclasses.replace(cfg, name=f"{cfg.name}{suffix}", method=method, **changes)


def grid_config(cfg: Config) -> Config:
    """The grid search: one separate connector (APE) for every pair of the zoo, at cfg's own seed."""
    return variant(cfg, "", "separate", held_out_pairs=[])


def _train_and_eval(cfg: Config, datasets: list[str], show: bool = True, train: bool = True) -> dict:
    if train:
        train_run(cfg)
    result = evaluate_run(cfg, cfg.run_dir, datasets)
    if show:
        print(f"\n== {cfg.run_dir.name}: zero-shot ==\n{(cfg.run_dir / 'eval.md').read_text()}")
    return result


def _curve(run_dir, key: str = "zeroshot_top1") -> list[dict]:
    """Accuracy vs training FLOPs along a run (rows logged with train.eval_every): of one pair
    (`zeroshot_top1/NAME`), or the mean over the run's pairs."""
    rows = [r for r in files.read_jsonl(run_dir / runs.METRICS) if key in r]
    halves = lambda r: {f"top1_{h}": r[f"{key}_{h}"] for h in ("val", "test") if f"{key}_{h}" in r}
    return [{"flops": r["train_flops_cum"], "top1": r[key], **halves(r)} for r in rows]


def held_out_study(cfg: Config, specs, dataset: str) -> dict:
    """Auto-decode the held-out encoder in the hypernetwork run; train a separate connector for it alone."""
    held = next(s for s in specs if s.name == cfg.held_out)
    hyper = dataclasses.replace(cfg, method="hypernet")
    decoded = autodecode(hyper, hyper.run_dir, held.name, held.weights)
    alone = variant(cfg, "_heldout", "separate", encoders=[{"name": held.name, "weights": held.weights}],
                     held_out_pairs=[],
                     train=dataclasses.replace(cfg.train, eval_every=max(1, cfg.autodecode.eval_every)))
    train_run(alone)
    # the mean over the held-out encoder's pairs (one per text encoder) on both sides
    comparison = compare_to_separate(decoded, _curve(alone.run_dir))
    comparison.update(flops_with_embed(decoded, alone.run_dir))
    print(f"\n== auto-decoding {held.name} (never seen by the hypernetwork) ==")
    if "validated" in comparison:
        print(validated_lines(comparison["validated"]))
    print(f"against the whole separate run (secondary): auto-decoded {decoded['top1']:.1f}% top-1 (all images) for "
          f"{decoded['flops']:.3g} FLOPs ({decoded['steps']} steps); separate from scratch "
          f"{comparison['separate_final_top1']:.1f}% for {comparison['separate_total_flops']:.3g} FLOPs, at equal "
          f"FLOPs "
          f"{_pct(comparison['separate_top1_at_equal_flops'])}, first matched the auto-decoded accuracy after "
          f"{_sci(comparison['separate_flops_to_equal_top1'])} FLOPs; FLOPs ratio separate / auto-decoding: training "
          f"only {_times(comparison['flops_ratio'])}, with each side's encoder forwards "
          f"{_times(comparison['flops_ratio_with_embed'])}")
    return {"encoder": held.name, **comparison}


def flops_with_embed(decoded: dict, separate_run) -> dict:
    """Auto-decoding vs the separate connector, training only and with the embedding each side needs.

    Training only: the separate run's train phase / the decoding steps (+ fine-tuning when there was some).
    With embedding: the separate connector trains on every cached sample, so it pays the held-out encoder over the
    whole cache; auto-decoding pays it over the samples its budget used. The captions' text embeddings are left out
    on both sides (auto-decoding reuses the hypernetwork run's; a separate connector would reuse them too).
    """
    phases = files.read_json(separate_run / runs.FLOPS)["phases"]
    separate = phases["train"]["flops"]
    decoding = decoded["flops"] + decoded.get("finetune", {}).get("flops", 0)
    # the captions' text embeddings are left out on both sides: auto-decoding reuses the hypernetwork run's
    image_embed = sum(p for name, p in phases["embed"]["parts"].items() if not name.startswith(TEXT_PREFIX))
    with_embed = {"separate": separate + image_embed, "autodecode": decoding + decoded["embed"]["flops"]}
    return {"flops_ratio": separate / decoding if decoding else None,
            "flops_ratio_with_embed": with_embed["separate"] / with_embed["autodecode"],
            "separate_flops_with_embed": with_embed["separate"],
            "autodecode_flops_with_embed": with_embed["autodecode"],
            "autodecode_embedded_samples": decoded["embed"]["samples"],
            "separate_embedded_samples": phases["embed"]["samples"]}


def validated_lines(v: dict) -> str:
    """The lead comparison: each curve's point chosen on validation images, reported on test images."""
    a, b = v["autodecode"], v["separate_best"]
    ratio = v["flops_ratio_at_equal_accuracy"]
    return (f"points chosen on validation images (evaluation half A), scored on test images (half B):\n"
            f"auto-decoded: {a['top1_test']:.1f}% test top-1 at step {a['step']} ({a['flops']:.3g} training FLOPs); "
            f"separate from scratch, best stopping point: {b['top1_test']:.1f}% at {b['flops']:.3g} FLOPs\n"
            f"at the auto-decoding's FLOPs the separate connector had "
            f"{_pct(v['separate_test_top1_at_autodecode_flops'])}; at the separate connector's best FLOPs the "
            f"auto-decoding had "
            f"{_pct(v['autodecode_test_top1_at_separate_best_flops'])}; the separate connector reached the "
            f"auto-decoded validation accuracy after {_sci(v['separate_flops_to_autodecode_accuracy'])} FLOPs"
            + ("" if ratio is None else f" (x{ratio:.2f} of the auto-decoding's)"))


def _times(x: float | None) -> str:
    return "n/a (no decoding steps)" if x is None else f"x{x:.1f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}%"


def _sci(x: float | None) -> str:
    return "never" if x is None else f"{x:.3g}"


def run_pipeline(cfg: Config, control: bool = True) -> dict:
    specs = read_encoder_list(cfg.encoders, cfg.image_weights)
    names = [s.name for s in specs]
    if cfg.held_out and cfg.held_out not in names:
        raise ConfigError(f"held_out: '{cfg.held_out}' is not one of the configured encoders")
    dataset = dataset_name(cfg.eval.datasets[0])
    resolve_pairs([n for n in names if n != cfg.held_out], cfg.texts, cfg.held_out_pairs)  # before any training
    separate = grid_config(cfg)
    evals = {"separate": _train_and_eval(separate, cfg.eval.datasets)}
    seen = [{"name": s.name, "weights": s.weights} for s in specs if s.name != cfg.held_out]
    hyper = variant(cfg, "", "hypernet", encoders=seen)
    train_run(hyper)
    summary: dict = {"datasets": {}}
    if cfg.held_out:  # before the evaluation, so that the run is evaluated once, auto-decoded encoder included
        summary["held_out"] = held_out_study(hyper, specs, dataset)
    evals["hypernet"] = _train_and_eval(hyper, cfg.eval.datasets, train=False)
    meta = files.read_json(hyper.run_dir / runs.MODEL)
    shared = runs.trained_pairs(meta)  # like for like: the pairs both runs trained
    for name in map(dataset_name, cfg.eval.datasets):
        summary["datasets"][name] = {"chance": evals["hypernet"]["datasets"][name]["chance_top1"],
                                     **{m: mean_top1(evals[m], name, shared) for m in evals}}
    truth = train_truth(cfg, list(dict.fromkeys([cfg.eval.datasets[0], cfg.search.dataset or cfg.eval.datasets[0]])))
    ranking = rank_encoders(hyper.run_dir, truth, dataset)
    summary["ranking"] = {k: ranking[k] for k in ("spearman", "kendall", "top1_hit", "regret", "top3_recall", "ci",
                                                  "ceiling", "halves", "predicted_best", "true_best", "flops_ratio")}
    print("\n" + ranking_markdown(ranking))
    if control:
        shuffled = variant(hyper, "_shuffled", "hypernet", data=dataclasses.replace(cfg.data, shuffle_pairs=True),
                            train=dataclasses.replace(cfg.train, eval_every=0))
        result = _train_and_eval(shuffled, cfg.eval.datasets, show=False)
        for name in map(dataset_name, cfg.eval.datasets):
            summary["datasets"][name]["shuffled_control"] = mean_top1(result, name)
    if cfg.held_out_pairs:
        summary["held_out_pairs"] = unseen_pairs(evals, dataset, held_labels(cfg.held_out_pairs, len(cfg.texts) > 1),
                                                 shared)
    _print_summary(summary, control)
    run_dirs = [hyper.run_dir, separate.run_dir]
    hypernet_search = dataclasses.replace(cfg.search, method="hypernet", lrs=[], prefilter="")  # those: halving's
    search = run_search(variant(cfg, "", cfg.method, search=hypernet_search), truth) if has_budget(cfg) else None
    halving = run_budgeted_search(variant(cfg, "", cfg.method, search=dataclasses.replace(
        cfg.search, method="halving")), truth) if has_budget(cfg) else None
    print("\n== FLOPs ==\n" + render(build_table(run_dirs + ([Path(search["run"])] if search else []))))
    curves = run_dirs + ([variant(cfg, "_heldout", "separate").run_dir] if cfg.held_out else [])
    summary["plot"] = str(plot_accuracy_vs_flops(curves, cfg.run_dir.parent / f"{cfg.name}_accuracy_vs_flops.png"))
    print(f"plot: {summary['plot']}")
    summary["runs"] = {"hypernet": str(hyper.run_dir), "separate": str(separate.run_dir)}
    summary["by_encoder"] = {m: runs.pair_top1(evals[m], dataset) for m in evals}
    if search:
        summary["search"] = {k: search[k] for k in ("ranking", "ratio", "agreement", "flops", "grid_search")}
        print("\n== search: the best encoder at the search budget, against the grid search ==\n"
              + search_markdown(search))
    if halving:
        summary["halving"] = {k: halving[k] for k in ("best", "rungs", "ratio", "agreement", "flops", "grid_search")}
        print("\n== search by successive halving (separate connectors, decided on held-out training samples) ==\n"
              + budgeted_search_markdown(halving))
    return summary


def unseen_pairs(evals: dict, dataset: str, held: list[str], trained: list[str]) -> dict:
    """Top-1 of each held-out pair: generated by the hypernetwork from encoders it saw in other pairs, against the
    separate connector trained on the pair."""
    top1 = {m: runs.pair_top1(evals[m], dataset) for m in evals}
    out = {}
    for name in held:
        out[name] = {"hypernet_untrained": top1["hypernet"][name], "separate": top1["separate"][name]}
        print(f"\n== pair never trained by the hypernetwork: {name} ==\ngenerated from its encoders' vectors: "
              f"{out[name]['hypernet_untrained']:.1f}% top-1 | its separate connector: {out[name]['separate']:.1f}% "
              f"| mean over the pairs the hypernetwork trained: {mean_top1(evals['hypernet'], dataset, trained):.1f}%")
    return out


def _print_summary(summary: dict, control: bool) -> None:
    print("\n== zero-shot top-1, mean over the encoders both runs trained (%) ==")
    for name, row in summary["datasets"].items():
        print(f"{name}: hypernet {row['hypernet']:.1f} | separate {row['separate']:.1f} | chance {row['chance']:.1f}"
              + (f" | shuffled-caption control {row['shuffled_control']:.1f}" if control else "")
              + f"  -> hypernet beats chance by {row['hypernet'] - row['chance']:.1f} points")
