"""benchmarks/search_cost.py: every method's cost as a share of the grid search's whole cost, scored against a truth
from seeds no method uses, on evaluation images the method did not see; runs reused only for the same config."""
import dataclasses

import pytest

from hnet import runs
from hnet.config import load_config
from hnet.eval.evaluate import evaluate_run
from hnet.experiments.search import TRUTH_SEED_OFFSET
from hnet.experiments.train_run import train_run
from hnet.provenance import config_digest
from tests.conftest import load_benchmark, tiny_overrides, with_train

TINY_BUDGETS = {"ape": [(4, 100)], "hypernet": [(4, 0, 100)], "halving": [40], "proxy": [60],
                "proxies": ["linear_cka"], "val": 40, "rung_steps": 2}


def test_a_run_of_other_settings_is_not_reused(tiny_cfg):
    cfg = with_train(tiny_cfg, max_steps=2)
    train_run(cfg)
    evaluate_run(cfg, cfg.run_dir, ["demo"])
    assert runs.finished(cfg.run_dir, config_digest(cfg))
    assert not runs.finished(cfg.run_dir, config_digest(with_train(cfg, lr=cfg.train.lr * 2)))
    assert not runs.finished(cfg.run_dir, config_digest(with_train(cfg, max_steps=3)))


def test_every_method_is_charged_what_it_computes_against_the_grid_searchs_whole_cost(tiny_root, tmp_path):
    bench_module = load_benchmark("search_cost")
    cfg = load_config(None, tiny_overrides(tiny_root) + [
        "text_encoders=[all-MiniLM-L6-v2, all-MiniLM-L6-v2@layers=3]", f"data.cache_dir={tmp_path}/cache",
        f"out_root={tmp_path}", "train.eval_every=0", "search.truth_seeds=2"])
    bench = bench_module.Bench("tiny", cfg, TINY_BUDGETS)
    points = {(p["method"], p["budget"]): p for p in bench.run()}
    assert len(points) == 8  # grid, APE, hypernet, 2 halving, 1 proxy, prior, random: one point each
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
    assert evaluated and all(p["cost"]["eval_embed"] == pytest.approx(grid_eval / 2) for p in evaluated)
    blind = [p for p in points.values() if p["method"] in ("halving", "hypernet-halving", "proxy")]
    assert len(blind) == 3 and all(p["cost"]["eval_embed"] == 0 and p["cost"]["embed"] > 0 for p in blind)
    assert all(0 < p["share"] < 1 for p in blind)


def test_truth_seeds_are_apart_from_every_methods_seed(tiny_cfg):
    from hnet.experiments.search import truth_configs

    seeds = [t.train.seed for t in truth_configs(dataclasses.replace(tiny_cfg))]
    assert seeds == [tiny_cfg.train.seed + TRUTH_SEED_OFFSET + i for i in range(tiny_cfg.search.truth_seeds)]


def test_cheapest_share_needs_the_interval_too():
    bench = load_benchmark("search_cost")
    point = lambda m, share, regret, upper: {"method": m, "share": share, "regret": regret,
                                             "ci": {"regret": [0.0, upper]}}
    got = bench.cheapest_at_target([point("a", 0.05, 0.5, 3.0), point("a", 0.2, 0.5, 1.5), point("b", 0.01, 2.0, 2.0),
                                    point("c", 0.03, 1.0, 2.0), point("c", 0.01, 0.0, 0.0)])
    assert got == {"a": 0.2, "b": None, "c": 0.01}
