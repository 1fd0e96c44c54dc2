"""`accelerate launch` with 2 CPU processes (gloo) gives the same results as one process."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hnet import io
from hnet.config import dump_yaml, load_config
from tests.conftest import tiny_overrides

ACCELERATE = shutil.which("accelerate", path=os.path.dirname(sys.executable))
pytestmark = pytest.mark.skipif(ACCELERATE is None, reason="accelerate CLI not installed")


def _run(script, cfg_path, processes):
    launch = [ACCELERATE, "launch", "--num_processes", str(processes), "--cpu"] if processes > 1 else [sys.executable]
    proc = subprocess.run(launch + [f"scripts/{script}", "--config", str(cfg_path)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_ddp_training_matches_one_process(synthetic_cfg, tmp_path):
    runs = {}
    for processes in (1, 2):
        cfg = dataclasses.replace(synthetic_cfg, name=f"p{processes}",
                                  train=dataclasses.replace(synthetic_cfg.train, max_steps=4, ckpt_every=2))
        path = tmp_path / f"p{processes}.yaml"
        path.write_text(dump_yaml(cfg))
        _run("learn_multi_mapper.py", path, processes)
        runs[processes] = cfg.run_dir
    losses = [[r["loss"] for r in io.read_jsonl(runs[p] / "metrics.jsonl")] for p in (1, 2)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    a, b = (load_file(str(runs[p] / "model.safetensors")) for p in (1, 2))
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_embedding_pass_split_over_two_processes_matches_one(tmp_path):
    manifests = {}
    for processes in (1, 2):
        cfg = load_config(None, tiny_overrides(tmp_path / f"p{processes}"))
        path = tmp_path / f"embed{processes}.yaml"
        path.write_text(dump_yaml(cfg))
        _run("embed.py", path, processes)
        manifests[processes] = json.loads((cfg.cache_path / "manifest.json").read_text())
    one, two = manifests[1], manifests[2]
    assert one["keys_sha256"] == two["keys_sha256"] and one["count"] == two["count"] == 240
    for name, entry in one["encoders"].items():
        assert entry["sha256"] == two["encoders"][name]["sha256"], name
