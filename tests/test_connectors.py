import pytest
import torch
import torch.nn.functional as F

from hnet.config import HypernetConfig
from hnet.connectors import Connector, ConnectorShape, SeparateConnectors, connector_forward, output_mask
from hnet.hypernet import HyperNetwork
from hnet.model import project

WIDTHS = [24, 40, 64]


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("direction", ["image_to_text", "text_to_image"])
def test_padded_equals_unpadded(kind, direction):
    torch.manual_seed(0)
    shape = ConnectorShape(kind, direction, max(WIDTHS), 32, depth=3, hidden=48)
    params = SeparateConnectors(shape, WIDTHS)(torch.arange(3))
    widths = torch.tensor(WIDTHS)
    images = [F.normalize(torch.randn(5, w), dim=-1) for w in WIDTHS]
    padded = torch.stack([F.pad(x, (0, max(WIDTHS) - x.shape[1])) for x in images])
    text = F.normalize(torch.randn(5, 32), dim=-1)
    a, b = project(shape, params, widths, padded, text)
    for i, w in enumerate(WIDTHS):
        single = Connector.from_params(shape, [(W[i:i + 1], bb[i:i + 1]) for W, bb in params], w)
        if direction == "image_to_text":
            torch.testing.assert_close(a[i], F.normalize(single(images[i]), dim=-1))
        else:
            torch.testing.assert_close(b[i, :, :w], F.normalize(single(text), dim=-1))
            assert not b[i, :, w:].any()


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


def test_output_mask_only_for_text_to_image():
    shape = ConnectorShape("linear", "text_to_image", 8, 4)
    mask = output_mask(shape, torch.tensor([3, 8]))
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1] * 8]
    assert output_mask(ConnectorShape("linear", "image_to_text", 8, 4), torch.tensor([3])) is None
