"""benchmarks/search_cost.py: every method's cost as a share of the grid search's whole cost, scored against a truth
from seeds no method uses, on evaluation images the method did not see; runs reused only for the same config."""
import dataclasses
import types

import pytest

from hnet import files, runs
from hnet.config import load_config
from hnet.eval.ranking import scores_agreement
from hnet.experiments.search import TRUTH_SEED_OFFSET
from hnet.experiments.train_run import trained_and_evaluated
from hnet.provenance import config_digest
from hnet.report_ranking import halving_rungs_markdown
from tests.conftest import load_benchmark, tiny_overrides, with_train

TINY_BUDGETS = {"ape": [(4, 100)], "hypernet": [(4, 0, 100)], "halving": [40], "proxy": [60],
                "proxies": ["linear_cka"], "val": 40, "rung_steps": 2, "lrs": [1e-6, 0.05]}


def test_a_run_of_other_settings_is_not_reused(tiny_cfg, monkeypatch):
    from hnet.experiments import train_run as train_run_module

    cfg = with_train(tiny_cfg, max_steps=2)
    assert trained_and_evaluated(cfg, ["demo"]) > 0.0
    assert runs.finished(cfg.run_dir, config_digest(cfg))
    assert not runs.finished(cfg.run_dir, config_digest(with_train(cfg, lr=cfg.train.lr * 2)))
    assert not runs.finished(cfg.run_dir, config_digest(with_train(cfg, max_steps=3)))
    assert trained_and_evaluated(cfg, ["demo"]) == 0.0  # the same settings: reused
    other = with_train(cfg, max_steps=3)  # the same name and run folder, other settings: trained again
    monkeypatch.setattr(train_run_module, "evaluate_run", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # killed between training and evaluation
        trained_and_evaluated(other, ["demo"])
    assert not runs.finished(other.run_dir, config_digest(other))  # the first settings' eval.json is not its own
    monkeypatch.undo()
    assert trained_and_evaluated(other, ["demo"]) > 0.0 and runs.finished(other.run_dir, config_digest(other))


def test_every_method_is_charged_what_it_computes_against_the_grid_searchs_whole_cost(tiny_root, tmp_path):
    bench_module = load_benchmark("search_cost")
    cfg = load_config(None, tiny_overrides(tiny_root) + [
        "text_encoders=[all-MiniLM-L6-v2, all-MiniLM-L6-v2@layers=3]", f"data.cache_dir={tmp_path}/cache",
        f"out_root={tmp_path}", "train.eval_every=0", "search.truth_seeds=2"])
    bench = bench_module.Bench("tiny", cfg, TINY_BUDGETS)
    points = {(p["method"], p["budget"]): p for p in bench.run()}
    # grid, APE, hypernet, 2 halving (+ 2 with their lr tuned, + 1 prefiltered), 1 proxy, prior, random: one point each
    assert len(points) == 11
    full = bench.full["total_with_embed"]
    assert points["grid search (APE, own seed)", "full"]["share"] == 1.0
    assert len(bench.truth_runs) == 2 and bench.truth.shape[0] == 2
    # the truth is not the grid search at the methods' seed: its own seeds, so its own init and data order
    grid_hits = runs.read_hits(bench.grid_run, bench.dataset, bench.names)
    assert all((bench.truth[i] != grid_hits).any() for i in range(2))
    grid_eval = bench.full["eval_embed"]
    assert grid_eval > 0
    for p in points.values():
        assert p["share"] == pytest.approx(p["cost"]["total_with_embed"] / full)
        assert "ci" in p and p["ci"]["regret"][0] <= p["regret"] + 1e-9
    evaluated = [p for p in points.values() if p["method"] in ("truncated APE", "hypernet")]
    # every method that evaluates pays for the images it decides on (half A), as the grid search's own total does
    assert bench.decision_images == len(bench_module.split_halves(bench.truth.shape[2])[0])
    assert evaluated and all(p["cost"]["eval_embed"] == pytest.approx(grid_eval) for p in evaluated)
    tuned = [m + bench_module.TUNED for m in ("halving", "hypernet-halving")]
    tuned += ["halving, linear_cka" + bench_module.FILTERED]
    blind = [p for p in points.values() if p["method"] in ("halving", "hypernet-halving", "proxy", *tuned)]
    assert len(blind) == 6 and all(p["cost"]["eval_embed"] == 0 and p["cost"]["embed"] > 0 for p in blind)
    assert all(0 < p["share"] < 1 for p in blind)

    # deciding on a random quarter of the images: the grid search (the denominator) and every evaluating method pay
    # for evaluating that quarter only, and are scored on it (the runs are reused: same configs)
    n = bench.truth.shape[2]
    part = bench_module.Bench("tiny", cfg, TINY_BUDGETS | {"decision_images": n // 4})
    assert part.full["eval_embed"] == pytest.approx(grid_eval / bench.decision_images * (n // 4))
    ape = part.evaluated("truncated APE", "4 steps, 100 samples", part.budget_run("ape_s4_m100", "separate", 4, 100))
    assert ape["cost"]["eval_embed"] == pytest.approx(part.full["eval_embed"])
    assert part.split(grid_hits)["halves"]["method"] == n // 4


def test_truth_seeds_are_apart_from_every_methods_seed(tiny_cfg):
    from hnet.experiments.search import truth_configs

    seeds = [t.train.seed for t in truth_configs(dataclasses.replace(tiny_cfg))]
    assert seeds == [tiny_cfg.train.seed + TRUTH_SEED_OFFSET + i for i in range(tiny_cfg.search.truth_seeds)]


def test_cheapest_share_needs_the_interval_too_unless_told_otherwise():
    from hnet.report_ranking import cheapest_at_target

    target = load_benchmark("search_cost").TARGET
    point = lambda m, share, regret, upper: {"method": m, "share": share, "regret": regret,
                                             "ci": {"regret": [0.0, upper]}}
    points = [point("a", 0.05, 0.5, 3.0), point("a", 0.2, 0.5, 1.5), point("b", 0.01, 2.0, 2.0),
              point("c", 0.03, 1.0, 2.0), point("c", 0.01, 0.0, 0.0)]
    assert cheapest_at_target(points, target) == {"a": 0.2, "b": None, "c": 0.01}
    assert cheapest_at_target(points, target, upper_bound=False) == {"a": 0.05, "b": None, "c": 0.01}
    proxies = [point("proxy", 0.01, 5.0, 9.0) | {"budget": "cka 250"},
               point("proxy", 0.02, 0.0, 1.0) | {"budget": "knn 500"}]
    assert cheapest_at_target(proxies, target) == {"proxy: cka": None, "proxy: knn": 0.02}  # each proxy its own


def test_halving_says_at_which_rung_it_lost_the_true_best_and_how_its_signal_agrees_at_full_training(
        tiny_root, tmp_path, monkeypatch):
    bench_module = load_benchmark("search_cost")
    cfg = load_config(None, tiny_overrides(tiny_root) + [
        "text_encoders=[all-MiniLM-L6-v2, all-MiniLM-L6-v2@layers=3]", f"data.cache_dir={tmp_path}/cache",
        f"out_root={tmp_path}", "train.eval_every=0", "search.truth_seeds=2"])
    bench = bench_module.Bench("tiny", cfg, TINY_BUDGETS)
    truth = bench.truth_b
    order = sorted(truth, key=truth.get)  # worst to best on half B
    best, rest = order[-1], [n for n in order if truth[n] < max(truth.values())]  # rest: below every tied best
    kept = bench.rung_figures({"rung": 0, "samples": 40, "steps": 2, "scores": {n: truth[n] for n in order},
                               "kept": [best]})
    assert kept["kendall"] == pytest.approx(1.0) and kept["true_best_in"] and kept["true_best_kept"]
    assert kept["pairs"] == len(order)
    lost = bench.rung_figures({"rung": 0, "samples": 40, "steps": 2, "scores": {n: -truth[n] for n in order},
                               "kept": rest[:1]})
    assert lost["kendall"] == pytest.approx(-1.0) and lost["true_best_in"] and not lost["true_best_kept"]
    gone = bench.rung_figures({"rung": 1, "samples": 80, "steps": 4, "scores": {n: truth[n] for n in rest[-3:]},
                               "kept": rest[-1:]})
    assert not gone["true_best_in"] and not gone["true_best_kept"]
    line = halving_rungs_markdown({"points": [{"method": "halving", "budget": "r0 40", "rungs": [kept, gone]}]})[-1]
    assert "rung 0 (6 pairs, 40 samples, 2 steps): Kendall 1.00" in line and "], kept; rung 1" in line
    assert line.endswith("gone before")
    line = halving_rungs_markdown({"points": [{"method": "halving", "budget": "r0 40", "rungs": [lost]}]})[-1]
    assert "Kendall -1.00" in line and line.endswith("lost")

    # the truth's resolution is the interval any pick of the true best pair gets: no method can show a lower bound
    pick = {n: float(truth[n] == truth[best]) for n in order}  # the true best (all of them, if tied)
    assert bench.resolution()["ci"] == scores_agreement(pick, bench.truth, bench.names)["ci"]["regret"]
    assert bench.resolution()["regret"] == pytest.approx(0.0, abs=1e-9) and bench.resolution()["ci"][1] > 0.0

    # a prefilter that keeps a single pair: its cut is still reported, as the only rung
    alone = bench.searched("halving", "r0 40 alone", rung_samples=40, rung_steps=2, val_samples=40, eta=4, lrs=[],
                           prefilter="mutual_knn")
    assert [g["rung"] for g in alone["rungs"]] == [-1] and alone["rungs"][0]["pairs"] == len(order)

    assert bench.retrieval_signal() is None  # no signal config: not measured
    run = tmp_path / "ape_with_retrieval"
    trained = []
    monkeypatch.setattr(bench_module, "trained_and_evaluated", lambda c, datasets: trained.append(c.run_dir))
    monkeypatch.setattr(bench_module, "grid_config", lambda c: types.SimpleNamespace(run_dir=run, eval=c.eval))
    recall = lambda v: {"R@1": v, "R@5": v, "R@10": v}
    # the retrieval ranking puts the truth's worst pair first, the rest in the truth's order
    signal = {n: truth[n] for n in order} | {order[0]: 1000.0}
    files.write_json(run / runs.EVAL, {"retrieval": {n: {"image_to_text": recall(v), "text_to_image": recall(v)}
                                                     for n, v in signal.items()}})
    monkeypatch.setattr(bench, "signal_cfg", cfg)
    got = bench.retrieval_signal()
    assert trained == [run]  # the signal's run is made sure of (trained and evaluated when absent)
    assert got["predicted_best"] == [order[0]] and got["regret"] == pytest.approx(truth[best] - truth[order[0]])
    assert got["kendall"] == pytest.approx(bench_module.agreement(signal, truth)["kendall"])


@pytest.mark.parametrize("zoo", ["real", "demo"])
def test_render_redraws_the_committed_table_and_plot_from_the_results_file(zoo, tmp_path, monkeypatch):
    bench = load_benchmark("search_cost")
    committed = bench.RESULTS
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    (tmp_path / "search_cost.json").write_text((committed / "search_cost.json").read_text())
    bench.main(["--zoo", zoo, "--render"])
    assert (tmp_path / f"search_cost_{zoo}.md").read_text() == (committed / f"search_cost_{zoo}.md").read_text()
    assert (tmp_path / f"search_cost_{zoo}.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="no 'real' entry"):
        (tmp_path / "search_cost.json").write_text("{}")
        bench.main(["--zoo", "real", "--render"])


def test_the_plot_is_recorded_relative_to_the_repository(tmp_path):
    bench = load_benchmark("search_cost")
    assert bench.in_repo(bench.RESULTS / "search_cost_real.png") == "benchmarks/results/search_cost_real.png"
    assert bench.in_repo(tmp_path / "x.png") == str(tmp_path.resolve() / "x.png")
