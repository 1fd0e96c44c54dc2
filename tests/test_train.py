import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hnet import files
from hnet.config import ConfigError
from hnet.data.cache import CachedFeatures
from hnet.runs import connector_for, load_model
from hnet.train.loop import train
from tests.conftest import with_train


def test_overfit_one_batch_drives_loss_near_zero(synthetic_cfg):
    cfg = with_train(synthetic_cfg, overfit_batches=1, epochs=1000, max_steps=150, lr=1e-2, warmup_steps=5,
                log_every=150, logit_scale="fixed", logit_scale_init=100.0)
    result = train(cfg)
    assert result["last"]["loss"] < 0.05


def test_metrics_and_run_files(tiny_cfg):
    train(with_train(tiny_cfg, max_steps=4))
    run = tiny_cfg.run_dir
    rows = files.read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "lr", "logit_scale", "grad_norm", "samples_per_s", "flops_cum"):
        assert key in rows[-1]
    assert any(k.startswith("grad_norm/source.") for k in rows[-1])
    assert rows[-1]["flops_cum"] == 4 * rows[0]["flops_cum"]
    for name in ("config.yaml", "flops.json", "model.safetensors", "cond_embeddings.safetensors", "model.json"):
        assert (run / name).exists(), name
    conds = load_file(str(run / "cond_embeddings.safetensors"))
    assert sorted(conds) == sorted(files.read_json(run / "model.json")["names"])
    assert files.read_json(run / "flops.json")["phases"]["train"]["parts"]["device"] == "cpu"  # where it trained


def test_resume_latest_equals_uninterrupted(tiny_cfg):
    straight = dataclasses.replace(with_train(tiny_cfg, max_steps=6, ckpt_every=3), name="straight")
    train(straight)
    # a run killed after step 5 whose last checkpoint is step 3: its files as the kill left them
    killed = dataclasses.replace(straight, name="killed")
    shutil.copytree(straight.run_dir, killed.run_dir)
    shutil.rmtree(killed.run_dir / "checkpoints" / "step_00000006")
    for name in ("model.safetensors", "cond_embeddings.safetensors", "model.json"):
        (killed.run_dir / name).unlink()
    rows = files.read_jsonl(killed.run_dir / "metrics.jsonl")[:5]
    files.write_text(killed.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    train(with_train(killed, resume="latest"))
    a = load_file(str(straight.run_dir / "model.safetensors"))
    b = load_file(str(killed.run_dir / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]
    metrics = lambda run: strip(files.read_jsonl(run.run_dir / "metrics.jsonl"))
    assert metrics(straight) == metrics(killed)
    assert files.read_json(straight.run_dir / "flops.json") == files.read_json(killed.run_dir / "flops.json")


def test_connector_for_is_a_plain_module_matching_the_model(tiny_cfg):
    train(with_train(tiny_cfg, max_steps=3))
    model, names = load_model(tiny_cfg.run_dir)
    cache = CachedFeatures(tiny_cfg.cache_path, names)
    name = names[1]
    x = torch.from_numpy(np.asarray(cache[name][:5], np.float32))
    module = connector_for(tiny_cfg.run_dir, name)
    assert type(module).__module__ == "hnet.models.connectors" and isinstance(module, torch.nn.Module)
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
    rows = files.read_jsonl(cfg.run_dir / "metrics.jsonl")
    assert result["steps"] == 3 and [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["epoch"] == pytest.approx(3 * 2 * 32 / 128)  # 2 micro-batches of 32 per step
    flops = files.read_json(cfg.run_dir / "flops.json")["phases"]["train"]
    assert flops["samples"] == 3 * 64 and flops["flops"] == 3 * 2 * flops["parts"]["total"]
    assert list(cfg.run_dir.rglob("events.out.tfevents*"))


def _checkpoint_state(run_dir, step):
    folder = run_dir / "checkpoints" / f"step_{step:08d}"
    return load_file(str(folder / "model.safetensors")), torch.load(folder / "optimizer.bin", weights_only=False)


@pytest.mark.parametrize("method", ["hypernet", "separate"])
def test_encoder_not_drawn_gets_no_update(synthetic_cfg, method):
    """k=1 of 3: the encoder drawn at step s-1 but not at step s keeps its parameters AND its (non-zero) Adam
    moments bit for bit through step s; checkpoints s and s+1 hold the states before and after."""
    from hnet.train.optim import encoder_subset

    drawn = lambda s: int(encoder_subset(s, 3, 1, synthetic_cfg.train.seed)[0])
    step = next(s for s in range(1, 50) if drawn(s) != drawn(s - 1))
    idle = drawn(step - 1)
    cfg = dataclasses.replace(with_train(synthetic_cfg, encoders_per_step=1, max_steps=step + 1, epochs=100,
                                         ckpt_every=1, weight_decay=0.1, warmup_steps=1), method=method)
    train(cfg)
    (before, opt_before), (after, opt_after) = _checkpoint_state(cfg.run_dir, step), _checkpoint_state(cfg.run_dir,
                                                                                                       step + 1)
    per_encoder = ["source.cond"] if method == "hypernet" else [k for k in before if k.startswith("source.")]
    moved = 0
    for key in per_encoder:
        assert torch.equal(before[key][idle], after[key][idle]), key
        moved += int(not torch.equal(before[key], after[key]))
    assert moved, "the drawn encoder must have moved"
    for pid, state in opt_after["state"].items():
        for name, value in state.items():
            old = opt_before["state"][pid][name]
            if value.dim() and value.shape[0] == 3:
                assert torch.equal(value[idle], old[idle]), (pid, name)


def test_separate_connectors_trained_together_equal_single_runs(synthetic_cfg):
    names = synthetic_cfg.encoders[:2]
    base = dataclasses.replace(with_train(synthetic_cfg, max_steps=6, epochs=10, warmup_steps=2, weight_decay=0.1,
                                          grad_clip=0.05), method="separate")
    runs = [dataclasses.replace(base, name="both", encoders=names)]
    runs += [dataclasses.replace(base, name=f"only{i}", encoders=[n]) for i, n in enumerate(names)]
    for cfg in runs:
        train(cfg)
    both = load_file(str(runs[0].run_dir / "model.safetensors"))
    widths = files.read_json(runs[0].run_dir / "model.json")["widths"]
    for i, cfg in enumerate(runs[1:]):
        alone = load_file(str(cfg.run_dir / "model.safetensors"))
        torch.testing.assert_close(both["log_scale"][i:i + 1], alone["log_scale"], rtol=1e-5, atol=1e-6)
        w = widths[i]
        torch.testing.assert_close(both["source.weights.0"][i, :w], alone["source.weights.0"][0],
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(both["source.biases.0"][i], alone["source.biases.0"][0], rtol=1e-5, atol=1e-6)
        assert not both["source.weights.0"][i, w:].any()  # padding stays zero
    # each connector got the gradient it gets alone (a sum over connectors, not a mean): same pre-clip norms
    norms = [[r["grad_norm"] for r in files.read_jsonl(cfg.run_dir / "metrics.jsonl")] for cfg in runs]
    torch.testing.assert_close(torch.tensor(norms[0]), torch.tensor(norms[1:]).max(dim=0).values, rtol=1e-4, atol=0)


def test_weight_decay_only_on_weight_matrices(synthetic_cfg):
    from hnet.models.stitch import build_model
    from hnet.train.optim import param_groups

    for method in ("hypernet", "separate"):
        model = build_model(dataclasses.replace(synthetic_cfg, method=method), ["a", "b"], [16, 32], ["t"], [24])
        decay, no_decay = param_groups(model, 0.5)
        ids = {id(p) for p in decay["params"]}
        names = {n for n, p in model.named_parameters() if id(p) in ids}
        expected = ({"source.trunk.0.weight", "source.trunk.2.weight", "source.head.weight"} if method == "hypernet"
                    else {"source.weights.0"})
        assert names == expected and decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0


def test_signal_handlers_restored_after_training(synthetic_cfg):
    """Training installs its stop handlers and puts back whatever was there before (however pytest was started:
    a background job starts with SIGINT ignored)."""
    import signal

    def mine(*_):
        pass

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, mine)
    try:
        train(with_train(synthetic_cfg, max_steps=1))
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_cache_of_another_text_encoder_refused(synthetic_cfg):
    from hnet.data.cache import CacheError

    with pytest.raises(CacheError, match="no features for 'text:x'"):
        train(dataclasses.replace(synthetic_cfg, text_encoder="x"))
