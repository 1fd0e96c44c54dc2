import pytest
import torch
import torch.nn.functional as F

from hnet.config import HypernetConfig
from hnet.models.connectors import (
    Connector,
    ConnectorShape,
    SeparateConnectors,
    connector_forward,
    init_std,
    width_mask,
)
from hnet.models.hypernet import HyperNetwork
from hnet.models.stitch import project
from tests.conftest import padded_pair_features

WIDTHS = [24, 40, 64]
TEXT_WIDTHS = [20, 32]


@pytest.mark.parametrize("source", ["separate", "hypernet"])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("direction", ["image_to_text", "text_to_image"])
def test_padded_pairs_equal_unpadded(source, kind, direction):
    """Every (image width, text width) pair padded on both sides (D_max, T_max) in one batched call gives what its
    own unpadded connector gives (generated connectors have non-zero padding: the masks must do the work)."""
    torch.manual_seed(0)
    pairs = [(w, t) for w in WIDTHS for t in TEXT_WIDTHS]
    shape = ConnectorShape(kind, direction, max(WIDTHS), max(TEXT_WIDTHS), depth=3, hidden=48)
    if source == "separate":
        params = SeparateConnectors(shape, [w for w, _ in pairs], text_widths=[t for _, t in pairs])(torch.arange(6))
    else:
        params = HyperNetwork(shape, WIDTHS, HypernetConfig(chunk_size=512), text_widths=TEXT_WIDTHS)(torch.arange(6))
    widths, text_widths, images, texts, padded, padded_text = padded_pair_features(pairs, 5)
    a, b = project(shape, params, widths, text_widths, padded, padded_text)
    for i, (w, t) in enumerate(pairs):
        single = Connector.from_params(shape, [(W[i:i + 1], bb[i:i + 1]) for W, bb in params], w, t)
        if direction == "image_to_text":
            torch.testing.assert_close(a[i, :, :t], F.normalize(single(images[i]), dim=-1))
            assert not a[i, :, t:].any()
            torch.testing.assert_close(a[i] @ b[i].T, F.normalize(single(images[i]), dim=-1) @ texts[i].T)
        else:
            torch.testing.assert_close(b[i, :, :w], F.normalize(single(texts[i]), dim=-1))
            assert not b[i, :, w:].any()
            torch.testing.assert_close(a[i] @ b[i].T, images[i] @ F.normalize(single(texts[i]), dim=-1).T)


def test_hypernet_init_scales_use_true_fan_in_of_both_sides():
    shape = ConnectorShape("linear", "text_to_image", 64, 32)
    hyper = HyperNetwork(shape, [24, 64], HypernetConfig(), text_widths=[20, 32])
    assert hyper.text_cond is not None and hyper.text_cond.shape == (2, HypernetConfig().text_cond_dim)
    expected = [init_std(t) for _ in (24, 64) for t in (20, 32)]  # text_to_image: the text side is the fan-in
    assert hyper.scales[:, 0].tolist() == pytest.approx(expected)
    assert HyperNetwork(shape, [24, 64], HypernetConfig()).text_cond is None  # one text encoder: no text vector


def test_one_batched_call_equals_per_encoder_loop():
    shape = ConnectorShape("mlp", "image_to_text", 16, 8, depth=2, hidden=12)
    params = SeparateConnectors(shape, [16, 16])(torch.arange(2))
    x = torch.randn(2, 4, 16)
    out = connector_forward(x, params)
    for i in range(2):
        h = F.gelu(x[i] @ params[0][0][i] + params[0][1][i])
        torch.testing.assert_close(out[i], h @ params[1][0][i] + params[1][1][i])


@pytest.mark.parametrize("kind,layers", [("linear", 1), ("mlp", 3)])
def test_hypernet_shapes_mixed_widths(kind, layers):
    shape = ConnectorShape(kind, "image_to_text", 1024, 384, depth=3, hidden=256)
    hyper = HyperNetwork(shape, [384, 768, 1024], HypernetConfig(chunk_size=1000))
    params = hyper(torch.tensor([2, 0]))
    assert len(params) == layers
    assert [tuple(w.shape) for w, _ in params] == [(2, i, o) for i, o in shape.layers]
    assert [tuple(b.shape) for _, b in params] == [(2, o) for _, o in shape.layers]


def test_generated_init_matches_standard_init_scale():
    torch.manual_seed(0)
    shape = ConnectorShape("mlp", "image_to_text", 1024, 384, depth=2, hidden=512)
    widths = [384, 1024]
    hyper = HyperNetwork(shape, widths, HypernetConfig())
    params = hyper(torch.arange(2))
    standard = SeparateConnectors(shape, widths)(torch.arange(2))
    for layer, ((w, _), (ws, _)) in enumerate(zip(params, standard)):
        for i, width in enumerate(widths):
            rows = width if layer == 0 else w.shape[1]
            got, target = w[i, :rows].std().item(), ws[i, :rows].std().item()
            assert got == pytest.approx(target, rel=0.1), (layer, width, got, target)


def test_hypernet_is_small_for_a_big_connector():
    shape = ConnectorShape("mlp", "image_to_text", 1024, 384, depth=2, hidden=560)
    connector = shape.num_params(1024)
    assert 0.75e6 < connector < 0.85e6
    hyper = HyperNetwork(shape, [1024] * 30, HypernetConfig())
    assert hyper.hypernet_params() < 2.5e6  # the research code used 400M for this job


def test_width_mask():
    assert width_mask(8, torch.tensor([3, 8])).tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1] * 8]
