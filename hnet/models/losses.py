"""Symmetric InfoNCE over [N, B, B] logits (one matmul, both directions read from it), with a cross-rank
gather that keeps gradients.

With `world > 1` every rank gathers both sides WITH gradient (torch.distributed.nn.all_gather) and computes the
loss on the full global batch, or with `local=True` (open_clip's local_loss) only its own B_local x B_global
block of logits in each direction: the mean over ranks of the local losses is the global loss, and the gradients
are the same. Autograd's all_gather backward sums the gradient of every rank's copy, and DDP
then averages parameter gradients over ranks: world x (1/world) = exactly the single-process gradient on the same
global batch. accelerate's `gather` has no backward, which would silently drop the cross-rank terms.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def gather_with_grad(x: torch.Tensor, dim: int) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=dim)


def contrastive_logits(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """a: [N, B, E]; b: [N, B, E] or [B, E] shared -> scale * a b^T: [N, B, B] (row i: sample i of `a`).
    The scale multiplies an input (B x E) rather than the logits (B x B): one less pass over the big tensor. It
    goes on the side that already needs a gradient, so the frozen side gets no extra input-gradient matmul."""
    if a.requires_grad or not b.requires_grad:
        a = a * scale
    else:
        b = b * scale
    if b.dim() == 2:
        n, batch, width = a.shape
        return (a.reshape(n * batch, width) @ b.T).view(n, batch, -1)
    return torch.bmm(a, b.transpose(1, 2))


class SymmetricInfoNCE(torch.autograd.Function):
    """Mean over encoders of (CE over rows + CE over columns) / 2 of [N, B, B] logits, labels on the diagonal.

    Same value and gradient as two F.cross_entropy calls, but the backward is one fused expression,
    (softmax_rows + softmax_cols - 2 I) / (2 N B), instead of autograd's chain of B x B temporaries."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        rows, cols = logits.logsumexp(dim=2), logits.logsumexp(dim=1)
        diag = logits.diagonal(dim1=1, dim2=2)
        ctx.save_for_backward(logits, rows, cols)
        return ((rows - diag).mean() + (cols - diag).mean()) / 2

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        logits, rows, cols = ctx.saved_tensors
        n, batch, _ = logits.shape
        grad = torch.exp(logits - rows.unsqueeze(2))
        grad += torch.exp(logits - cols.unsqueeze(1))
        grad.diagonal(dim1=1, dim2=2).sub_(2.0)
        return grad.mul_(grad_out / (2 * n * batch))


def clip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """Mean over encoders of (CE(a->b) + CE(b->a)) / 2; both inputs already L2-normalised."""
    if gather:
        a = gather_with_grad(a, dim=1)
        b = gather_with_grad(b, dim=b.dim() - 2)
    return SymmetricInfoNCE.apply(contrastive_logits(a, b, scale))


def encoder_chunk(batch: int, budget: int = 1 << 20) -> int:
    """Encoders per loss chunk so that one chunk's logits hold ~`budget` elements (4 MB in fp32: cache-sized)."""
    return max(1, budget // (batch * batch))


def _rows(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Encoders start:stop of a per-encoder tensor ([n, ...], 3-d); shared tensors (2-d text, scalar) as they are."""
    return t[start:stop] if t.dim() == 3 else t


def local_clip_loss(a: torch.Tensor, b: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor,
                    scale: torch.Tensor, offset: int) -> torch.Tensor:
    """This rank's rows (a, b: local) against every rank's columns (a_all, b_all: gathered), both directions;
    the positive of local row i is global column offset + i."""
    n = a.shape[0]
    b_rows = b.unsqueeze(0).expand(n, -1, -1) if b.dim() == 2 else b
    per_direction = []
    for logits in (contrastive_logits(a, b_all, scale), contrastive_logits(b_rows, a_all, scale)):
        positives = logits.diagonal(offset=offset, dim1=1, dim2=2)
        per_direction.append((logits.logsumexp(dim=2) - positives).mean())
    return (per_direction[0] + per_direction[1]) / 2


def loss_and_surrogate(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, chunk: int, local: bool = False):
    """clip_loss over all encoders, computed and differentiated chunk by chunk of encoders, so the peak memory
    is chunk x B x B logits instead of N x B x B (the loss is a mean over encoders, so chunking is exact).
    `scale` is a scalar or one per encoder ([n, 1, 1]).

    Returns (loss, surrogate): backpropagating the surrogate scalar through the model gives exactly the loss's
    gradient, in one backward pass (one DDP gradient sync, accelerate's loss scaling and accumulation intact).
    With `local`, the loss is this rank's share (see local_clip_loss); its mean over ranks is the global loss.
    """
    a_all = gather_with_grad(a, dim=1)
    b_all = gather_with_grad(b, dim=b.dim() - 2)
    outputs = (a, b, a_all, b_all, scale) if local else (a_all, b_all, scale)
    leaves = [t.detach().requires_grad_(t.requires_grad) for t in outputs]
    offset = dist.get_rank() * a.shape[1] if local and dist.is_available() and dist.is_initialized() else 0
    n, total = a.shape[0], torch.zeros((), device=a.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        part = [_rows(t, start, stop) for t in leaves]
        if local:
            value = local_clip_loss(*part, offset=offset)
        else:
            value = clip_loss(*part, gather=False)
        value = value * ((stop - start) / n)
        value.backward()
        total = total + value.detach()
    surrogate = sum((out * leaf.grad).sum() for out, leaf in zip(outputs, leaves) if leaf.grad is not None)
    return total, surrogate
