"""The search at a budget: what it embeds, what it trains, what it reports, and the grid-search estimate."""
import dataclasses
from pathlib import Path

import numpy as np

from hnet import files
from hnet.data.cache import CachedFeatures
from hnet.eval.evaluate import evaluate_run
from hnet.experiments.search import run_search
from hnet.flops import encoder_flops
from hnet.models.encoders import text_key
from hnet.train.loop import train
from hnet.train.optim import encoder_subset
from tests.conftest import with_train

TEXT = text_key("all-MiniLM-L6-v2")  # the tiny configs' text encoder


def _budget(cfg, **search):
    return dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, **search))


def test_search_embeds_trains_and_ranks_within_its_budget(tiny_cfg):
    cfg = _budget(tiny_cfg, steps=5, encoders_per_step=1, samples_per_encoder=128)
    out = run_search(cfg)
    run = files.read_json(f"{out['run']}/flops.json")["phases"]
    # only the first 128 pairs were embedded, by every encoder and the text encoder
    cache = CachedFeatures(tiny_cfg.cache_root / "first_128", [TEXT])
    assert cache.count == 128 and cache.keys() == CachedFeatures(tiny_cfg.cache_root).keys()[:128]
    per_pair = sum(encoder_flops(n)["gflops"] * 1e9 for n in tiny_cfg.encoders) + cache.manifest[
        "flops_per_sample"][TEXT]
    assert run["embed"]["samples"] == 128 and abs(run["embed"]["flops"] - 128 * per_pair) < 1e3
    # 5 steps, one encoder each, as drawn
    assert run["train"]["steps"] == 5
    expected = np.bincount(np.concatenate([encoder_subset(s, 3, 1, tiny_cfg.train.seed) for s in range(5)]),
                           minlength=3)
    assert list(run["train"]["parts"]["encoder_draws"].values()) == expected.tolist()
    # every encoder ranked by its evaluated accuracy, best first
    top1 = [r["predicted_top1"] for r in out["ranking"]]
    assert sorted(r["encoder"] for r in out["ranking"]) == sorted(tiny_cfg.encoders) and top1 == sorted(top1)[::-1]
    assert out["flops"]["train"] == run["train"]["flops"]
    assert out["flops"]["total_with_embed"] == sum(p["flops"] for p in run.values())
    assert (tmp := files.read_json(f"{out['run']}/search.json"))["ratio"] == out["ratio"] and tmp["grid_search"]
    assert "| rank | encoder |" in open(f"{out['run']}/search.md").read()
    from hnet.report import build_table

    rows = build_table([out["run"]])  # the FLOPs report: the search run, then grid search's estimate
    assert rows[1]["run"].startswith("grid search for") and rows[1]["train_flops"] == out["grid_search"]["train"]
    assert rows[1]["total_flops_with_embed"] == out["grid_search"]["total_with_embed"]


def test_grid_search_estimate_equals_a_real_separate_run(tiny_cfg):
    """The estimate of a full grid search is what the ledger of that separate run records, and the agreement
    against it is reported."""
    cfg = _budget(tiny_cfg, steps=3, samples_per_encoder=64)
    separate = dataclasses.replace(cfg, method="separate", name="grid")
    train(separate)
    evaluate_run(separate, separate.run_dir, ["demo"])
    out = run_search(cfg, separate.run_dir)
    ledger = files.read_json(separate.run_dir / "flops.json")["phases"]
    manifest = files.read_json(tiny_cfg.cache_root / "manifest.json")
    assert out["grid_search"]["train"] == ledger["train"]["flops"]
    assert out["grid_search"]["steps"] == ledger["train"]["steps"]
    full_embed = manifest["count"] * sum(manifest["flops_per_sample"][n] for n in tiny_cfg.encoders + [TEXT])
    assert abs(out["grid_search"]["embed"] - full_embed) < 1e3
    assert set(out["agreement"]) >= {"spearman", "kendall", "top1_hit", "regret", "top3_recall"}
    assert out["ratio"]["total_with_embed"] == out["grid_search"]["total_with_embed"] / out["flops"][
        "total_with_embed"]


def test_first_samples_split_into_whole_shards_and_one_cut_shard(tiny_cfg, tmp_path):
    """A budget's pairs stay split over shards (so ranks share the embedding pass); a cut shard stops early."""
    import shutil

    from hnet.data.sources import first_samples_units, prepare_shards

    pattern = prepare_shards(tiny_cfg)  # 240 pairs in shards of 100
    units = first_samples_units(pattern, 128)
    assert [u.name for u in units] == ["000000", "000001_first28"]
    assert [len(list(u.samples())) for u in units] == [100, 28]
    copy = tmp_path / "shards"  # no manifest: one unit reading in order
    shutil.copytree(Path(pattern).parent, copy)
    (copy / "manifest.json").unlink()
    units = first_samples_units(str(copy / Path(pattern).name), 128)
    assert len(units) == 1 and len(list(units[0].samples())) == 128


def test_search_warmup_scales_with_its_budget(tiny_cfg):
    """A 10-step budget does not spend 20 steps warming up: it gets the full run's share of warmup."""
    from hnet.experiments.search import search_config

    cfg = with_train(_budget(tiny_cfg, steps=10), warmup_steps=20)
    assert search_config(cfg, full_steps=420).train.warmup_steps == 1
    assert search_config(_budget(cfg, steps=210), full_steps=420).train.warmup_steps == 10
    assert search_config(cfg).train.warmup_steps == 1  # no full schedule known: at most a tenth of the budget
