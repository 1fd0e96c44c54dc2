"""What each optimizer step touches: the learning-rate schedule, which pairs are drawn, AdamW's parameter groups,
gradient clipping (one norm, or one per APE connector), and the rows no drawn pair uses (kept bit for bit)."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import nn

from hnet.config import Config


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def encoder_subset(step: int, n: int, k: int, seed: int) -> np.ndarray:
    """Positions (of n trainable pairs) trained at this step: all, or k of n drawn from (seed, step) so every rank
    agrees."""
    if k <= 0 or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, step, 17]).choice(n, size=k, replace=False))


def draw_counts(n: int, k: int, seed: int, steps: int) -> np.ndarray:
    """How many of the first `steps` optimizer steps trained each of n pairs drawn k per step (draws are pure
    functions of seed and step, so a resumed run starts from the same counts)."""
    counts = np.zeros(n, dtype=np.int64)
    for step in range(steps):
        counts[encoder_subset(step, n, k, seed)] += 1
    return counts


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    per_epoch = max(1, steps_per_epoch // cfg.train.grad_accum)
    steps = max(1, int(round(cfg.train.epochs * per_epoch)))
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps > 0 else steps


NO_DECAY = ("log_scale", "bias", "norm", "cond", "layer_emb", "chunk_emb")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as open_clip makes them: weight decay on weight matrices only, never on logit scales,
    biases, norms or embeddings (cond, layer, chunk)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(part in name for part in NO_DECAY)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def layer_grad_norms(model: torch.nn.Module) -> dict[str, float]:
    return {f"grad_norm/{name}": float(p.grad.norm()) for name, p in model.named_parameters() if p.grad is not None}


@contextlib.contextmanager
def untouched_rows(optimizer: torch.optim.Optimizer, untouched: list[tuple[torch.Tensor, np.ndarray]], device):
    """Rows (pairs, or encoders' cond embeddings) no drawn pair uses keep their parameters and optimizer moments
    bit for bit: with zero gradients AdamW would still decay them and move them along their stale moments."""
    saved = []
    for p, rows in untouched:
        if len(rows) == 0:
            continue
        rows = torch.as_tensor(rows, device=device)
        moments = {k: v[rows].clone() for k, v in optimizer.state.get(p, {}).items()
                   if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == p.shape[0]}
        saved.append((p, rows, p.detach()[rows].clone(), moments))
    yield
    with torch.no_grad():
        for p, rows, values, moments in saved:
            p[rows] = values
            for key, value in moments.items():
                optimizer.state[p][key][rows] = value


def clip_per_encoder(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip each encoder's gradient (its row of every per-encoder tensor) on its own, as N single runs would;
    returns the largest per-encoder norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    squares = sum(g.reshape(g.shape[0], -1).float().pow(2).sum(dim=1) for g in grads)
    norms = squares.sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *[1] * (g.dim() - 1)).to(g.dtype))
    return float(norms.max())
