import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hnet.config import HypernetConfig
from hnet.flops import autodecode_step_flops, encoder_flops, train_step_flops
from hnet.models.connectors import ConnectorShape
from hnet.models.losses import clip_loss
from hnet.models.stitch import StitchModel

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
    """3 image x 2 text encoders of mixed widths: the hypernetwork as it runs (padded), separate connectors as a
    grid search of single connectors would run them (each at its pair's true widths)."""
    shape = ConnectorShape(kind, direction, 96, 64, depth=3, hidden=80)
    model = StitchModel(method, shape, [96, 48, 72], HypernetConfig(hidden=64, chunk_size=512), text_widths=[64, 40])
    n, batch = 6, 32
    formula = train_step_flops(model, n, batch)
    measured = (_measured_step(model, n, batch, 96) if method == "hypernet"
                else _measured_single_connectors(model, batch))
    assert formula["total"] == pytest.approx(measured, rel=0.01)
    if method == "separate":
        assert formula["total"] < _measured_step(model, n, batch, 96)  # padding is not charged to the baseline
        assert train_step_flops(model, 3, batch)["total"] == pytest.approx(formula["total"] / 2, abs=2)


def _measured_single_connectors(model, batch):
    """torch's count of each pair's connector trained alone at its true widths (forward + backward)."""
    from hnet.models.connectors import Connector

    total = 0
    params = model.source(torch.arange(len(model.pairs)))
    for p in range(len(model.pairs)):
        w, t = int(model.widths[p]), int(model.text_widths[p])
        one = Connector.from_params(model.shape, [(W[p:p + 1].detach(), b[p:p + 1].detach()) for W, b in params], w, t)
        image, text = torch.randn(batch, w), torch.nn.functional.normalize(torch.randn(batch, t), dim=-1)
        with FlopCounterMode(display=False) as counter:
            if model.shape.direction == "image_to_text":
                a, b = torch.nn.functional.normalize(one(image), dim=-1), text
            else:
                a, b = image, torch.nn.functional.normalize(one(text), dim=-1)
            clip_loss(a[None], b, model.logit_scale(torch.tensor([p]))).backward()
        total += counter.get_total_flops()
    return total


def _mixed_width_model(widths):
    shape = ConnectorShape("linear", "image_to_text", 256, 64)
    return StitchModel("hypernet", shape, widths, HypernetConfig(hidden=64, chunk_size=256), text_widths=[64, 16])


def _measured_pairs(model, index, batch, frozen=False):
    """torch's count of one step of pairs `index` (hypernetwork frozen but the cond vectors: an auto-decoding)."""
    model.requires_grad_(not frozen)
    model.source.cond.requires_grad_(True)
    image = torch.randn(len(WIDE), batch, model.shape.image_width)
    text = torch.nn.functional.normalize(torch.randn(2, batch, model.shape.text_width), dim=-1)
    with FlopCounterMode(display=False) as counter:
        a, b, scale = model(index, image, text, model.source.pair_image[index], model.source.pair_text[index])
        clip_loss(a, b, scale).backward()
    return counter.get_total_flops()


WIDE, MIXED = [256, 256, 256], [256, 32, 96]


@pytest.mark.parametrize("index", [[0, 1, 2, 3, 4, 5], [2, 5], [3]])
def test_mixed_width_hypernet_step_matches_torch_counter(index):
    """The ledger charges the chunks each drawn pair's true widths need (a small batch: generation dominates)."""
    model, batch = _mixed_width_model(MIXED), 8
    widths = [model.source.pair_widths[p] for p in index]
    formula = train_step_flops(model, len(index), batch, widths=widths)
    assert formula["total"] == pytest.approx(_measured_pairs(model, torch.tensor(index), batch), rel=0.01)
    if len(index) == len(model.pairs):  # all pairs drawn: the default (mean over trained pairs x n) is exact
        assert train_step_flops(model, len(index), batch) == formula
    decode = autodecode_step_flops(model, batch, len(index), widths=widths)
    assert decode == pytest.approx(_measured_pairs(model, torch.tensor(index), batch, frozen=True), rel=0.01)


def test_narrower_widths_are_charged_fewer_flops():
    model, batch = _mixed_width_model(MIXED), 8
    hyper = model.source
    narrow, wide = (train_step_flops(model, 1, batch, widths=[w])["hypernet"] for w in [(32, 64), (256, 64)])
    assert narrow / wide == pytest.approx(len(hyper.needed_chunks(32, 64)) / hyper.chunk_emb.shape[0])
    assert narrow < wide / 4
    wide_zoo = _mixed_width_model(WIDE)  # the same padded shape, every encoder at its widest
    assert train_step_flops(model, 6, batch)["hypernet"] < train_step_flops(wide_zoo, 6, batch)["hypernet"]
    padded = autodecode_step_flops(model, batch)  # the new encoder's width unknown: the padded bound
    assert autodecode_step_flops(model, batch, widths=[(32, 64)]) < padded
    assert padded == autodecode_step_flops(model, batch, widths=[(256, 64)])


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


def test_pipeline_ledger_equals_an_independent_recount(tiny_cfg, monkeypatch):
    """A tiny demo-like pipeline (mid-run probe, held-out encoder auto-decoded): every phase of the hypernetwork
    run's flops.json equals a recount from first principles, the eval phase's parts add up to it, and each run
    is evaluated once."""
    import dataclasses

    import hnet.experiments.pipeline
    from hnet import files
    from tests.conftest import TINY_ENCODERS

    held, seen = TINY_ENCODERS[2], TINY_ENCODERS[:2]
    cfg = dataclasses.replace(tiny_cfg, encoders=TINY_ENCODERS, held_out=held,
                              train=dataclasses.replace(tiny_cfg.train, eval_every=3),
                              autodecode=dataclasses.replace(tiny_cfg.autodecode, steps=3, eval_every=1,
                                                             batch_size=64))
    evaluated = []
    real_evaluate = hnet.experiments.pipeline.evaluate_run
    monkeypatch.setattr(hnet.experiments.pipeline, "evaluate_run",
                        lambda c, run, ds: evaluated.append(run) or real_evaluate(c, run, ds))
    summary = hnet.experiments.pipeline.run_pipeline(cfg, control=False)
    assert sorted(map(str, evaluated)) == sorted({str(r) for r in evaluated})  # no run twice
    run = dataclasses.replace(cfg, method="hypernet").run_dir
    phases = files.read_json(run / "flops.json")["phases"]
    meta = files.read_json(run / "model.json")
    manifest = files.read_json(cfg.cache_path / "manifest.json")
    n_classes = len(files.read_json(run / "eval.json")["datasets"]["demo"]["classes"])
    count, batch, eval_images, d, t = manifest["count"], 64, 96, max(meta["widths"]), 384
    gflops = {n: encoder_flops(n)["gflops"] * 1e9 for n in TINY_ENCODERS}
    # embedding: the two trained encoders + captions over the cache; the held-out one over its 3 x 64 samples
    assert phases["embed"]["flops"] == pytest.approx(
        count * (gflops[seen[0]] + gflops[seen[1]] + manifest["flops_per_sample"]["text:all-MiniLM-L6-v2"])
        + 3 * batch * gflops[held], rel=1e-6)
    # training: 2 epochs x 240 // 64 steps; linear connectors (fwd + weight grads), [2,B,B] logits (fwd + one
    # side's grad), hypernetwork trunk + head over every chunk row (fwd + input grads + weight grads)
    # (the chunks each pair's true widths need)
    hyper = load_model_for(run)
    rows = {n: len(hyper.source.needed_chunks(w, t)) for n, w in zip(hyper.image_names, hyper.encoder_widths)}
    hyper_macs = sum(m.in_features * m.out_features for m in hyper.source.modules() if isinstance(m, torch.nn.Linear))
    step = 2 * (2 * 2 * batch * d * t + 2 * 2 * batch * batch * t + 3 * (rows[seen[0]] + rows[seen[1]]) * hyper_macs)
    assert phases["train"]["flops"] == pytest.approx(6 * step, rel=1e-6)
    # auto-decoding: 3 steps of one connector through the frozen hypernetwork (input grads only)
    decode_step = 2 * (2 * batch * d * t + 2 * batch * batch * t + 2 * rows[held] * hyper_macs)
    assert phases["autodecode"]["flops"] == pytest.approx(3 * decode_step, rel=1e-6)
    # evaluation: each encoder's forwards over the 96 images once; connector + class logits per image for
    # 2 mid-run probes x 2 encoders, 4 points of the decoding curve, the final evaluation of all 3 encoders
    head = 2 * (d * t + n_classes * t) * eval_images
    expected_eval = eval_images * sum(gflops.values()) + (2 * 2 + 4 + 3) * head
    assert phases["eval"]["flops"] == pytest.approx(expected_eval, rel=1e-6)
    assert sum(p["flops"] for p in phases["eval"]["parts"].values()) == phases["eval"]["flops"]
    held_out = summary["held_out"]
    assert held_out["flops_ratio"] > 0 and held_out["flops_ratio_with_embed"] > 0
    assert held_out["autodecode_embedded_samples"] == 3 * batch


def load_model_for(run):
    from hnet.runs import load_model

    return load_model(run)[0]


def test_local_loss_logits_formula_equals_flop_counter():
    """One rank of 4 with local_loss: what torch counts for its logits (forward + backward) = the ledger's share."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from hnet.flops import logits_macs
    from hnet.models.losses import local_clip_loss

    n, batch, width, world = 3, 32, 16, 4
    local = batch // world
    a_all = F.normalize(torch.randn(n, batch, width), dim=-1).requires_grad_()
    text_all = F.normalize(torch.randn(batch, width), dim=-1)
    with FlopCounterMode(display=False) as counter:
        loss = local_clip_loss(a_all[:, :local], text_all[:local], a_all, text_all, torch.tensor(10.0), offset=0)
        loss.backward()
    macs = logits_macs(n, batch, width, world, local=True)
    assert counter.get_total_flops() == 2 * (macs["forward"] + macs["backward"]) // world
