import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from hnet.models.losses import clip_loss, contrastive_logits


def test_hand_computed_two_by_two():
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    b = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(2.0)
    # logits = 2 * a b^T = [[2, 1.2], [0, 1.6]]
    row = (-math.log(math.exp(2) / (math.exp(2) + math.exp(1.2))) - math.log(math.exp(1.6) / (1 + math.exp(1.6)))) / 2
    col = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))) / 2
    assert float(clip_loss(a, b, scale)) == pytest.approx((row + col) / 2, rel=1e-6)


def test_symmetric_in_its_arguments_and_mean_over_encoders():
    torch.manual_seed(0)
    a = F.normalize(torch.randn(3, 8, 5), dim=-1)
    b = F.normalize(torch.randn(3, 8, 5), dim=-1)
    s = torch.tensor(10.0)
    torch.testing.assert_close(clip_loss(a, b, s), clip_loss(b, a, s))
    per = torch.stack([clip_loss(a[i:i + 1], b[i:i + 1], s) for i in range(3)])
    torch.testing.assert_close(clip_loss(a, b, s), per.mean())


def test_shared_text_equals_broadcast():
    a = F.normalize(torch.randn(2, 6, 4), dim=-1)
    b = F.normalize(torch.randn(6, 4), dim=-1)
    torch.testing.assert_close(contrastive_logits(a, b, torch.tensor(3.0)),
                               contrastive_logits(a, b.expand(2, -1, -1), torch.tensor(3.0)))


def _setup():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6)  # [n_encoders, global batch, width]
    text = F.normalize(torch.randn(8, 5), dim=-1)
    weight = torch.randn(2, 6, 5)
    return x, text, weight


def _loss_and_grad(x, text, weight):
    weight = weight.clone().requires_grad_(True)
    a = F.normalize(torch.bmm(x, weight), dim=-1)
    loss = clip_loss(a, text, torch.tensor(5.0))
    loss.backward()
    return loss.detach(), weight.grad


def _local_loss_and_grad(x, text, weight, local):
    from hnet.models.losses import loss_and_surrogate

    weight = weight.clone().requires_grad_(True)
    a = F.normalize(torch.bmm(x, weight), dim=-1)
    loss, surrogate = loss_and_surrogate(a, text, torch.tensor(5.0), chunk=1, local=local)
    surrogate.backward()
    return loss.detach(), weight.grad


def _worker(rank, world, port, out, local):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x, text, weight = _setup()
    part = slice(rank * 4, (rank + 1) * 4)
    if local is None:
        loss, grad = _loss_and_grad(x[:, part], text[part], weight)
    else:
        loss, grad = _local_loss_and_grad(x[:, part], text[part], weight, local)
    dist.all_reduce(grad)  # what DDP does, as a mean
    grad /= world
    dist.all_reduce(loss)  # the trainer logs the mean over ranks
    out[rank] = (loss / world, grad, dist.get_world_size())
    dist.destroy_process_group()


@pytest.mark.parametrize("local", [None, False, True], ids=["clip_loss", "chunked", "local_loss"])
def test_two_process_gather_matches_one_process(local):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, port, out, local), nprocs=2, join=True)
    loss, grad = _loss_and_grad(*_setup())
    for rank in range(2):
        assert out[rank][2] == 2
        torch.testing.assert_close(out[rank][0], loss)
        torch.testing.assert_close(out[rank][1], grad)


@pytest.mark.parametrize("shared_text", [True, False])
def test_chunked_loss_and_surrogate_give_the_full_loss_and_gradient(shared_text):
    from hnet.models.losses import loss_and_surrogate

    torch.manual_seed(1)
    weight = torch.randn(5, 6, 4, requires_grad=True)
    log_scale = torch.tensor(2.0, requires_grad=True)
    x = torch.randn(5, 7, 6)
    text = F.normalize(torch.randn(7, 4), dim=-1)
    b_full = text if shared_text else F.normalize(torch.randn(5, 7, 4), dim=-1)

    def outputs():
        return F.normalize(torch.bmm(x, weight), dim=-1), b_full, log_scale.exp()

    full = clip_loss(*outputs())
    full.backward()
    grads = weight.grad.clone(), log_scale.grad.clone()
    weight.grad, log_scale.grad = None, None
    loss, surrogate = loss_and_surrogate(*outputs(), chunk=2)
    surrogate.backward()
    torch.testing.assert_close(loss, full.detach())
    torch.testing.assert_close(weight.grad, grads[0])
    torch.testing.assert_close(log_scale.grad, grads[1])


def test_fused_backward_matches_cross_entropy_autograd():
    from hnet.models.losses import SymmetricInfoNCE

    torch.manual_seed(2)
    logits = (torch.randn(3, 9, 9) * 4).requires_grad_()
    SymmetricInfoNCE.apply(logits).backward()
    fused = logits.grad.clone()
    logits.grad = None
    labels = torch.arange(9).repeat(3)
    ref = (F.cross_entropy(logits.reshape(27, 9), labels) +
           F.cross_entropy(logits.transpose(1, 2).reshape(27, 9), labels)) / 2
    ref.backward()
    torch.testing.assert_close(fused, logits.grad)
    torch.testing.assert_close(SymmetricInfoNCE.apply(logits.detach()), ref.detach())
