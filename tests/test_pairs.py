"""N image encoders x M text encoders: pair draws, pairs never trained, connectors per pair."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hnet import files
from hnet.config import ConfigError
from hnet.data.cache import CachedFeatures
from hnet.data.features import FeatureBatches
from hnet.models.pairs import Pairs, pair_label
from hnet.runs import connector_for, load_model
from hnet.train.loop import train
from hnet.train.optim import draw_counts, encoder_subset
from tests.conftest import PAIR_TEXTS, with_train


def test_pair_grid_members():
    pairs = Pairs.grid(3, 2)
    assert pairs.as_list() == [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1]]
    image, text, image_slot, text_slot = pairs.members(np.array([1, 4, 5]))
    assert image.tolist() == [0, 2] and text.tolist() == [0, 1]
    assert image_slot.tolist() == [0, 1, 1] and text_slot.tolist() == [1, 0, 1]
    # one text encoder: pair i is encoder i, nothing to gather
    assert Pairs.grid(3, 1).members(np.array([0, 1, 2]))[2:] == (None, None)


def test_k_of_n_x_m_pairs_drawn_deterministically_and_counted(pairs_cfg):
    cfg = with_train(pairs_cfg, encoders_per_step=2, max_steps=9, epochs=100)
    train(cfg)
    images = cfg.encoders
    labels = [pair_label(i, t, True) for i in images for t in PAIR_TEXTS]
    meta = files.read_json(cfg.run_dir / "model.json")
    assert meta["names"] == labels and meta["pairs"] == Pairs.grid(3, 2).as_list()
    assert meta["text_encoders"] == PAIR_TEXTS and meta["text_widths"] == [24, 16]
    draws = files.read_json(cfg.run_dir / "flops.json")["phases"]["train"]["parts"]["encoder_draws"]
    expected = draw_counts(6, cfg.train.encoders_per_step, cfg.train.seed, 9)
    assert draws == dict(zip(labels, expected.tolist())) and sum(draws.values()) == 2 * 9
    assert (expected > 0).sum() > 2  # the draws move over the grid
    for step in range(9):  # a pure function of (seed, step): every rank and every resume agree
        assert np.array_equal(encoder_subset(step, 6, 2, cfg.train.seed), encoder_subset(step, 6, 2, cfg.train.seed))
        assert len(set(encoder_subset(step, 6, 2, cfg.train.seed))) == 2


def test_unseen_combination_of_seen_encoders_is_generated_without_training(pairs_cfg):
    """(image 0, text 1) never trains; its connector is generated from image 0's and text 1's vectors, each
    trained on other pairs, at the pair's own widths."""
    image, text = pairs_cfg.encoders[0], PAIR_TEXTS[1]
    held = pair_label(image, text, True)
    cfg = dataclasses.replace(with_train(pairs_cfg, max_steps=6, epochs=100), held_out_pairs=[held])
    train(cfg)
    meta = files.read_json(cfg.run_dir / "model.json")
    assert held in meta["names"] and held not in meta["trained"] and len(meta["trained"]) == 5
    assert held not in files.read_json(cfg.run_dir / "flops.json")["phases"]["train"]["parts"]["encoder_draws"]
    model, names = load_model(cfg.run_dir)
    p, source = names.index(held), model.source
    with torch.no_grad():
        expected = source.generate(torch.cat([source.cond[0], source.text_cond[1]])[None], source.scales[p:p + 1],
                                   [source.pair_widths[p]])
        for (w, b), (we, be) in zip(source(torch.tensor([p])), expected):
            assert torch.equal(w, we) and torch.equal(b, be)
        source.text_cond[1] += 1.0  # the text side's vector is part of the pair's input
        assert not torch.equal(source(torch.tensor([p]))[0][0], expected[0][0])
    connector = connector_for(cfg.run_dir, image=image, text=text)
    assert connector.layers[0].weight.shape == (16, 48)  # the pair's true widths: 48 in, 16 out
    torch.testing.assert_close(connector.layers[0].weight.T, expected[0][0][0, :48, :16])
    with pytest.raises(KeyError, match="name one"):
        connector_for(cfg.run_dir, image)


def test_separate_run_has_a_connector_per_trained_pair(pairs_cfg):
    cfg = dataclasses.replace(with_train(pairs_cfg, max_steps=2), method="separate",
                              held_out_pairs=[pair_label(pairs_cfg.encoders[1], PAIR_TEXTS[0], True)])
    train(cfg)
    model, names = load_model(cfg.run_dir)
    assert len(names) == 5 and model.log_scale.shape == (5,)
    with pytest.raises(KeyError, match="trained no connector"):
        connector_for(cfg.run_dir, pairs_cfg.encoders[1], PAIR_TEXTS[0])


def test_held_out_pair_must_be_a_pair_of_the_run(pairs_cfg):
    with pytest.raises(ConfigError, match=r"held_out_pairs\[0\]"):
        train(dataclasses.replace(pairs_cfg, held_out_pairs=["resnet10t@img_size=32 + nope"]))


def test_an_encoder_with_every_pair_held_out_is_refused():
    """Its vector would never train; held_out is the way to leave an image encoder out."""
    from hnet.models.pairs import resolve_pairs

    with pytest.raises(ConfigError, match="every pair of image encoder 'a' is held out"):
        resolve_pairs(["a", "b"], ["t", "u"], ["a + t", "a + u"])
    with pytest.raises(ConfigError, match="every pair of text encoder 'u' is held out"):
        resolve_pairs(["a", "b"], ["t", "u"], ["a + u", "b + u"])
    assert resolve_pairs(["a", "b"], ["t", "u"], ["a + u"])[1] == [0, 2, 3]
    with pytest.raises(ConfigError, match="image encoder 'b'"):  # one text encoder: its one pair is all of b
        resolve_pairs(["a", "b"], ["t"], ["b + t"])


def test_batches_pad_each_text_encoder_to_the_widest(pairs_cfg):
    cache = CachedFeatures(pairs_cfg.cache_path)
    data = FeatureBatches(cache, pairs_cfg.encoders, PAIR_TEXTS, 8)
    image, text = data.batch(0, np.array([1]), np.array([0, 1]))
    assert image.shape == (1, 8, 48) and text.shape == (2, 8, 24)  # D_max, T_max
    rows = np.sort(data.indices(0))
    assert not text[1, :, 16:].any()
    assert torch.allclose(F.normalize(text[1, :, :16], dim=-1), text[1, :, :16], atol=1e-3)
    assert set(map(tuple, text[1, :, :16].numpy().round(2))) == set(
        map(tuple, np.asarray(cache["text:other-text"][rows], np.float32).round(2)))


def test_vector_of_a_text_encoder_in_no_drawn_pair_gets_no_update(pairs_cfg):
    """1 pair of 6 per step: the text encoder of step s-1's pair, not in step s's pair, keeps its vector and its
    (non-zero) Adam moments bit for bit through step s."""
    from tests.test_train import _checkpoint_state

    pairs = Pairs.grid(3, 2)
    text_of = lambda s: pairs.text[int(encoder_subset(s, 6, 1, pairs_cfg.train.seed)[0])]
    step = next(s for s in range(1, 50) if text_of(s) != text_of(s - 1))
    idle = text_of(step - 1)
    cfg = with_train(pairs_cfg, encoders_per_step=1, max_steps=step + 1, epochs=100, ckpt_every=1, warmup_steps=1)
    train(cfg)
    (before, opt_before), (after, opt_after) = (_checkpoint_state(cfg.run_dir, s) for s in (step, step + 1))
    assert torch.equal(before["source.text_cond"][idle], after["source.text_cond"][idle])
    assert not torch.equal(before["source.text_cond"][1 - idle], after["source.text_cond"][1 - idle])
    moments = [(pid, name) for pid, state in opt_after["state"].items() for name, value in state.items()
               if value.dim() and value.shape == before["source.text_cond"].shape]
    assert moments
    for pid, name in moments:
        assert opt_before["state"][pid][name][idle].abs().sum() > 0
        assert torch.equal(opt_after["state"][pid][name][idle], opt_before["state"][pid][name][idle])
