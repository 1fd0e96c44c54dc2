import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hnet import io
from hnet.cache import CachedFeatures
from hnet.config import ConfigError
from hnet.model import connector_for, load_model
from hnet.train import train
from tests.conftest import with_train


def test_overfit_one_batch_drives_loss_near_zero(synthetic_cfg):
    cfg = with_train(synthetic_cfg, overfit_batches=1, epochs=1000, max_steps=150, lr=1e-2, warmup_steps=5,
                log_every=150, logit_scale="fixed", logit_scale_init=100.0)
    result = train(cfg)
    assert result["last"]["loss"] < 0.05


def test_metrics_and_run_files(tiny_cfg):
    train(with_train(tiny_cfg, max_steps=4))
    run = tiny_cfg.run_dir
    rows = io.read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "lr", "logit_scale", "grad_norm", "samples_per_s", "flops_cum"):
        assert key in rows[-1]
    assert any(k.startswith("grad_norm/source.") for k in rows[-1])
    assert rows[-1]["flops_cum"] == 4 * rows[0]["flops_cum"]
    for name in ("config.yaml", "flops.json", "model.safetensors", "cond_embeddings.safetensors", "model.json"):
        assert (run / name).exists(), name
    assert sorted(load_file(str(run / "cond_embeddings.safetensors"))) == sorted(io.read_json(run / "model.json")["names"])


def test_resume_latest_equals_uninterrupted(tiny_cfg):
    straight = dataclasses.replace(with_train(tiny_cfg, max_steps=6, ckpt_every=3), name="straight")
    train(straight)
    # a run killed after step 5 whose last checkpoint is step 3: its files as the kill left them
    killed = dataclasses.replace(straight, name="killed")
    shutil.copytree(straight.run_dir, killed.run_dir)
    shutil.rmtree(killed.run_dir / "checkpoints" / "step_00000006")
    for name in ("model.safetensors", "cond_embeddings.safetensors", "model.json"):
        (killed.run_dir / name).unlink()
    rows = io.read_jsonl(killed.run_dir / "metrics.jsonl")[:5]
    io.write_text(killed.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    train(with_train(killed, resume="latest"))
    a = load_file(str(straight.run_dir / "model.safetensors"))
    b = load_file(str(killed.run_dir / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]
    assert strip(io.read_jsonl(straight.run_dir / "metrics.jsonl")) == strip(io.read_jsonl(killed.run_dir / "metrics.jsonl"))
    assert io.read_json(straight.run_dir / "flops.json") == io.read_json(killed.run_dir / "flops.json")


def test_connector_for_is_a_plain_module_matching_the_model(tiny_cfg):
    train(with_train(tiny_cfg, max_steps=3))
    model, names = load_model(tiny_cfg.run_dir)
    cache = CachedFeatures(tiny_cfg.cache_path, names)
    name = names[1]
    x = torch.from_numpy(np.asarray(cache[name][:5], np.float32))
    module = connector_for(tiny_cfg.run_dir, name)
    assert type(module).__module__ == "hnet.connectors" and isinstance(module, torch.nn.Module)
    padded = F.pad(x, (0, model.shape.image_width - x.shape[1])).unsqueeze(0)
    a, _, _ = model(torch.tensor([1]), padded, torch.zeros(5, model.shape.text_width))
    torch.testing.assert_close(F.normalize(module(x), dim=-1), a[0], atol=1e-5, rtol=1e-5)


def test_separate_method_trains_one_connector_per_encoder(tiny_cfg):
    cfg = dataclasses.replace(with_train(tiny_cfg, max_steps=3), method="separate")
    train(cfg)
    state = load_file(str(cfg.run_dir / "model.safetensors"))
    assert state["source.weights.0"].shape[0] == 3


def test_batch_larger_than_data_refused(tiny_cfg):
    with pytest.raises(ConfigError, match="train.batch_size: 4096 is larger than the data"):
        train(with_train(tiny_cfg, batch_size=4096))


def test_grad_accumulation_and_tensorboard_tracker(synthetic_cfg):
    cfg = with_train(synthetic_cfg, batch_size=32, grad_accum=2, max_steps=3, tracker="tensorboard")
    result = train(cfg)
    rows = io.read_jsonl(cfg.run_dir / "metrics.jsonl")
    assert result["steps"] == 3 and [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["epoch"] == pytest.approx(3 * 2 * 32 / 128)  # 2 micro-batches of 32 per step
    flops = io.read_json(cfg.run_dir / "flops.json")["phases"]["train"]
    assert flops["samples"] == 3 * 64 and flops["flops"] == 3 * 2 * flops["parts"]["total"]
    assert list(cfg.run_dir.rglob("events.out.tfevents*"))
