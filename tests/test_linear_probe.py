"""Linear probe: the L2 weight is chosen on a split of TRAIN only, refitted on all of train, scored on test."""
import dataclasses
from csv import DictReader

import numpy as np
import pytest
import torch
from PIL import Image

import hnet.eval.linear_probe as lp
from hnet import files
from hnet.config import load_config
from hnet.flops import linear_probe_flops


def _cfg(*overrides):
    return load_config(None, ["eval.probe_l2=[1e-4,1000]", "eval.probe_steps=50", *overrides])


def _clusters(n0: int, n1: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two separable classes: class 0 around (1, 0), class 1 around (-1, 0)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([0] * n0 + [1] * n1)
    x = torch.stack([1.0 - 2.0 * y, torch.zeros(len(y))], dim=1) + 0.1 * torch.randn(len(y), 2, generator=g)
    return x, y


def test_l2_choice_never_sees_the_adversarial_test_split():
    """Train: separable, class 0 the majority; a tiny L2 separates it (validation 100%), a huge one predicts the
    majority (70%). Test: class-0 labels on class-1 features, so a choice made on test would take the huge L2."""
    train_x, train_y = _clusters(21, 9)
    test_x, _ = _clusters(0, 8, seed=1)
    test_y = torch.zeros(8, dtype=torch.long)
    out = lp.probe_encoder(train_x, train_y, test_x, test_y, 2, _cfg())
    assert [r["val_top1"] for r in out["selection"]] == [100.0, pytest.approx(100 * 4 / 6)]  # 4 + 2 held out
    assert out["l2"] == 1e-4 and out["top1"] == 0.0  # honest: the ceiling is measured, not tuned on test
    on_test = lp.probe_encoder(train_x, train_y, test_x, test_y, 2, _cfg("eval.probe_l2=[1000]"))
    assert on_test["top1"] == 100.0  # what a test-tuned choice would have reported


def test_selection_fits_only_train_rows_then_refits_on_all_of_train(monkeypatch):
    train_x, train_y = _clusters(10, 10)
    test_x, test_y = _clusters(5, 5, seed=7)
    seen, real_fit = [], lp.fit_logistic
    monkeypatch.setattr(lp, "fit_logistic", lambda x, y, *a: seen.append(x.clone()) or real_fit(x, y, *a))
    lp.probe_encoder(train_x, train_y, test_x, test_y, 2, _cfg("eval.probe_l2=[1e-4,1e-2,1]"))
    rows = lambda x: {tuple(r) for r in x.tolist()}
    assert len(seen) == 4 and all(rows(x) <= rows(train_x) for x in seen)  # 3 candidates + 1 refit, train only
    assert all(len(x) == 16 for x in seen[:3]) and rows(seen[3]) == rows(train_x)  # 80% for choosing, then all
    fit, val = lp.split_train_val(train_y.numpy(), 0.2, seed=0)
    assert not set(fit) & set(val) and np.bincount(train_y.numpy()[val]).tolist() == [2, 2]  # stratified
    assert (lp.split_train_val(train_y.numpy(), 0.2, seed=0)[1] == val).all()  # seeded


def test_probe_flops_are_counted_analytically():
    x, y = _clusters(6, 6)
    fit = lp.fit_logistic(x, y, 2, 1e-3, 20)
    assert fit["passes"] >= fit["iterations"] > 0
    # forward x @ W (12 x 2 x 2 multiply-adds) + its weight gradient per pass, 2 FLOPs each; L-BFGS directions
    expected = 2 * (fit["passes"] * 2 * 12 * 2 * 2 + fit["iterations"] * 4 * lp.HISTORY * 3 * 2)
    assert fit["flops"] == expected == linear_probe_flops(12, 2, 2, fit["passes"], iterations=fit["iterations"],
                                                          history=lp.HISTORY)


def _labelled_folder(root, per_class: dict[str, int]):
    """class folders of 32x32 images whose colour is the class (plus noise)."""
    colours = {"cat": (220, 30, 30), "dog": (30, 200, 40), "bird": (30, 60, 220)}
    rng = np.random.default_rng(len(str(root)))
    for name, n in per_class.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = np.clip(np.array(colours[name]) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_evaluate_script_linear_probe_end_to_end(synthetic_cfg, tmp_path):
    from hnet.train.loop import train
    from scripts.evaluate import main
    from tests.test_longtail import _write_shard

    cfg = dataclasses.replace(synthetic_cfg, encoders=synthetic_cfg.encoders[:2],
                              train=dataclasses.replace(synthetic_cfg.train, max_steps=1))
    train(cfg)
    data = tmp_path / "pets"
    _labelled_folder(data / "train", {"cat": 8, "dog": 8, "bird": 8})
    _labelled_folder(data / "test", {"cat": 3, "dog": 3, "bird": 3})
    _write_shard(tmp_path / "captions.tar", [["a cat"]] * 6 + [["two dogs", "a dog"]] * 2)
    main(["--run", str(cfg.run_dir), "--datasets", f"pets={data / 'test'}", "--linear-probe",
          f"eval.linear_probe=[pets={data}]", f"data.shards={tmp_path / 'captions.tar'}", "eval.longtail_many=4",
          "eval.longtail_few=2", "eval.probe_l2=[1e-3,1]", "eval.probe_steps=20"])
    results = files.read_json(cfg.run_dir / "eval.json")
    probe = results["linear_probe"]["pets"]
    assert probe["n_train"] == 24 and probe["n_test"] == 9 and set(probe["encoders"]) == set(cfg.encoders)
    for m in probe["encoders"].values():
        assert m["l2"] in (1e-3, 1) and 0 <= m["top1"] <= 100 and m["n_train"] == 24
    assert set(probe["zero_shot_top1"]) == set(results["datasets"]["pets"]["encoders"])
    parts = files.read_json(cfg.run_dir / "flops.json")["phases"]["eval"]["parts"]
    probe_parts = [k for k in parts if k.startswith("linear_probe/")]
    assert len(probe_parts) == 2 and all(parts[k]["flops"] > 0 for k in probe_parts)
    assert sum(k.startswith("embed/pets_train_24_") for k in parts) == 2  # the train split's forwards, charged
    assert sum(k.startswith("embed/pets_9_") for k in parts) == 2  # the test split's: once, shared with zero-shot
    tail = results["datasets"]["pets"]["longtail"]
    assert tail["counts"] == [0, 6, 4] and tail["segment_classes"] == {"many": 1, "medium": 1, "few": 1}
    md, csv = (cfg.run_dir / "eval.md").read_text(), (cfg.run_dir / "eval.csv").read_text()
    assert "linear probe" in md and "long tail" in md and "many (> 4" in md
    rows = [r for r in DictReader(csv.splitlines()) if r["task"] == "zeroshot_classification"]
    many = {r["encoder"]: float(r["longtail_many_acc1"]) for r in rows}  # fractions, as clip_benchmark's units
    assert many == {p: pytest.approx(m["many"]["top1"] / 100, abs=1e-5) for p, m in tail["encoders"].items()}
    assert ",linear_probe," in csv
    assert (cfg.run_dir / "longtail_pets.png").exists()
