"""The hypernetwork generates only the chunks a pair's TRUE widths need (hnet/models/hypernet.py)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from hnet.config import HypernetConfig
from hnet.models.connectors import ConnectorShape
from hnet.models.hypernet import HyperNetwork
from hnet.models.losses import clip_loss
from hnet.models.stitch import StitchModel

WIDTHS, TEXT_WIDTHS = [24, 40, 64], [20, 32]


def test_needed_chunk_counts_hand_computed():
    """Linear 1280 -> 768, chunks of 8192: a 192-wide encoder's 192 x 768 weights fill chunks 0-17 exactly and its
    bias lies in the last chunk (120) -> 19 of 121."""
    hyper = HyperNetwork(ConnectorShape("linear", "image_to_text", 1280, 768), [192, 1280],
                         HypernetConfig(chunk_size=8192))
    assert hyper.chunk_emb.shape[0] == 121
    assert len(hyper.needed_chunks(192, 768)) == 19 and len(hyper.needed_chunks(1280, 768)) == 121
    assert hyper.needed_chunks(192, 768).tolist() == [*range(18), 120]


def test_needed_chunks_skip_missing_columns():
    """8 x 3 weights + 3 biases in chunks of 2; at fan-out 1 only positions 0, 3, ..., 21 and 24 exist."""
    hyper = HyperNetwork(ConnectorShape("linear", "image_to_text", 8, 3), [8], HypernetConfig(chunk_size=2))
    assert hyper.chunk_emb.shape[0] == 14
    assert hyper.needed_chunks(8, 1).tolist() == [0, 1, 3, 4, 6, 7, 9, 10, 12]
    assert hyper.needed_chunks(2, 3).tolist() == [0, 1, 2, 12, 13]


def _zoo(kind, direction, chunk_size=64):
    torch.manual_seed(0)
    shape = ConnectorShape(kind, direction, max(WIDTHS), max(TEXT_WIDTHS), depth=2, hidden=24)
    model = StitchModel("hypernet", shape, WIDTHS, HypernetConfig(hidden=32, chunk_size=chunk_size),
                        text_widths=TEXT_WIDTHS)
    reference = copy.deepcopy(model)
    reference.source.all_chunks = True
    return model, reference


def _step(model, index, image, text):
    a, b, scale = model(index, image, text, model.source.pair_image[index], model.source.pair_text[index])
    loss = clip_loss(a, b, scale)
    loss.backward()
    return a, b, loss, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("direction", ["image_to_text", "text_to_image"])
def test_true_width_generation_equals_all_chunks(kind, direction):
    """Mixed widths, pairs drawn out of order: outputs, loss and every gradient equal all-chunks generation's."""
    model, reference = _zoo(kind, direction)
    index = torch.tensor([5, 0, 3, 2])
    image = torch.stack([F.pad(F.normalize(torch.randn(8, w), dim=-1), (0, max(WIDTHS) - w)) for w in WIDTHS])
    text = torch.stack([F.pad(F.normalize(torch.randn(8, t), dim=-1), (0, max(TEXT_WIDTHS) - t))
                        for t in TEXT_WIDTHS])
    rows = []
    model.source.head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    got, want = _step(model, index, image, text), _step(reference, index, image, text)
    for x, y in zip(got[:3], want[:3]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert got[3].keys() == want[3].keys()
    for name in got[3]:
        torch.testing.assert_close(got[3][name], want[3][name], rtol=1e-4, atol=1e-6, msg=name)
    needed = {model.source.pair_widths[p]: model.source.needed_chunks(*model.source.pair_widths[p]) for p in range(6)}
    assert len({len(chunks) for chunks in needed.values()}) > 1  # the zoo's widths need different chunks
    assert rows == [sum(len(needed[model.source.pair_widths[p]]) for p in index.tolist())]  # only those generated


def test_new_encoder_generates_only_its_widths_chunks():
    """Auto-decoding's model (`with_encoder`): its pairs' connectors come from their own widths' chunks only, and
    match the padded generation (`generate` without widths) wherever a parameter exists."""
    model, _ = _zoo("mlp", "image_to_text")
    decoding, pairs = model.with_encoder("new", 40, False, torch.randn(model.source.cond.shape[1]), [0, 1])
    source, rows = decoding.source, []
    source.head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    index = torch.as_tensor(pairs)
    with torch.no_grad():
        params = source(index)
        padded = source.generate(source.pair_cond(index), source.scales[index])
    assert rows == [sum(len(source.needed_chunks(40, t)) for t in TEXT_WIDTHS), len(pairs) * source.chunk_emb.shape[0]]
    assert rows[0] < rows[1]
    for p, text_width in enumerate(TEXT_WIDTHS):
        for (w, b), (wp, bp), (i, o) in zip(params, padded, decoding.shape.true_layers(40, text_width)):
            torch.testing.assert_close(w[p, :i, :o], wp[p, :i, :o])
            torch.testing.assert_close(b[p, :o], bp[p, :o])
