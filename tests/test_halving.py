"""Successive halving over pairs (hnet.experiments.halving) and the budgeted searches around it: rung sizes,
survivors, reuse of what was embedded (no sample twice by one encoder), the cost against an independent recount,
resume with identical decisions, and scoring against the truth on images the search never saw."""
import numpy as np
import pytest
import torch

from hnet import files, runs
from hnet import flops as flops_module
from hnet.config import ConfigError, load_config
from hnet.data.cache import CachedFeatures
from hnet.eval.ranking import agreement, scores_agreement, split_agreement, split_halves
from hnet.experiments.budgeted_search import run_budgeted_search
from hnet.experiments.halving import Halving, ranking_scores, rung_schedule, survivors
from hnet.flops import proxy_flops, retrieval_head_flops, train_step_flops
from hnet.models import encoders as encoders_module
from hnet.report_ranking import agreement_markdown
from tests.conftest import tiny_overrides

TEXTS = "text_encoders=[all-MiniLM-L6-v2, all-MiniLM-L6-v2@layers=3]"
SEARCH = ["search.val_samples=40", "search.rung_samples=40", "search.rung_steps=2", "search.eta=2"]


def halving_cfg(tiny_root, tmp_path, *extra):
    """The tiny zoo (3 image x 2 text encoders) with a cache of its own: the search embeds what it asks for."""
    return load_config(None, tiny_overrides(tiny_root) + [TEXTS, *SEARCH, f"data.cache_dir={tmp_path}/cache",
                                                          f"out_root={tmp_path}", *extra])


def test_rung_schedule_keeps_one_in_eta_and_grows_by_eta():
    rungs = rung_schedule(21, 3, 100, 10, available=800)
    assert [(r.pairs, r.samples, r.steps) for r in rungs] == [(21, 100, 10), (7, 300, 30), (2, 800, 90)]
    assert [r.pairs for r in rung_schedule(6, 2, 40, 2, 200)] == [6, 3]
    assert rung_schedule(1, 3, 40, 2, 200) == []  # one pair: nothing to decide, nothing to train


def test_survivors_are_the_best_and_a_tie_at_the_cut_goes_to_the_first():
    assert survivors({"a": 1.0, "b": 3.0, "c": 2.0}, 2) == ["b", "c"]
    assert survivors({"a": 2.0, "b": 1.0, "c": 2.0}, 1) == ["a"]
    assert survivors({"c": 2.0, "b": 1.0, "a": 2.0}, 1) == ["c"]
    scores = ranking_scores([{"rung": 0, "scores": {"a": 90.0, "b": 10.0}}, {"rung": 1, "scores": {"b": 5.0}}])
    assert scores["b"] > scores["a"]  # b survived rung 0: it ranks above a whatever its later score


def _count_forwards(monkeypatch):
    """Rows each image encoder's forward and each text encoder's encode really computed in the embedding pass
    (measuring a text encoder's FLOPs per caption, which runs it on a caption sample, is not counted)."""
    seen: dict[str, int] = {}
    measure = flops_module.text_flops_per_caption

    def measured(text_encoder, captions):
        before = dict(seen)
        out = measure(text_encoder, captions)
        seen.clear()
        seen.update(before)
        return out

    monkeypatch.setattr(flops_module, "text_flops_per_caption", measured)
    image_forward, text_encode = encoders_module.ImageEncoder.forward, encoders_module.TextEncoder.encode

    def forward(self, images):
        seen[self.spec.name] = seen.get(self.spec.name, 0) + len(images)
        return image_forward(self, images)

    def encode(self, texts, *args, **kw):
        seen[f"text:{self.name}"] = seen.get(f"text:{self.name}", 0) + len(texts)
        return text_encode(self, texts, *args, **kw)

    monkeypatch.setattr(encoders_module.ImageEncoder, "forward", forward)
    monkeypatch.setattr(encoders_module.TextEncoder, "encode", encode)
    return seen


def test_halving_embeds_each_sample_once_trains_apart_from_scoring_and_recounts(tiny_root, tmp_path, monkeypatch):
    seen = _count_forwards(monkeypatch)
    cfg = halving_cfg(tiny_root, tmp_path, "search.method=halving")
    out = run_budgeted_search(cfg)
    rungs = out["rungs"]
    assert [(r["pairs"], r["samples"], r["steps"]) for r in rungs] == [(6, 40, 2), (3, 80, 4)]
    assert rungs[1]["kept"] == out["best"] and len(out["best"]) == 1
    assert set(rungs[1]["scores"]) == set(rungs[0]["kept"])  # only survivors go on
    # every encoder: the 40 held-out search samples + rung 0's 40; an encoder of a surviving pair: + 40 more
    alive = rungs[0]["kept"]
    for name in [s.split(" + ")[0] for s in out["scores"]] + [f"text:{s.split(' + ')[1]}" for s in out["scores"]]:
        survives = any(name in (p.split(" + ")[0], "text:" + p.split(" + ")[1]) for p in alive)
        assert seen[name] == 80 + 40 * survives, name
        assert out["flops"]["embed_parts"][name]["rows"] == seen[name]
    per_sample = files.read_json(tmp_path / "cache" / "search" / "val40_first" / "0_40" / "manifest.json")[
        "flops_per_sample"]
    assert out["flops"]["embed"] == pytest.approx(sum(seen[n] * per_sample[n] for n in seen))
    # training: each rung's pairs for its steps at its batch (the ledger's formulas, recounted here)
    for r in rungs:
        model, _ = runs.load_model(r["run"])
        batch = min(cfg.train.batch_size, r["samples"])
        assert r["train_flops"] == train_step_flops(model, r["pairs"], batch)["total"] * r["steps"]
        assert r["val_head_flops"] == r["pairs"] * retrieval_head_flops(model.shape, 40, 40)
    root = tmp_path / "cache" / "search" / "val40_first"
    val = set(CachedFeatures(root / "0_40").keys())
    assert len(list((root / "rungs").iterdir())) == len(rungs)
    for cache in (root / "rungs").iterdir():  # what each rung's run trained on: never the samples it is scored on
        keys = CachedFeatures(cache).keys()
        assert not val & set(keys) and len(keys) == len(set(keys)), cache
    report = (tmp_path / "tiny_search_halving" / "search.md").read_text()
    assert "rung 1: 3 pairs" in report and out["best"][0] in report


def test_a_killed_halving_search_resumes_with_the_same_decisions(tiny_root, tmp_path, monkeypatch):
    whole = run_budgeted_search(halving_cfg(tiny_root, tmp_path / "whole", "search.method=halving"))
    cfg = halving_cfg(tiny_root, tmp_path / "killed", "search.method=halving")
    real_rung = Halving._rung
    calls = []

    def dies_at_rung_1(self, rung, *args):
        calls.append(rung.index)
        if rung.index == 1:
            raise KeyboardInterrupt("killed")
        return real_rung(self, rung, *args)

    monkeypatch.setattr(Halving, "_rung", dies_at_rung_1)
    with pytest.raises(KeyboardInterrupt):
        run_budgeted_search(cfg)
    monkeypatch.setattr(Halving, "_rung", lambda self, rung, *a: calls.append(rung.index) or real_rung(self, rung, *a))
    resumed = run_budgeted_search(cfg)
    assert calls == [0, 1, 1]  # rung 0 decided once, read back after the restart
    assert [r["kept"] for r in resumed["rungs"]] == [r["kept"] for r in whole["rungs"]]
    assert resumed["scores"] == whole["scores"]
    assert resumed["flops"]["embed"] == whole["flops"]["embed"]


def test_a_halving_state_from_other_settings_is_refused(tiny_root, tmp_path):
    run_budgeted_search(halving_cfg(tiny_root, tmp_path, "search.method=halving"))
    with pytest.raises(ConfigError, match="halving.json: a halving search with other settings"):
        run_budgeted_search(halving_cfg(tiny_root, tmp_path, "search.method=halving", "search.rung_steps=3"))


def test_hypernet_halving_trains_one_hypernetwork_per_rung_at_the_searchers_settings(tiny_root, tmp_path):
    cfg = halving_cfg(tiny_root, tmp_path, "search.method=hypernet-halving", "search.lr=0.03",
                      "search.weight_decay=0.5")
    out = run_budgeted_search(cfg)
    for r in out["rungs"]:
        meta = files.read_json(f"{r['run']}/model.json")
        assert meta["method"] == "hypernet"
        rows = files.read_jsonl(f"{r['run']}/metrics.jsonl")
        assert max(row["lr"] for row in rows) == pytest.approx(0.03)
    separate = run_budgeted_search(halving_cfg(tiny_root, tmp_path, "search.method=halving", "search.lr=0.03"))
    rows = files.read_jsonl(f"{separate['rungs'][0]['run']}/metrics.jsonl")
    assert max(row["lr"] for row in rows) == pytest.approx(cfg.train.lr)  # APE keeps the grid's own settings


def test_each_rung_tries_every_learning_rate_decides_with_the_best_held_out_retrieval_and_pays_for_all(
        tiny_root, tmp_path):
    cfg = halving_cfg(tiny_root, tmp_path, "search.method=halving", "search.lrs=[1e-6, 0.05, 1e-5]")
    out = run_budgeted_search(cfg)
    from hnet.distributed import make_accelerator

    halving = Halving(cfg, make_accelerator(cfg), False, tmp_path / "recount")
    for r in out["rungs"]:
        assert [t["lr"] for t in r["tries"]] == [1e-6, 0.05, 1e-5]
        recounted = []
        for t in r["tries"]:  # each try's retrieval on the held-out search samples, scored again from its saved run
            model, labels = runs.load_model(t["run"])
            val = tmp_path / "cache" / "search" / "val40_first" / "0_40"
            recounted.append(halving._val_scores(model, labels, list(r["scores"]), val))
            assert np.mean(list(recounted[-1].values())) == pytest.approx(t["mean_score"])
            rows = files.read_jsonl(f"{t['run']}/metrics.jsonl")
            assert max(row["lr"] for row in rows) == pytest.approx(t["lr"])
        best = int(np.argmax([t["mean_score"] for t in r["tries"]]))
        assert r["lr"] == r["tries"][best]["lr"] and r["run"] == r["tries"][best]["run"]
        assert r["scores"] == pytest.approx(recounted[best])
        model, _ = runs.load_model(r["run"])
        batch = min(cfg.train.batch_size, r["samples"])
        assert r["train_flops"] == 3 * train_step_flops(model, r["pairs"], batch)["total"] * r["steps"]
        assert r["val_head_flops"] == 3 * r["pairs"] * retrieval_head_flops(model.shape, 40, 40)
    assert out["rungs"][0]["lr"] == 0.05  # a connector that barely moved from its init retrieves worse
    with pytest.raises(ConfigError, match="search.lrs: every learning rate must be > 0"):
        halving_cfg(tiny_root, tmp_path, "search.lrs=[0.01, 0]")
    with pytest.raises(ConfigError, match="search.lrs: 0.01 is listed twice"):
        halving_cfg(tiny_root, tmp_path, "search.lrs=[0.01, 0.02, 0.01]")


def test_a_proxy_prefilter_keeps_one_in_eta_before_rung_0_and_is_charged_its_flops(tiny_root, tmp_path, monkeypatch):
    from hnet.experiments.proxies import mutual_knn

    seen = _count_forwards(monkeypatch)
    cfg = halving_cfg(tiny_root, tmp_path, "search.method=halving", "search.prefilter=mutual_knn")
    out = run_budgeted_search(cfg)
    val = CachedFeatures(tmp_path / "cache" / "search" / "val40_first" / "0_40")
    own, flops = {}, 0.0
    for pair in out["prefilter"]["scores"]:  # recounted from the held-out samples' features
        image, text = pair.split(" + ")
        x, y = (torch.from_numpy(np.asarray(val[n][:], np.float32)) for n in (image, f"text:{text}"))
        own[pair] = mutual_knn(x, y)
        flops += proxy_flops("mutual_knn", 40, x.shape[1], y.shape[1])
    assert out["prefilter"]["scores"] == pytest.approx(own) and len(own) == 6
    kept = sorted(own, key=own.get, reverse=True)[:3]
    assert sorted(out["prefilter"]["kept"]) == sorted(kept)
    assert sorted(out["rungs"][0]["scores"]) == sorted(kept)  # rung 0 trains only what the filter kept
    assert out["flops"]["eval_heads"] == pytest.approx(sum(r["val_head_flops"] for r in out["rungs"]) + flops)
    used = {p.split(" + ")[0] for p in kept} | {"text:" + p.split(" + ")[1] for p in kept}
    assert seen == {n: 40 + 40 * (n in used) for n in seen}  # an encoder with no kept pair: held-out samples only
    assert set(out["scores"]) == set(own)  # every pair ranked: the dropped ones below every pair of rung 0
    assert max(out["scores"][p] for p in own if p not in kept) < min(out["scores"][p] for p in kept)
    assert "before rung 0: mutual_knn on the held-out search samples kept 3 of 6 pairs" in \
        (tmp_path / "tiny_search_halving" / "search.md").read_text()


def test_a_prefilter_that_keeps_one_pair_decides_alone_and_trains_nothing(tiny_root, tmp_path):
    cfg = halving_cfg(tiny_root, tmp_path, "search.method=halving", "search.prefilter=mutual_knn", "search.eta=4")
    out = run_budgeted_search(cfg)
    assert len(out["prefilter"]["kept"]) == 1 and out["best"] == out["prefilter"]["kept"]
    assert out["rungs"] == [] and out["flops"]["train"] == 0.0
    assert not list(tmp_path.glob("tiny_search_halving/r0_*"))  # no rung run was started


def test_settings_only_halving_reads_are_flagged_where_another_method_runs(tiny_root, tmp_path):
    from hnet.experiments.budget import ignored_search_settings

    cfg = halving_cfg(tiny_root, tmp_path, "search.lrs=[0.01, 0.02]", "search.prefilter=linear_cka")
    assert ignored_search_settings(cfg) == ["search.lrs", "search.prefilter"]  # the default method: hypernet
    proxy = halving_cfg(tiny_root, tmp_path, "search.method=proxy", "search.lrs=[0.01]", "search.proxy_samples=50")
    assert ignored_search_settings(proxy) == ["search.lrs"]
    for method in ("halving", "hypernet-halving"):
        assert ignored_search_settings(halving_cfg(tiny_root, tmp_path, f"search.method={method}",
                                                   "search.lrs=[0.01]", "search.prefilter=mutual_knn")) == []
    with pytest.warns(UserWarning, match=r"search.lrs: only --method halving\|hypernet-halving reads it; "
                                         r"--method proxy ignores it"):
        run_budgeted_search(proxy)


def test_proxy_search_charges_its_forwards_and_its_own_flops(tiny_root, tmp_path, monkeypatch):
    seen = _count_forwards(monkeypatch)
    cfg = halving_cfg(tiny_root, tmp_path, "search.method=proxy", "search.proxy=linear_cka", "search.proxy_samples=50")
    out = run_budgeted_search(cfg)
    assert set(seen.values()) == {50}  # every encoder, the first 50 samples, one caption each
    piece = CachedFeatures(tmp_path / "cache" / "search" / "val0_first" / "0_50")
    own = sum(proxy_flops("linear_cka", 50, piece.width(i), piece.width(f"text:{t}"))
              for i in [n for n in seen if not n.startswith("text:")] for t in cfg.texts)
    assert out["flops"]["total"] == pytest.approx(own)
    assert out["flops"]["embed"] == pytest.approx(sum(50 * piece.manifest["flops_per_sample"][n] for n in seen))


def test_fixed_scores_are_scored_on_the_truths_other_half_with_its_ceiling():
    rng = np.random.default_rng(0)
    names = [f"p{i}" for i in range(6)]
    truth = (rng.random((3, 6, 200)) < np.linspace(0.4, 0.45, 6)[None, :, None]).astype(float)  # halves disagree
    predicted = {n: float(i) for i, n in enumerate(names)}
    got = scores_agreement(predicted, truth, names, boot=200)
    a, b = split_halves(200)
    on_a, on_b = (dict(zip(names, truth.mean(axis=0)[:, h].mean(axis=1) * 100)) for h in (a, b))
    assert agreement(predicted, on_a)["kendall"] != agreement(predicted, on_b)["kendall"]
    assert got["kendall"] == agreement(predicted, on_b)["kendall"]
    assert got["regret"] == agreement(predicted, on_b)["regret"]
    reference = split_agreement(truth.mean(axis=0), truth, names, boot=10)
    assert got["ceiling"]["kendall"] == reference["ceiling"]["kendall"]
    assert got["ci"]["kendall"][0] <= got["kendall"] <= got["ci"]["kendall"][1]
    assert got["halves"]["truth"] == len(b)
    # the truth's resolution: what picking the truth's own best pair scores under the same resamples
    own = scores_agreement(on_b, truth, names, boot=200)
    wrong = scores_agreement({n: float(n == min(on_b, key=on_b.get)) for n in names}, truth, names, boot=200)
    assert own["regret"] == 0.0 and wrong["regret"] > 0.0
    assert got["resolution"] == own["resolution"] == wrong["resolution"]  # whatever the method picked
    assert got["resolution"]["ci"] == own["ci"]["regret"] and got["resolution"]["ci"][1] > 0.0
    assert f"picks the truth's own best pair shows regret 0.0 [0.0, {own['ci']['regret'][1]:.1f}]" in \
        "\n".join(agreement_markdown(got, "proxy", "grid search"))


def test_rung_runs_take_their_encoders_from_a_zoo_file_too(tiny_root, tmp_path):
    """`encoders:` may name a YAML file (configs/demo.yaml does): each rung run gets its survivors' specs."""
    from hnet.distributed import make_accelerator
    from hnet.experiments.halving import Rung
    from hnet.models.encoders import read_encoder_list
    from tests.conftest import TINY_ENCODERS

    zoo = tmp_path / "zoo.yaml"
    zoo.write_text("weights: random\nencoders:\n" + "".join(f"  - '{n}'\n" for n in TINY_ENCODERS))
    cfg = halving_cfg(tiny_root, tmp_path, f"encoders={zoo}")
    halving = Halving(cfg, make_accelerator(cfg), False, tmp_path / "search")
    run = halving._run_config(Rung(1, 2, 40, 2), halving.pairs[2:4], TINY_ENCODERS[1:2], cfg.texts, tmp_path, 0, 0.01)
    assert [(s.name, s.weights) for s in read_encoder_list(run.encoders)] == [(TINY_ENCODERS[1], "random")]
    assert run.method == "separate" and run.train.max_steps == 2
