"""Mixture-of-experts connectors (hnet/models/moe.py): routing, the balance loss (by hand, and over 2 real ranks),
padded == unpadded (separate and generated), the FLOPs ledger against torch's counter, and a run's diagnostics.

This file is also the 2-rank worker of test_balance_loss_is_global_on_two_ranks:
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/test_moe.py OUT_DIR
"""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hnet.config import HypernetConfig
from hnet.models.connectors import Connector, ConnectorShape, SeparateConnectors
from hnet.models.hypernet import HyperNetwork
from hnet.models.moe import balance_loss, moe_forward, moe_losses, route, z_loss
from hnet.models.stitch import project
from tests.conftest import padded_pair_features

WIDTHS = [24, 40]
TEXT_WIDTHS = [20, 32]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
GLOBAL_BATCH = 16


def moe_shape(direction="image_to_text", expert_kind="mlp", **kw):
    return ConnectorShape("moe", direction, max(WIDTHS), max(TEXT_WIDTHS), depth=2, hidden=16, experts=4, top_k=2,
                          expert_kind=expert_kind, **kw)


def test_gate_top_k_and_renormalisation():
    """top-2 of 4 by gate probability, weights renormalised over the 2; the output is their weighted sum."""
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.6, 0.05, 0.05, 0.3]])
    _, chosen, weights = route(probs.log(), 2)
    assert chosen.tolist() == [[1, 2], [0, 3]]
    torch.testing.assert_close(weights, torch.tensor([[0.5 / 0.8, 0.3 / 0.8], [0.6 / 0.9, 0.3 / 0.9]]))
    # the whole connector: linear experts whose outputs are constants (bias only) expose the combination
    shape = ConnectorShape("moe", "image_to_text", 4, 3, experts=4, top_k=2, expert_kind="linear")
    x = torch.eye(4)[:2]  # gate weight = log(probs) rows per sample: identity input reads them out
    gate = torch.zeros(1, 4, 4)
    gate[0, :2] = probs.log()
    experts = [(torch.zeros(1, 4, 3), torch.full((1, 3), float(e + 1))) for e in range(4)]
    out, logits = moe_forward(x, [(gate, torch.zeros(1, 4))] + experts, 4, 2)
    expected = torch.tensor([[2 * 0.5 / 0.8 + 3 * 0.3 / 0.8], [1 * 0.6 / 0.9 + 4 * 0.3 / 0.9]]).expand(2, 3)
    torch.testing.assert_close(out[0], expected)
    single = Connector.from_params(shape, [(gate, torch.zeros(1, 4))] + experts, 4, 3)
    torch.testing.assert_close(single(x), expected)


def test_balance_loss_hand_computed():
    """Pair 1: top-2 assignments per expert 3, 2, 1, 2 of 8 and mean probabilities .375, .225, .175, .225:
    E * sum f P = 4 * 2.2 / 8 = 1.1. Pair 2: uniform probabilities, 4 * 0.25 = 1 whatever the ties. Mean 1.05."""
    p1 = torch.tensor([[0.6, 0.25, 0.1, 0.05], [0.1, 0.5, 0.3, 0.1], [0.3, 0.05, 0.15, 0.5], [0.5, 0.1, 0.15, 0.25]])
    logits = torch.stack([p1.log() + 1.0, torch.zeros(4, 4)])  # logsumexp: 1 (pair 1), log 4 (pair 2)
    total, stats = moe_losses(logits, top_k=2, alpha=0.01, z_coef=0.1)
    assert stats["moe/balance_loss"] == pytest.approx(0.01 * 1.05)
    assert stats["moe/z_loss"] == pytest.approx(0.1 * (1 + math.log(4) ** 2) / 2)
    assert float(total) == pytest.approx(0.01 * 1.05 + 0.1 * (1 + math.log(4) ** 2) / 2)
    _, one = moe_losses(logits[:1], top_k=2, alpha=0.01, z_coef=0.0)
    assert [one[f"moe/load/{e}"] for e in range(4)] == pytest.approx([3 / 8, 2 / 8, 1 / 8, 2 / 8])
    assert one["moe/balance_loss"] == pytest.approx(0.011) and one["moe/dead_experts"] == 0
    f = torch.tensor([3, 2, 1, 2]) / 8
    assert one["moe/routing_entropy"] == pytest.approx(float(-(f * f.log()).sum() / math.log(4)))
    load = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert float(balance_loss(load, torch.full((1, 4), 0.25), 1.0)) == pytest.approx(1.0)
    assert float(z_loss(torch.zeros(3, 5, 4), 2.0)) == pytest.approx(2.0 * math.log(4) ** 2)


def _global_logits() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(3, GLOBAL_BATCH, 4) * 2  # 3 pairs: skewed routing, unlike between the two halves


def test_balance_loss_is_global_on_two_ranks(tmp_path):
    """Each of 2 ranks holds half of the global batch: their loss, load and gradients (DDP divides the summed
    gradients by the world size) equal one process's on the whole batch, and they differ from a half's alone."""
    proc = subprocess.run(TORCHRUN + ["tests/test_moe.py", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2], "the worker did not run on 2 ranks"
    logits = _global_logits().requires_grad_()
    total, stats = moe_losses(logits, 2, 0.01, 0.0)
    total.backward()
    half, _ = moe_losses(logits.detach()[:, : GLOBAL_BATCH // 2], 2, 0.01, 0.0)
    assert float(half.detach()) != pytest.approx(float(total.detach()), rel=1e-3)  # the halves alone would not do
    for r, rank in enumerate(ranks):
        assert rank["loss"] == pytest.approx(float(total.detach()), rel=1e-6)
        assert rank["stats"] == pytest.approx(stats, rel=1e-6)
        rows = slice(r * GLOBAL_BATCH // 2, (r + 1) * GLOBAL_BATCH // 2)
        torch.testing.assert_close(torch.tensor(rank["grad"]) / 2, logits.grad[:, rows])


def _worker(out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    share = GLOBAL_BATCH // world
    logits = _global_logits()[:, rank * share: (rank + 1) * share].clone().requires_grad_()
    total, stats = moe_losses(logits, 2, 0.01, 0.0)
    total.backward()
    with open(f"{out}/rank{rank}.json", "w") as fh:
        json.dump({"world": world, "loss": float(total.detach()), "stats": stats, "grad": logits.grad.tolist()}, fh)
    dist.barrier()  # neither rank tears gloo down while the other still talks to it (an abort seen on CI)
    dist.destroy_process_group()


@pytest.mark.parametrize("source", ["separate", "hypernet"])
@pytest.mark.parametrize("expert_kind", ["linear", "mlp"])
@pytest.mark.parametrize("direction", ["image_to_text", "text_to_image"])
def test_padded_moe_equals_unpadded(source, expert_kind, direction):
    """Every (image, text) width pair padded in one batched call gives what its plain unpadded moe Connector
    (gate + only its samples' k experts) gives; the generated ones equal all-chunks generation."""
    torch.manual_seed(0)
    shape = moe_shape(direction, expert_kind)
    pairs = [(w, t) for w in WIDTHS for t in TEXT_WIDTHS]
    index = torch.arange(len(pairs))
    if source == "separate":
        params = SeparateConnectors(shape, [w for w, _ in pairs], text_widths=[t for _, t in pairs])(index)
    else:
        hyper = HyperNetwork(shape, WIDTHS, HypernetConfig(chunk_size=96), text_widths=TEXT_WIDTHS)
        params = hyper(index)
        hyper.all_chunks, hyper._needed = True, {}
        everything = hyper(index)
    widths, text_widths, images, texts, padded, padded_text = padded_pair_features(pairs, 9)
    a, b = project(shape, params, widths, text_widths, padded, padded_text)
    mapped, inputs = (a, images) if direction == "image_to_text" else (b, texts)
    for i, (w, t) in enumerate(pairs):
        out_width = t if direction == "image_to_text" else w
        single = Connector.from_params(shape, [(W[i:i + 1], bb[i:i + 1]) for W, bb in params], w, t)
        torch.testing.assert_close(mapped[i, :, :out_width], F.normalize(single(inputs[i]), dim=-1))
        assert not mapped[i, :, out_width:].any()
    if source == "hypernet":
        a2, b2 = project(shape, everything, widths, text_widths, padded, padded_text)
        torch.testing.assert_close(a2 @ b2.transpose(1, 2), a @ b.transpose(1, 2))


def test_moe_step_flops_match_torch_counter():
    """One training step of a pair's unpadded moe connector, computed sparsely (each expert on its routed samples
    only, the plain Connector), counted by torch's FlopCounterMode, equals the ledger's connector part: the gate on
    every sample, the k active experts per sample, weight gradients for all, input gradients past the first layer."""
    from torch.utils.flop_counter import FlopCounterMode

    from hnet.flops import train_step_flops, zeroshot_head_flops
    from hnet.models.stitch import StitchModel

    torch.manual_seed(0)
    batch, width, text_width = 64, 40, 32
    shape = moe_shape()
    model = StitchModel("separate", shape, [width], HypernetConfig(), text_widths=[text_width])
    single = Connector.from_params(shape, model.source(torch.tensor([0])), width, text_width)
    x = torch.randn(batch, width)
    with FlopCounterMode(display=False) as counter:
        single(x).square().sum().backward()
    ledger = train_step_flops(model, 1, batch)
    assert ledger["connectors"] == counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        single(x[:1])
    assert zeroshot_head_flops(shape, 0) == counter.get_total_flops()


def test_moe_run_logs_routing_and_evaluates(tiny_cfg):
    """A tiny hypernetwork moe run: the balance and z losses and the routing diagnostics in metrics.jsonl; the
    zero-shot routing (load, entropy, dead experts, by class) in eval.json."""
    from hnet import files
    from hnet.eval.evaluate import evaluate_run
    from hnet.train.loop import train
    from tests.conftest import with_train

    connector = dataclasses.replace(tiny_cfg.connector, kind="moe", hidden=16, z_loss=1e-3)
    cfg = dataclasses.replace(with_train(tiny_cfg, max_steps=3), connector=connector)
    train(cfg)
    row = files.read_jsonl(cfg.run_dir / "metrics.jsonl")[-1]
    assert row["moe/balance_loss"] > 0 and row["moe/z_loss"] > 0
    assert sum(row[f"moe/load/{e}"] for e in range(4)) == pytest.approx(1.0)
    assert 0 < row["moe/routing_entropy"] <= 1 and row["moe/dead_experts"] >= 0
    result = evaluate_run(cfg, cfg.run_dir, ["demo"])
    routing = next(iter(result["datasets"]["demo"]["encoders"].values()))["routing"]
    assert sum(routing["load"]) == pytest.approx(1.0) and 0 <= routing["routing_entropy"] <= 1
    assert len(routing["by_class"]) == len(result["datasets"]["demo"]["classes"])
    assert all(sum(c) == pytest.approx(1.0) for c in routing["by_class"] if sum(c))


if __name__ == "__main__":
    _worker(sys.argv[1])
