import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hnet.config import HypernetConfig
from hnet.connectors import ConnectorShape
from hnet.flops import encoder_flops, train_step_flops
from hnet.losses import clip_loss
from hnet.model import StitchModel

# timm's published GMACs at 224 px
PUBLISHED = {"vit_small_patch16_224": 4.61, "deit_small_patch16_224": 4.61, "vit_base_patch16_224": 17.58,
             "vit_large_patch16_224": 61.6}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_encoder_gmacs_match_timm(name):
    out = encoder_flops(name)
    assert out["gmacs"] == pytest.approx(PUBLISHED[name], rel=0.01)
    assert out["gflops"] == pytest.approx(2 * out["gmacs"])
    assert out["unsupported_ops"] == []


def test_sdpa_is_counted():
    """Without our handle fvcore skips attention: ViT-S/16 would come out ~8% low."""
    assert encoder_flops("vit_small_patch16_224")["gmacs"] > 4.5


def _measured_step(model, n, batch, width):
    image = torch.randn(n, batch, model.shape.image_width)
    text = torch.nn.functional.normalize(torch.randn(batch, model.shape.text_width), dim=-1)
    with FlopCounterMode(display=False) as counter:
        a, b, scale = model(torch.arange(n), image, text)
        clip_loss(a, b, scale).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("method", ["separate", "hypernet"])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("direction", ["image_to_text", "text_to_image"])
def test_train_step_formula_matches_torch_counter(method, kind, direction):
    shape = ConnectorShape(kind, direction, 96, 64, depth=3, hidden=80)
    model = StitchModel(method, shape, [96, 48, 72], HypernetConfig(hidden=64, chunk_size=512))
    n, batch = 3, 32
    formula = train_step_flops(model, n, batch)
    assert formula["total"] == pytest.approx(_measured_step(model, n, batch, 96), rel=0.01)


def test_linear_step_hand_formula():
    """linear image->text, batch B, N encoders: connector fwd N*B*D*T MACs, bwd (weights only) the same;
    logits fwd N*B*B*T, bwd (mapped side only) the same. x2 FLOPs per MAC."""
    n, batch, d, t = 2, 16, 24, 12
    model = StitchModel("separate", ConnectorShape("linear", "image_to_text", d, t), [d, d], HypernetConfig())
    expected = 2 * (2 * n * batch * d * t + 2 * n * batch * batch * t)
    assert train_step_flops(model, n, batch)["total"] == expected


def test_counting_is_cached_per_shape():
    import time

    encoder_flops.cache_clear()
    start = time.perf_counter()
    first = encoder_flops("resnet10t@img_size=64")
    cold = time.perf_counter() - start
    start = time.perf_counter()
    assert encoder_flops("resnet10t@img_size=64") is first
    assert time.perf_counter() - start < cold / 100
    assert encoder_flops.cache_info().hits == 1


def test_ie30_zoo_leaves_no_op_uncounted():
    """Every op fvcore cannot count in the 30-encoder zoo is zero-MAC data movement or elementwise work,
    listed with its reason in hnet.flops.NEGLIGIBLE_OPS (full forward of each model: the slowest test)."""
    import yaml

    for name in yaml.safe_load(open("configs/encoders/ie30.yaml"))["encoders"]:
        assert encoder_flops(name)["unsupported_ops"] == [], name


def test_every_rank_computing_the_global_logits_is_counted():
    model = StitchModel("separate", ConnectorShape("linear", "image_to_text", 8, 4), [8], HypernetConfig())
    one, two = train_step_flops(model, 1, 16), train_step_flops(model, 1, 16, world=2)
    assert two["logits_loss"] == 2 * one["logits_loss"] and two["connectors"] == one["connectors"]
