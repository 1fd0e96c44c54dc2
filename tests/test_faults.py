"""Reliability: kills, signals, corrupted checkpoints, non-finite losses, bad flags."""
import dataclasses
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hnet import files
from hnet.config import dump_yaml
from hnet.data.cache import write_cache
from hnet.models.encoders import text_key
from hnet.train.checkpoint import CheckpointError, checkpoint_dirs
from hnet.train.loop import NonFiniteError, train
from tests.conftest import with_train

SCRIPT = [sys.executable, "scripts/learn_multi_mapper.py"]



def _start(cfg, tmp_path, *extra):
    path = tmp_path / f"{cfg.name}.yaml"
    path.write_text(dump_yaml(cfg))
    return subprocess.Popen(SCRIPT + ["--config", str(path), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _wait_for_checkpoint(cfg, step, proc, timeout=120):
    target = cfg.run_dir / "checkpoints" / f"step_{step:08d}" / "trainer_state.json"
    end = time.time() + timeout
    while not target.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < end, "no checkpoint in time"
        time.sleep(0.05)


@pytest.mark.parametrize("zoo,k", [("synthetic_cfg", 0), ("pairs_cfg", 3)])
def test_sigkill_then_resume_equals_uninterrupted(zoo, k, request, tmp_path):
    """Also for 3 x 2 (image, text) pairs, 3 of 6 drawn per step (pair draws and untouched rows resume too)."""
    cfg = with_train(request.getfixturevalue(zoo), max_steps=120, epochs=1000, ckpt_every=20, log_every=20,
                     encoders_per_step=k)
    straight = dataclasses.replace(cfg, name="straight")
    train(straight)
    killed = dataclasses.replace(cfg, name="killed")
    proc = _start(killed, tmp_path)
    _wait_for_checkpoint(killed, 40, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed.run_dir / "model.safetensors").exists()
    train(with_train(killed, resume="latest"))
    a, b = load_file(str(straight.run_dir / "model.safetensors")), load_file(str(killed.run_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]
    metrics = lambda run: strip(files.read_jsonl(run.run_dir / "metrics.jsonl"))
    assert metrics(straight) == metrics(killed)


def test_sigterm_writes_a_checkpoint_before_exit(synthetic_cfg, tmp_path):
    cfg = with_train(synthetic_cfg, max_steps=100000, epochs=100000, ckpt_every=50)
    proc = _start(cfg, tmp_path)
    _wait_for_checkpoint(cfg, 50, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "stopped by signal after step" in out
    last = checkpoint_dirs(cfg.run_dir)[-1]
    assert int(last.name.split("_")[1]) > 50  # written at the step the signal landed on


def test_corrupted_checkpoint_detected_with_file_named(synthetic_cfg):
    cfg = with_train(synthetic_cfg, max_steps=4, ckpt_every=2)
    train(cfg)
    ckpt = checkpoint_dirs(cfg.run_dir)[-1]
    victim = next(p for p in ckpt.iterdir() if p.name.startswith("model"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{victim.name}: checksum mismatch"):
        train(with_train(cfg, resume="latest"))


def test_unfinished_checkpoint_cleaned_and_previous_one_used(synthetic_cfg):
    """Killed while writing a checkpoint: the temp folder is removed, the previous checkpoint resumes."""
    cfg = with_train(synthetic_cfg, max_steps=4, ckpt_every=2)
    train(with_train(cfg, max_steps=2))
    partial = cfg.run_dir / "checkpoints" / "step_00000003.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a checkpoint")
    train(with_train(cfg, resume="latest"))
    assert not partial.exists()
    assert [p.name for p in checkpoint_dirs(cfg.run_dir)] == ["step_00000002", "step_00000004"]


def _nan_cfg(synthetic_cfg, tmp_path):
    rng = np.random.default_rng(1)
    arrays = {n: rng.normal(size=(128, 16)) / 4 for n in synthetic_cfg.encoders}
    arrays[text_key("all-MiniLM-L6-v2")] = rng.normal(size=(128, 24)) / 5
    arrays[synthetic_cfg.encoders[0]][5] = np.nan
    write_cache(tmp_path / "nan_cache", [f"k{i}" for i in range(128)], arrays, "all-MiniLM-L6-v2")
    return dataclasses.replace(synthetic_cfg, data=dataclasses.replace(synthetic_cfg.data,
                                                                       cache_dir=str(tmp_path / "nan_cache")))


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(synthetic_cfg, tmp_path):
    cfg = with_train(_nan_cfg(synthetic_cfg, tmp_path), max_steps=6, ckpt_every=1)
    with pytest.raises(NonFiniteError, match="non-finite loss/gradient at step"):
        train(cfg)


def test_nonfinite_skip_counts_and_stays_finite(synthetic_cfg, tmp_path):
    cfg = with_train(_nan_cfg(synthetic_cfg, tmp_path), max_steps=6, nonfinite="skip")
    train(cfg)
    rows = files.read_jsonl(cfg.run_dir / "metrics.jsonl")
    # 4 steps (2 epochs of 2 batches); one batch of each epoch holds the NaN sample
    assert [r["skipped_steps"] for r in rows] == [1, 1, 2, 2]
    assert all(torch.isfinite(t).all() for t in load_file(str(cfg.run_dir / "model.safetensors")).values())


@pytest.mark.parametrize("flag,message", [
    ("train.lrr=1", "unknown config key 'train.lrr' (did you mean 'lr'?)"),
    ("train.batch_size=abc", "train.batch_size: expected an integer"),
    ("encoders=[vit_smal_patch16_224]", "unknown timm model 'vit_smal_patch16_224'"),
    ("data.shards=/nowhere/{000000..000009}.tar", "matches no shard files"),
    ("data.shards= data.metadata=/nowhere/metadata.json data.images=/nowhere", "folder not found: /nowhere"),
])
def test_bad_flags_exit_2_with_one_line_and_write_nothing(tmp_path, flag, message):
    out = tmp_path / "runs"
    proc = subprocess.run(SCRIPT + ["--config", "configs/demo.yaml", f"out_root={out}", "data.source=cc595k",
                                    "data.shards=/nowhere/x.tar", *flag.split()], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (out / "demo_hypernet").exists()


def test_checkpoint_of_an_earlier_hnet_is_refused_with_a_reason(tmp_path):
    """Checkpoints whose scheduler accelerate stepped once per rank (scheduler.bin) cannot be resumed as they are."""
    from hnet.train.checkpoint import CheckpointError, verify_checkpoint

    files.write_json(tmp_path / "trainer_state.json", {"step": 3, "sha256": {}})
    (tmp_path / "scheduler.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="written by an earlier hnet"):
        verify_checkpoint(tmp_path)
