"""Two real ranks (torchrun, gloo on CPU) give what one process gives on the same global batch.

Every 2-rank run asserts, from files the ranks themselves wrote, that the world really had 2 processes
(`accelerate launch --num_processes 2 --cpu` starts ONE process, which is why these use torchrun).
"""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hnet import files
from hnet.config import dump_yaml, load_config
from tests.conftest import tiny_overrides, with_train

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def launch(script: str, cfg_path, processes: int, *overrides: str) -> None:
    launcher = TORCHRUN if processes == 2 else [sys.executable]
    proc = subprocess.run(launcher + [f"scripts/{script}", "--config", str(cfg_path), *overrides],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def train_both(cfg, tmp_path, script="learn_multi_mapper.py"):
    """The same config trained by 1 process and by 2 ranks; returns the two run dirs."""
    runs = {}
    for processes in (1, 2):
        run_cfg = dataclasses.replace(cfg, name=f"{cfg.name}_p{processes}")
        path = tmp_path / f"{run_cfg.name}.yaml"
        path.write_text(dump_yaml(run_cfg))
        launch(script, path, processes)
        runs[processes] = run_cfg.run_dir
    return runs[1], runs[2]


def assert_same_training(one, two, atol=3e-5):
    """Same lr column, same losses, same weights: Adam divides by the square root of tiny second moments, which
    turns float rounding (2 ranks sum in another order) into a few differences of ~1e-5 among 1M weights, so
    each tensor must agree elementwise to 3e-5 and as a whole to 1e-5 relative (Frobenius norm)."""
    rows1, rows2 = (files.read_jsonl(r / "metrics.jsonl") for r in (one, two))
    assert [r["world"] for r in rows1] == [1] * len(rows1)
    assert [r["world"] for r in rows2] == [2] * len(rows2), "the 2-rank run did not run on 2 ranks"
    assert files.read_json(two / "flops.json")["phases"]["train"]["parts"]["world"] == 2
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2]
    assert [r["lr"] for r in rows1] == [r["lr"] for r in rows2]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in rows2]), torch.tensor([r["loss"] for r in rows1]),
                               rtol=1e-5, atol=1e-6)
    a, b = (load_file(str(r / "model.safetensors")) for r in (one, two))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=atol, msg=key)
        assert (b[key] - a[key]).norm() <= 1e-5 * a[key].norm(), key


def _cfg(base, name, **train):
    return dataclasses.replace(with_train(base, max_steps=8, epochs=10, warmup_steps=3, ckpt_every=4, log_every=1,
                                          **train), name=name)


def test_hypernet_two_ranks_match_one_process(tiny_cfg, tmp_path):
    """On real (tiny) features, with the mid-run zero-shot probe on both ranks (eval set embedded split over them)."""
    one, two = train_both(_cfg(tiny_cfg, "hyper", eval_every=4), tmp_path)
    # the head's output columns past a pair's true widths get gradient from few rows: Adam's tiny second moments
    # there turn the ranks' other summation order into up to 2.7e-5 here (11 of 1M weights above 1e-5; relative
    # norm 1e-6), a little more on other CPUs; the norm bound (1e-5) still holds every tensor
    assert_same_training(one, two, atol=1e-4)
    probes = [[r["zeroshot_top1"] for r in files.read_jsonl(run / "metrics.jsonl") if "zeroshot_top1" in r]
              for run in (one, two)]
    assert len(probes[1]) == 2
    torch.testing.assert_close(torch.tensor(probes[1]), torch.tensor(probes[0]), rtol=0, atol=1.1)  # <= 1 image
    lrs = [r["lr"] for r in files.read_jsonl(two / "metrics.jsonl")]
    assert lrs[-1] == 0.0 and lrs[3] > 0.0  # one cosine over the whole run, not one per rank


def test_separate_two_ranks_match_one_process(synthetic_cfg, tmp_path):
    cfg = dataclasses.replace(_cfg(synthetic_cfg, "ape"), method="separate")
    one, two = train_both(cfg, tmp_path, "learn_separate_mapper.py")
    assert_same_training(one, two)


def test_k_of_n_two_ranks_match_one_process(synthetic_cfg, tmp_path):
    one, two = train_both(_cfg(synthetic_cfg, "k1", encoders_per_step=1), tmp_path)
    assert_same_training(one, two)


def test_pairs_two_ranks_match_one_process(pairs_cfg, tmp_path):
    """3 image x 2 text encoders, 3 of the 6 pairs drawn per step."""
    one, two = train_both(_cfg(pairs_cfg, "pairs", encoders_per_step=3, lr=2e-3), tmp_path)
    # this synthetic task is nearly separable: a few of Adam's near-zero second moments turn the ranks' other
    # summation order into differences up to ~7e-5 (relative norm 7e-6); losses agree to 1e-6
    assert_same_training(one, two, atol=1e-4)
    assert files.read_json(two / "model.json")["text_encoders"] == pairs_cfg.text_encoders
    assert "source.text_cond" not in load_file(str(two / "model.safetensors"))
    conds = [load_file(str(r / "cond_embeddings.safetensors")) for r in (one, two)]
    for key in conds[0]:  # the image and text vectors (text:NAME) live in cond_embeddings
        torch.testing.assert_close(conds[1][key], conds[0][key], rtol=1e-5, atol=3e-5)
    assert {k for k in conds[0] if k.startswith("text:")} == {f"text:{t}" for t in pairs_cfg.text_encoders}


def test_local_loss_two_ranks_match_one_process(synthetic_cfg, tmp_path):
    one, two = train_both(_cfg(synthetic_cfg, "local", local_loss=True), tmp_path)
    assert_same_training(one, two)  # tests/test_losses.py checks the local-loss gradients directly
    parts = [files.read_json(r / "flops.json")["phases"]["train"]["parts"] for r in (one, two)]
    assert parts[1]["local_loss"] is True
    # each of 2 ranks: B/2 rows x B columns, in 2 directions = B x B, so both ranks together compute twice the
    # one process's logits (as without local_loss at 2 ranks; the saving grows with the world size)
    assert parts[1]["logits_loss"] == 2 * parts[0]["logits_loss"]


def test_embedding_pass_split_over_two_ranks_matches_one(tmp_path):
    manifests = {}
    for processes in (1, 2):
        cfg = load_config(None, tiny_overrides(tmp_path / f"p{processes}"))
        path = tmp_path / f"embed{processes}.yaml"
        path.write_text(dump_yaml(cfg))
        launch("embed.py", path, processes)
        manifests[processes] = json.loads((cfg.cache_path / "manifest.json").read_text())
    one, two = manifests[1], manifests[2]
    assert {e["world"] for e in two["encoders"].values()} == {2}
    assert {e["world"] for e in one["encoders"].values()} == {1}
    assert one["keys_sha256"] == two["keys_sha256"] and one["count"] == two["count"] == 240
    for name, entry in one["encoders"].items():
        assert entry["sha256"] == two["encoders"][name]["sha256"], name


def metrics_rows(path) -> int:
    """Finished rows of a metrics.jsonl another process is appending to."""
    return path.read_text().count("\n") if path.exists() else 0


def test_sigterm_to_one_rank_stops_both_at_the_same_step(synthetic_cfg, tmp_path):
    """Preemption may signal one rank only: the flag is reduced, so both ranks checkpoint the same step and exit 0
    (unreduced, one rank waits in the checkpoint barrier while the other waits in all_gather)."""
    import time

    import psutil

    cfg = dataclasses.replace(with_train(synthetic_cfg, max_steps=100_000, epochs=100_000, ckpt_every=100_000,
                                         log_every=1), name="preempt")
    path = tmp_path / "preempt.yaml"
    path.write_text(dump_yaml(cfg))
    proc = subprocess.Popen(TORCHRUN + ["scripts/learn_multi_mapper.py", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    try:
        metrics = cfg.run_dir / "metrics.jsonl"
        deadline = time.time() + 120
        while metrics_rows(metrics) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "RANK" in p.environ()]
        rank1 = next(p for p in workers if p.environ()["RANK"] == "1")
        rank1.send_signal(15)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    rows = files.read_jsonl(cfg.run_dir / "metrics.jsonl")
    saved = sorted((cfg.run_dir / "checkpoints").iterdir())
    assert {r["world"] for r in rows} == {2}
    assert saved and saved[-1].name == f"step_{rows[-1]['step']:08d}"
    assert not (cfg.run_dir / "model.safetensors").exists()  # stopped early: resume, not a finished model


def test_search_on_two_ranks(tiny_cfg, tmp_path):
    """scripts/search.py under 2 ranks: training, then evaluation in the same processes (the process group must
    outlive training), and one search.json written."""
    cfg = dataclasses.replace(with_train(tiny_cfg, epochs=10), name="search2")
    cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, steps=4, encoders_per_step=2,
                                                              samples_per_encoder=128))
    path = tmp_path / "search2.yaml"
    path.write_text(dump_yaml(cfg))
    launch("search.py", path, 2)
    run = cfg.out_root + "/search2_search_hypernet"
    out = files.read_json(f"{run}/search.json")
    assert {r["world"] for r in files.read_jsonl(f"{run}/metrics.jsonl")} == {2}
    assert len(out["ranking"]) == 3 and out["flops"]["steps"] == 4
    # the grid search is estimated at the search's world size, as a 2-rank separate run's ledger counts it
    from hnet.experiments.search import grid_search_steps, training_sample_count
    from hnet.flops import grid_search_cost

    meta = files.read_json(f"{run}/model.json")
    count = training_sample_count(cfg)
    text = out["grid_search"]["embed"] / count - sum(files.read_json(f"{cfg.cache_root}/manifest.json")[
        "flops_per_sample"][n] for n in meta["image_encoders"])
    at_two = grid_search_cost(cfg, meta, count, text, grid_search_steps(cfg, count), world=2)
    assert out["grid_search"]["train"] == at_two["train"] > grid_search_cost(
        cfg, meta, count, text, grid_search_steps(cfg, count))["train"]


def test_ledger_counts_what_every_rank_computes(tmp_path):
    """One hypernetwork step on 2 ranks, counted by torch on each: the sum equals the ledger's formula at world 2,
    with and without local_loss (every rank generates every connector and, without local_loss, computes all the
    global logits)."""
    from hnet.config import HypernetConfig
    from hnet.flops import train_step_flops
    from hnet.models.connectors import ConnectorShape
    from hnet.models.stitch import StitchModel

    model = StitchModel("hypernet", ConnectorShape("linear", "image_to_text", 48, 32), [48, 24, 40],
                        HypernetConfig(hidden=64, chunk_size=256))
    for local in (False, True):
        out = tmp_path / f"local_{local}"
        out.mkdir()
        proc = subprocess.run(TORCHRUN + ["tests/workers/step_flops.py", str(out)] + (["local"] if local else []),
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        counts = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        assert [c["world"] for c in counts] == [2, 2]
        formula = train_step_flops(model, 3, 32, world=2, local=local)
        assert formula["total"] == pytest.approx(sum(c["flops"] for c in counts), rel=0.01), local


def test_autodecode_two_ranks_match_one_process(tiny_cfg, tmp_path):
    """scripts/autodecode.py on 2 ranks (the batch split over them, as in a run) decodes what 1 process decodes."""
    import shutil

    from hnet.train.loop import train
    from tests.conftest import TINY_ENCODERS

    new = TINY_ENCODERS[2]
    cfg = dataclasses.replace(with_train(tiny_cfg, max_steps=4), encoders=TINY_ENCODERS[:2], name="ad2")
    train(cfg)
    decoded = {}
    for processes in (1, 2):
        run = tmp_path / f"run{processes}"
        shutil.copytree(cfg.run_dir, run)
        launcher = TORCHRUN if processes == 2 else [sys.executable]
        proc = subprocess.run(launcher + ["scripts/autodecode.py", "--encoder", new, "--run-dir", str(run), "--weights",
                                          "random", "autodecode.steps=3", "autodecode.eval_every=1",
                                          "autodecode.batch_size=64"], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        decoded[processes] = (files.read_json(run / "autodecode" / f"{files.slug(new)}.json"),
                              load_file(str(run / "cond_embeddings.safetensors"))[new])
    (one, vec1), (two, vec2) = decoded[1], decoded[2]
    assert one["world"] == 1 and two["world"] == 2, "the 2-rank decoding did not run on 2 ranks"
    assert [p["step"] for p in two["curve"]] == [0, 1, 2, 3]
    torch.testing.assert_close(torch.tensor([p["top1"] for p in two["curve"]]),
                               torch.tensor([p["top1"] for p in one["curve"]]), rtol=0, atol=1.1)  # <= 1 image
    losses = lambda result: torch.tensor([p["loss"] for p in result["curve"][1:]])
    torch.testing.assert_close(losses(two), losses(one), rtol=1e-5, atol=1e-6)  # the same global batches
    torch.testing.assert_close(vec2, vec1, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tuned", [False, True], ids=["plain", "prefilter_and_lrs"])
def test_halving_two_ranks_decide_as_one_process(tmp_path, tuned):
    """One halving search by 1 process and by 2 ranks, each embedding what it asks for (pieces split over the ranks):
    the same rung decisions, scores and cost; the rung runs really ran on 2 ranks. `tuned`: with a proxy prefilter
    (one rank scores and writes it, both read it back) and two learning rates tried per rung."""
    outs = {}
    extra = ["search.lrs=[0.01, 0.05]", "search.prefilter=linear_cka"] if tuned else []
    for processes in (1, 2):
        cfg = load_config(None, tiny_overrides(tmp_path / f"p{processes}") + [
            "text_encoders=[all-MiniLM-L6-v2, all-MiniLM-L6-v2@layers=3]", "search.val_samples=40",
            "search.rung_samples=80", "search.rung_steps=2", "search.eta=2", *extra])
        path = tmp_path / f"halving{processes}.yaml"
        path.write_text(dump_yaml(cfg))
        launch("search.py", path, processes, "--method", "halving")
        outs[processes] = files.read_json(tmp_path / f"p{processes}" / "tiny_search_halving" / "search.json")
    one, two = outs[1], outs[2]
    assert [r["kept"] for r in two["rungs"]] == [r["kept"] for r in one["rungs"]]
    assert [r["lr"] for r in two["rungs"]] == [r["lr"] for r in one["rungs"]]
    assert bool(one["prefilter"]) == tuned and bool(two["prefilter"]) == tuned
    if tuned:
        assert two["prefilter"]["kept"] == one["prefilter"]["kept"]
        assert two["prefilter"]["scores"] == pytest.approx(one["prefilter"]["scores"], abs=1e-4)
    for r1, r2 in zip(one["rungs"], two["rungs"]):
        assert r2["scores"].keys() == r1["scores"].keys()
        for pair in r1["scores"]:
            assert abs(r2["scores"][pair] - r1["scores"][pair]) < 1e-3, pair
        for t in r2.get("tries", []):
            assert [row["world"] for row in files.read_jsonl(f"{t['run']}/metrics.jsonl")] == [2] * r2["steps"]
    assert two["flops"]["embed_parts"] == one["flops"]["embed_parts"]
    pieces = (tmp_path / "p2" / "cache" / "demo" / "search" / "val40_first").glob("*_*/manifest.json")
    worlds = {e.get("world") for m in pieces for e in files.read_json(m)["encoders"].values()}
    assert worlds == {2}, "the pieces were not embedded by 2 ranks"
