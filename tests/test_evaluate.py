import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hnet.data.cache import CachedFeatures
from hnet.data.zeroshot import CIFAR_TEMPLATES, TEMPLATES, cifar_pickled
from hnet.eval.evaluate import evaluate_run
from hnet.eval.retrieval import recall_at_k
from hnet.eval.zeroshot import classification_metrics
from hnet.models.encoders import TextEncoder
from hnet.runs import connector_for
from hnet.train.loop import train


def test_accuracy_equals_independent_clip_style_computation(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, eval=dataclasses.replace(tiny_cfg.eval, templates="cifar"),
                              train=dataclasses.replace(tiny_cfg.train, max_steps=6))
    train(cfg)
    results = evaluate_run(cfg, cfg.run_dir, ["demo"])
    cache = CachedFeatures(cfg.cache_path / "eval" / "demo_96", list(results["datasets"]["demo"]["encoders"]))
    labels = torch.from_numpy(np.asarray(CachedFeatures(cfg.cache_path / "eval" / "demo_96", ["labels"])["labels"]))
    classes = results["datasets"]["demo"]["classes"]
    # open_clip's build_zero_shot_classifier, redone here with plain torch and the plain connector module
    text = TextEncoder(cfg.text_encoder)
    weights = []
    for c in classes:
        emb = text.encode([t.format(c=c) for t in CIFAR_TEMPLATES])
        weights.append(F.normalize(F.normalize(emb, dim=-1).mean(0), dim=-1))
    classifier = torch.stack(weights)
    for name, m in results["datasets"]["demo"]["encoders"].items():
        feats = torch.from_numpy(np.asarray(cache[name], np.float32))
        image = F.normalize(connector_for(cfg.run_dir, name)(feats), dim=-1)
        top1 = float(((image @ classifier.T).argmax(1) == labels).float().mean()) * 100
        assert m["top1"] == pytest.approx(top1, abs=1e-6)
    assert (cfg.run_dir / "reliability_demo.png").exists() and (cfg.run_dir / "eval.md").exists()


def test_metrics_on_a_hand_made_case():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 0.5], [0.0, 0.2, 0.1]])
    labels = torch.tensor([0, 1, 2, 2])
    m = classification_metrics(logits, labels, 3)
    assert m["top1"] == 50.0 and m["per_class_top1"] == [100.0, 100.0, 0.0]
    assert m["mean_per_class_recall"] == pytest.approx(200 / 3)  # balanced accuracy, not top-1
    absent = classification_metrics(logits, torch.tensor([0, 0, 2, 2]), 3)  # class 1 has no images: left out
    assert absent["per_class_top1"][1] is None and absent["mean_per_class_recall"] == pytest.approx((50.0 + 0.0) / 2)
    assert m["nll"] == pytest.approx(float(F.cross_entropy(logits, labels)))
    conf = logits.softmax(-1).max(-1).values.tolist()
    correct = [1.0, 1.0, 0.0, 0.0]
    ece = 0.0
    for b in range(15):  # independent 15-bin ECE
        inside = [i for i, c in enumerate(conf) if min(int(c * 15), 14) == b]
        if inside:
            acc = sum(correct[i] for i in inside) / len(inside)
            ece += len(inside) / 4 * abs(acc - sum(conf[i] for i in inside) / len(inside))
    assert m["ece"] == pytest.approx(ece * 100)
    assert sum(b["count"] for b in m["reliability"]) == 4


def test_recall_at_k():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.0, 0.7, 0.6]])
    r = recall_at_k(sim, ks=(1, 2))
    assert r == {"R@1": pytest.approx(100 / 3), "R@2": 100.0}
    tied = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]])  # each right item ties a wrong one
    assert recall_at_k(tied, ks=(1, 2)) == {"R@1": 0.0, "R@2": 100.0}  # ties counted against the query


def test_templates():
    assert len(CIFAR_TEMPLATES) == 18 and CIFAR_TEMPLATES[0] == "a photo of a {c}."
    assert "a photo of the big {c}." in CIFAR_TEMPLATES
    assert len(TEMPLATES["imagenet"]) == 80


def test_cifar_pickled_layout(tmp_path):
    import pickle

    data = {"data": np.random.default_rng(0).integers(0, 255, (5, 3072), dtype=np.uint8), "labels": [0, 1, 2, 1, 0]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(data))
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({"label_names": ["airplane", "automobile", "bird"]}))
    ds = cifar_pickled("cifar10", tmp_path)
    samples = list(ds.units[0].samples())
    assert ds.classnames == ["airplane", "automobile", "bird"] and [s["label"] for s in samples] == [0, 1, 2, 1, 0]
    assert samples[0]["image"].size == (32, 32)


def test_eval_ledger_counts_encoder_forwards_once(tiny_cfg):
    from hnet import files
    from hnet.flops import encoder_flops

    fresh = dataclasses.replace(tiny_cfg, data=dataclasses.replace(tiny_cfg.data, demo_eval_samples=48),
                                train=dataclasses.replace(tiny_cfg.train, max_steps=2))
    train(fresh)
    evaluate_run(fresh, fresh.run_dir, ["demo"])  # embeds the 48 images with every encoder
    first = files.read_json(fresh.run_dir / "flops.json")["phases"]["eval"]["flops"]
    forwards = sum(48 * encoder_flops(n)["gflops"] * 1e9 for n in fresh.encoders)
    evaluate_run(fresh, fresh.run_dir, ["demo"])  # cached: only connectors and logits again
    second = files.read_json(fresh.run_dir / "flops.json")["phases"]["eval"]["flops"] - first
    assert 0 < second < 0.05 * forwards
    assert first == pytest.approx(forwards + second, rel=1e-6)


def test_retrieval_on_a_captioned_shard_set(tiny_cfg):
    from hnet.data.sources import prepare_shards

    cfg = dataclasses.replace(tiny_cfg, eval=dataclasses.replace(tiny_cfg.eval, retrieval=prepare_shards(tiny_cfg)),
                              train=dataclasses.replace(tiny_cfg.train, epochs=40, lr=1e-2))
    train(cfg)
    results = evaluate_run(cfg, cfg.run_dir, ["demo"])
    for r in results["retrieval"].values():
        assert r["n"] == 240
        for direction in ("image_to_text", "text_to_image"):
            assert r[direction]["R@1"] <= r[direction]["R@5"] <= r[direction]["R@10"]
        # trained on these very pairs: well above the 10/240 = 4% chance of R@10
        assert r["image_to_text"]["R@10"] > 10
    assert "retrieval" in (cfg.run_dir / "eval.md").read_text()


def test_eval_cost_is_the_same_when_another_run_filled_the_cache(tiny_cfg):
    from hnet import files

    cfg = dataclasses.replace(tiny_cfg, eval=dataclasses.replace(tiny_cfg.eval, max_images=40),
                              train=dataclasses.replace(tiny_cfg.train, max_steps=1))
    other = dataclasses.replace(cfg, name=cfg.name + "_other")
    for run in (cfg, other):
        train(run)
    evaluate_run(cfg, cfg.run_dir, ["demo"])  # embeds the 40 images
    evaluate_run(other, other.run_dir, ["demo"])  # finds them cached
    first, second = (files.read_json(r.run_dir / "flops.json")["phases"]["eval"] for r in (cfg, other))
    assert first["flops"] == second["flops"] > 0
    embeds = [{k: p for k, p in phase["parts"].items() if k.startswith("embed/")} for phase in (first, second)]
    assert len(embeds[0]) == len(cfg.encoders) and embeds[0].keys() == embeds[1].keys()
    assert not any(p["cached"] for p in embeds[0].values()) and all(p["cached"] for p in embeds[1].values())


def test_zero_shot_logits_stay_on_the_features_device():
    """meta tensors refuse to mix with CPU ones: a CPU tensor made next to them (widths) raises."""
    from hnet.config import HypernetConfig
    from hnet.eval.zeroshot import zero_shot_logits
    from hnet.models.connectors import ConnectorShape
    from hnet.models.stitch import StitchModel

    model = StitchModel("separate", ConnectorShape("linear", "text_to_image", 32, 24), [32, 16],
                        HypernetConfig()).to("meta")
    features, classifier = torch.empty(5, 16, device="meta"), torch.empty(3, 24, device="meta")
    assert zero_shot_logits(model, 1, features, classifier).shape == (5, 3)


class SpyAccelerator:
    """A real accelerator that records being asked for its device and that build_cache received it."""

    def __init__(self, cfg):
        from hnet.distributed import make_accelerator

        self.real, self.device_reads = make_accelerator(cfg), 0

    @property
    def device(self):
        self.device_reads += 1
        return self.real.device

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_evaluation_runs_on_the_given_accelerator(tiny_cfg, monkeypatch):
    import hnet.eval.zeroshot
    from hnet import files

    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, max_steps=1))
    train(cfg)
    spy = SpyAccelerator(cfg)
    seen = []
    real_build = hnet.eval.zeroshot.build_cache
    monkeypatch.setattr(hnet.eval.zeroshot, "build_cache", lambda *a, **kw: seen.append(kw["accelerator"]) or
                        real_build(*a, **kw))
    results = evaluate_run(cfg, cfg.run_dir, ["demo"], accelerator=spy)
    assert seen == [spy] and spy.device_reads > 0
    saved = files.read_json(cfg.run_dir / "eval.json")
    assert saved["device"] == results["device"] == str(spy.real.device)
    assert saved["datasets"]["demo"]["features_device"] == str(spy.real.device)
