"""benchmarks/moe_real.py: the moe-minus-dense gap and its interval, the FLOPs-matched dense width, and the whole
measurement (every variant at every seed) on the tiny built-in zoo."""
import numpy as np
import pytest

from hnet import files, runs
from hnet.config import load_config
from tests.conftest import load_benchmark, tiny_overrides, with_train

bench = load_benchmark("moe_real")


def test_paired_gap_resamples_seeds_and_images_together():
    rng = np.random.default_rng(0)
    b = (rng.random((3, 4, 200)) < 0.5).astype(float)
    a = b.copy()
    a[:, :, :20] = 1.0  # moe gets 20 more images right on pair rows that b missed
    gain = (1 - b[:, :, :20]).mean() * 20 / 200 * 100
    gap = bench.paired_gap(a, b, boot=400)
    assert gap["gap"] == pytest.approx(gain)
    assert 0 < gap["ci"][0] <= gap["gap"] <= gap["ci"][1]
    assert gap["pairs_higher"] == 4 and gap["pairs_lower"] == 0 and gap["seeds"] == 3
    assert bench.verdict(gap) == "moe wins"
    # a seed effect both variants share (seed 1 lifts both far above seed 0) cancels out of the gap when the seeds
    # are drawn once for both: a gain of exactly 10 points everywhere has the interval [10, 10]
    level = np.array([0.2, 0.8, 0.5])[:, None, None] + rng.random((1, 4, 200)) * 0.1
    gap = bench.paired_gap(level + 0.1, level, boot=400)
    assert gap["gap"] == pytest.approx(10.0) and gap["ci"] == pytest.approx([10.0, 10.0])
    assert bench.verdict(bench.paired_gap(b, b, boot=50)) == "no winner: the interval holds 0"
    assert bench.verdict({"ci": [-2.0, -0.5]}) == "dense wins"


def test_flops_matched_dense_width_adds_the_gate():
    widths = [(192, 384), (1280, 768), (1024, 384)]
    connectors = bench.connectors(512, widths)
    moe, matched = connectors["moe"], connectors["dense_flops"]
    assert moe.hidden == 256 and moe.top_k == 2 and moe.experts == 4
    assert matched.hidden > 512  # the gate's in x E MACs per row, spread over the dense layers
    target = bench.train_macs(moe, widths)
    assert abs(bench.train_macs(matched, widths) - target) / target < 2e-3
    # active parameters: two experts of 256 hold what the dense 512 holds, plus the gate and the second bias
    gate = np.mean([w * 4 for w, _ in widths])
    extra_bias = np.mean([t for _, t in widths])
    assert bench.active_params(moe, widths) == pytest.approx(bench.active_params(connectors["dense"], widths)
                                                             + gate + extra_bias)
    assert bench.total_params(moe, widths) > 1.9 * bench.total_params(connectors["dense"], widths)


def test_runs_differ_by_seed_and_connector_only(tmp_path):
    tiny_cfg = load_config(None, tiny_overrides(tmp_path))
    connectors = bench.connectors(16, [(48, 24), (16, 24)])
    moe, dense = (bench.run_configs(tiny_cfg, connectors[n], n, 2) for n in ("moe", "dense"))
    assert [c.train.seed for c in moe] == [c.train.seed for c in dense] == [tiny_cfg.train.seed + i for i in (0, 1)]
    assert len({c.run_dir for c in moe + dense}) == 4
    for c in moe + dense:
        assert c.method == "separate" and c.held_out_pairs == [] and c.train.epochs == tiny_cfg.train.epochs
    assert moe[0].connector.kind == "moe" and dense[0].connector.kind == "mlp"


def test_every_variant_trains_and_scores_at_every_seed(tiny_cfg):
    cfg = with_train(tiny_cfg, epochs=1)
    result = bench.measure(cfg, seeds=2, hidden=16)
    variants = result["variants"]
    assert set(variants) == {"dense", "moe", "dense_flops", "linear"}
    for name, v in variants.items():
        assert len(v["per_seed"]) == 2 and v["ci"][0] <= v["top1"] <= v["ci"][1]
    assert variants["moe"]["routing"]["routing_entropy"] > 0 and variants["dense"]["routing"] is None
    for c in bench.run_configs(cfg, bench.connectors(16, [(1, 1)])["moe"], "moe", 2):
        meta = files.read_json(c.run_dir / runs.MODEL)
        assert meta["shape"]["kind"] == "moe" and meta["method"] == "separate"
    matched = result["comparisons"]["matched FLOPs"]
    assert matched["dense"] == "dense_flops" and matched["moe"] == "moe"
    assert len(result["pairs"]) == 3
    table = load_benchmark("readme_tables").render_moe_real(result)
    assert matched["verdict"] in table and "moe: 4 x mlp(hidden 8), top-2" in table
