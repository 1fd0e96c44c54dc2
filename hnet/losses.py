"""Symmetric InfoNCE over [N, B, B] logits (one matmul, both directions read from it), with a cross-rank
gather that keeps gradients.

With `world > 1` every rank gathers both sides WITH gradient (torch.distributed.nn.all_gather) and computes the
loss on the full global batch. Autograd's all_gather backward sums the gradient of every rank's copy, and DDP
then averages parameter gradients over ranks: world x (1/world) = exactly the single-process gradient on the same
global batch. accelerate's `gather` has no backward, which would silently drop the cross-rank terms.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor, dim: int) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=dim)


def contrastive_logits(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """a: [N, B, E]; b: [N, B, E] or [B, E] shared -> scale * a b^T: [N, B, B] (row i: sample i of `a`)."""
    if b.dim() == 2:
        n, batch, width = a.shape
        return scale * (a.reshape(n * batch, width) @ b.T).view(n, batch, -1)
    return scale * torch.bmm(a, b.transpose(1, 2))


def clip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """Mean over encoders of (CE(a->b) + CE(b->a)) / 2; both inputs already L2-normalised."""
    if gather:
        a = gather_with_grad(a, dim=1)
        b = gather_with_grad(b, dim=b.dim() - 2)
    logits = contrastive_logits(a, b, scale)
    n, batch, _ = logits.shape
    labels = torch.arange(batch, device=logits.device).repeat(n)
    forward = F.cross_entropy(logits.reshape(n * batch, batch), labels)
    backward = F.cross_entropy(logits.transpose(1, 2).reshape(n * batch, batch), labels)
    return (forward + backward) / 2
