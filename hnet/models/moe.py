"""Mixture-of-experts connectors (`connector.kind: moe`): a top-k gated mixture of E expert connectors per pair
(CuMo: the MLP connector split into experts, top-2 of 4; Switch/GShard conventions).

Parameter layout (ConnectorShape.layers for moe): layer 0 is the gate, a bias-free linear [in, E] from the mapped
side's input to E logits (its bias slot exists in Params but is never generated, trained or read); then the E
experts' layers, expert by expert, each a `linear` or `mlp` connector of the run's widths. The hypernetwork
generates all of them per pair through its one chunked decoder, as it generates the layers of any connector.

Routing: softmax of the logits in fp32, the top-k experts per sample, their probabilities renormalised over the k;
the output is the weighted sum of those k experts' outputs. The batched (padded, N pairs) forward computes every
expert densely and weights the non-chosen ones by zero (same outputs and gradients); the FLOPs ledger, as the
issue asks, counts the gate and only the k active experts per sample, which is what `Connector` (the plain module)
computes: it gathers each expert's samples.

Losses: Switch's balance loss alpha * E * sum_i f_i P_i per pair (f_i: share of the routed assignments to expert i,
P_i: mean gate probability of expert i), averaged over pairs, from per-expert sums all-reduced over ranks, so that
2 ranks give what 1 process gives on the same global batch; and an optional router z-loss, mean logsumexp^2.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

Params = list[tuple[torch.Tensor, torch.Tensor]]


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [..., E] -> (probs [..., E] fp32, chosen [..., k] expert ids, weights [..., k] renormalised)."""
    probs = logits.float().softmax(dim=-1)
    top, chosen = probs.topk(top_k, dim=-1)
    return probs, chosen, top / top.sum(dim=-1, keepdim=True)


def combine_weights(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """[..., E] weight of each expert per sample: its renormalised gate value if chosen, else 0."""
    _, chosen, weights = route(logits, top_k)
    return torch.zeros_like(logits, dtype=torch.float32).scatter(-1, chosen, weights)


def split_experts(params: Params, experts: int) -> tuple[tuple[torch.Tensor, torch.Tensor], list[Params]]:
    """Params of a moe connector -> (gate (W, b), per expert its layers)."""
    per = (len(params) - 1) // experts
    return params[0], [params[1 + e * per: 1 + (e + 1) * per] for e in range(experts)]


def dense_forward(x: torch.Tensor, params: Params) -> torch.Tensor:
    """x [N, B, in] through batched layers (W [N, in, out], b [N, out]), GELU between them."""
    for i, (weight, bias) in enumerate(params):
        x = torch.baddbmm(bias.unsqueeze(1), x, weight)
        if i < len(params) - 1:
            x = F.gelu(x)
    return x


def moe_forward(x: torch.Tensor, params: Params, experts: int, top_k: int,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, B, in] (or [B, in] shared) -> (output [N, B, out], gate logits [N, B, E] fp32)."""
    (gate, _), expert_params = split_experts(params, experts)
    if x.dim() == 2:
        x = x.unsqueeze(0).expand(gate.shape[0], -1, -1)
    logits = torch.bmm(x.float(), gate.float())
    weights = combine_weights(logits, top_k).to(x.dtype)
    out = sum(weights[..., e: e + 1] * dense_forward(x, p) for e, p in enumerate(expert_params))
    if mask is not None:
        out = out * mask.unsqueeze(1).to(out.dtype)
    return out, logits


def sparse_forward(x: torch.Tensor, logits: torch.Tensor, experts: list, top_k: int) -> torch.Tensor:
    """Unbatched [B, in]: each expert (a callable) runs only on the samples routed to it."""
    _, chosen, weights = route(logits, top_k)
    out = None
    for e, expert in enumerate(experts):
        rows, slot = (chosen == e).nonzero(as_tuple=True)
        y = expert(x[rows]) * weights[rows, slot, None].to(x.dtype)
        out = y.new_zeros(x.shape[0], y.shape[-1]) if out is None else out
        out = out.index_add(0, rows, y)
    return out


# ---------------------------------------------------------------- losses and diagnostics

def _all_reduce(t: torch.Tensor, grad: bool) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    if grad:
        from torch.distributed.nn.functional import all_reduce
        return all_reduce(t)
    t = t.clone()
    dist.all_reduce(t)
    return t


def global_sums(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, B, E] -> over the GLOBAL batch (summed over ranks): (assignments per expert [N, E] (no grad),
    gate probabilities summed per expert [N, E] (with grad), samples)."""
    probs, chosen, _ = route(logits, top_k)
    counts = torch.zeros_like(probs).scatter_add(-1, chosen, torch.ones_like(chosen, dtype=probs.dtype)).sum(1)
    samples = torch.tensor(float(logits.shape[1]), device=logits.device)
    return (_all_reduce(counts.detach(), False), _all_reduce(probs.sum(dim=1), True),
            _all_reduce(samples, False))


def balance_loss(load: torch.Tensor, mean_prob: torch.Tensor, alpha: float) -> torch.Tensor:
    """Switch: alpha * E * sum_i f_i P_i per pair ([N, E] each), averaged over pairs."""
    experts = load.shape[-1]
    return alpha * experts * (load * mean_prob).sum(dim=-1).mean()


def z_loss(logits: torch.Tensor, coef: float) -> torch.Tensor:
    """Router z-loss: coef * mean over samples (and pairs) of logsumexp(logits)^2 (this rank's share)."""
    return coef * logits.float().logsumexp(dim=-1).square().mean()


def load_stats(load: torch.Tensor) -> dict:
    """Per-expert load [N, E] (shares) -> mean load per expert, normalised entropy H(f)/log E (mean over pairs),
    and the count of dead (pair, expert) cells (load 0)."""
    experts = load.shape[-1]
    entropy = -(load * load.clamp_min(1e-12).log()).sum(-1) / math.log(experts) if experts > 1 else load[:, 0] * 0
    out = {f"moe/load/{e}": float(v) for e, v in enumerate(load.mean(0))}
    return out | {"moe/routing_entropy": float(entropy.mean()), "moe/dead_experts": int((load == 0).sum())}


def moe_losses(logits: torch.Tensor, top_k: int, alpha: float, z_coef: float) -> tuple[torch.Tensor, dict]:
    """(balance + z loss, metrics) of one step's gate logits [N, B_local, E]; load and balance are global."""
    counts, prob_sums, samples = global_sums(logits, top_k)
    load = counts / (samples * top_k)
    balance = balance_loss(load, prob_sums / samples, alpha)
    z = z_loss(logits, z_coef) if z_coef else balance.new_zeros(())
    return balance + z, {"moe/balance_loss": float(balance.detach()), "moe/z_loss": float(z.detach()),
                         **load_stats(load)}


def routing_by_class(logits: torch.Tensor, labels: torch.Tensor, top_k: int, classes: int) -> list[list[float]]:
    """For each class, the share of its images' routed assignments that go to each expert ([C][E])."""
    _, chosen, _ = route(logits, top_k)
    experts = logits.shape[-1]
    counts = torch.zeros(classes, experts, device=logits.device)
    counts.index_put_((labels[:, None].expand_as(chosen), chosen), torch.ones_like(chosen, dtype=counts.dtype),
                      accumulate=True)
    return (counts / counts.sum(1, keepdim=True).clamp_min(1)).tolist()


def eval_routing(logits: torch.Tensor, labels: torch.Tensor, top_k: int, classes: int) -> dict:
    """Diagnostics of one pair's routing over an evaluation set (logits [M, E])."""
    _, chosen, _ = route(logits, top_k)
    experts = logits.shape[-1]
    load = torch.zeros(experts).index_add(0, chosen.flatten().cpu(), torch.ones(chosen.numel())) / chosen.numel()
    stats = load_stats(load[None])
    return {"load": load.tolist(), "routing_entropy": stats["moe/routing_entropy"],
            "dead_experts": stats["moe/dead_experts"], "by_class": routing_by_class(logits, labels, top_k, classes)}


def moe_macs(layers: list[tuple[int, int]], experts: int, top_k: int, n: int, batch: int) -> dict:
    """Forward/backward MACs of n moe connectors on `batch` rows: the gate on every row, only the k active experts
    per row. The input (frozen features) needs no gradient: weight gradients for all, input gradients for the
    experts' later layers."""
    gate, expert = layers[0], layers[1: 1 + (len(layers) - 1) // experts]
    gate_macs = n * batch * gate[0] * gate[1]
    expert_macs = [n * batch * top_k * i * o for i, o in expert]
    forward = gate_macs + sum(expert_macs)
    return {"forward": forward, "backward": forward + sum(expert_macs[1:])}
