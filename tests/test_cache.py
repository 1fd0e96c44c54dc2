import json
import os
import shutil

import numpy as np
import pytest
import torch

from hnet import files
from hnet.config import load_config
from hnet.data.cache import CachedFeatures, CacheError, verify_cache, write_cache
from hnet.data.embed import _UnitDataset, build_cache, embed_pass
from hnet.data.sources import prepare_shards, shard_units
from hnet.models.encoders import ImageEncoder, read_encoder_list, text_key
from tests.conftest import tiny_overrides

TEXT = text_key("all-MiniLM-L6-v2")  # the tiny configs' text encoder


def _tiny(root):
    cfg = load_config(None, tiny_overrides(root))
    return cfg, shard_units(prepare_shards(cfg)), read_encoder_list(cfg.encoders, "random")


def test_cache_keys_aligned_and_shapes(tiny_root):
    cfg, units, specs = _tiny(tiny_root)
    cache = CachedFeatures(cfg.cache_path, [s.name for s in specs] + [TEXT])
    keys = cache.keys()
    assert len(keys) == cache.count == 240
    for spec in specs:
        assert cache[spec.name].shape == (240, ImageEncoder(spec).width)
        assert cache[spec.name].dtype == np.float16
        assert cache.manifest["encoders"][spec.name]["count"] == 240
    assert cache[TEXT].shape == (240, 384)
    # the cached features of a sample are that sample's features, whatever encoder: spot-check one key
    sample = next(s for s in units[1].samples())
    row = keys.index(sample["key"])
    enc = ImageEncoder(specs[0])
    fresh = enc(enc.transform(sample["image"]).unsqueeze(0))[0]
    np.testing.assert_allclose(cache[specs[0].name][row].astype(np.float32), fresh.numpy(), atol=2e-3)


def test_resume_equals_uninterrupted(tiny_root, tmp_path):
    cfg, units, specs = _tiny(tiny_root)
    specs = specs[:2]
    build_cache(tmp_path / "full", units, specs, None)
    # a killed pass: only the first unit finished, plus a half-written temp file
    encoders = {s.name: ImageEncoder(s) for s in specs}
    embed_pass(tmp_path / "resumed", units[:1], encoders, None, 64, 0, torch.device("cpu"))
    (tmp_path / "resumed" / "parts" / units[1].name).mkdir(parents=True)
    (tmp_path / "resumed" / "parts" / units[1].name / "x.npy.1.tmp").write_bytes(b"partial")
    stats = build_cache(tmp_path / "resumed", units, specs, None)
    assert stats["units_resumed"] == 1
    full = json.loads((tmp_path / "full" / "manifest.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    for spec in specs:
        assert full["encoders"][spec.name]["sha256"] == resumed["encoders"][spec.name]["sha256"]
    assert full["keys_sha256"] == resumed["keys_sha256"]


def test_adding_an_encoder_reuses_the_cache(tiny_root, tmp_path):
    cfg, units, specs = _tiny(tiny_root)
    build_cache(tmp_path, units, specs[:1], None)
    stats = build_cache(tmp_path, units, specs[:2], None)
    assert stats["samples"] == 240  # only the new encoder was run, over every sample once
    cache = CachedFeatures(tmp_path, [specs[0].name, specs[1].name])
    assert cache.count == 240


def test_features_of_other_weights_are_embedded_again(tiny_root, tmp_path):
    """Same encoder name, weights from a file instead of the seeded random init: the cached features are not
    reused (the identity names what changed), the encoder is embedded again, and the others are left alone."""
    import timm
    from safetensors.torch import save_file

    from hnet.models.encoders import parse_spec

    _, units, specs = _tiny(tiny_root)
    build_cache(tmp_path / "c", units, specs[:2], None)
    before = {s.name: np.asarray(CachedFeatures(tmp_path / "c", [s.name])[s.name]).copy() for s in specs[:2]}
    torch.manual_seed(123)
    other = timm.create_model(specs[0].model_name, pretrained=False)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "w.safetensors"))
    changed = parse_spec({"name": specs[0].name, "weights": str(tmp_path / "w.safetensors")})
    with pytest.warns(UserWarning, match=r"'resnet10t@img_size=32' were computed by another encoder \(weights "):
        stats = build_cache(tmp_path / "c", units, [changed, specs[1]], None)
    assert stats["embedded"] == [changed.name]
    cache = CachedFeatures(tmp_path / "c", [s.name for s in specs[:2]])
    assert not np.allclose(cache[changed.name], before[changed.name])
    assert np.array_equal(cache[specs[1].name], before[specs[1].name])
    assert cache.manifest["encoders"][changed.name]["identity"]["weights"].startswith("file:")
    assert build_cache(tmp_path / "c", units, [changed, specs[1]], None)["embedded"] == []  # now up to date


def test_text_encoder_identity_follows_its_files(tmp_path):
    """A local text encoder folder is known by its files' digest: the same name over other bytes is another
    encoder."""
    from hnet.models.identity import text_identity

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"one")
    first = text_identity(str(folder))
    (folder / "weights.bin").write_bytes(b"two!")
    assert text_identity(str(folder))["model"] != first["model"] and first["name"] == str(folder)
    assert text_identity("all-MiniLM-L6-v2@layers=3")["name"] != text_identity("all-MiniLM-L6-v2")["name"]


def _flip_byte(path, keep_mtime: bool) -> None:
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    # A real corruption comes later than the write; move mtime on explicitly, since two writes within one
    # kernel clock tick can share an mtime. keep_mtime: bit rot that leaves size and mtime alone.
    mtime = stat.st_mtime_ns if keep_mtime else stat.st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(stat.st_atime_ns, mtime))


def test_corrupted_cache_detected_by_checksum(tiny_root, tmp_path):
    cfg, units, specs = _tiny(tiny_root)
    build_cache(tmp_path, units, specs[:1], None)
    path = tmp_path / json.loads((tmp_path / "manifest.json").read_text())["encoders"][specs[0].name]["file"]
    _flip_byte(path, keep_mtime=False)
    with pytest.raises(CacheError, match=f"{path.name}: checksum mismatch"):
        CachedFeatures(tmp_path, [specs[0].name])


def _small_cache(root):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.normal(size=(50, 8)), "b": (rng.normal(size=(10, 4)) for _ in range(5))}
    return write_cache(root, [f"k{i}" for i in range(50)], arrays)


def _count_hashes(monkeypatch) -> list:
    calls = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda path, *a: calls.append(path) or real(path, *a))
    return calls


def test_open_hashes_only_changed_files(tmp_path, monkeypatch):
    _small_cache(tmp_path / "c")
    calls = _count_hashes(monkeypatch)
    CachedFeatures(tmp_path / "c", ["a", "b"])
    assert calls == []  # hashed while written; unchanged size and mtime: not read again
    CachedFeatures(tmp_path / "c", ["a", "b"], verify="full")
    assert len(calls) == 2
    shutil.copytree(tmp_path / "c", tmp_path / "copy", copy_function=shutil.copy)  # new mtimes: hashed
    calls.clear()
    CachedFeatures(tmp_path / "copy", ["a", "b"])
    assert len(calls) == 2
    assert verify_cache(tmp_path / "copy") == {"a": "restat", "b": "restat"}
    calls.clear()
    CachedFeatures(tmp_path / "copy", ["a", "b"])
    assert calls == []


def test_bit_rot_with_unchanged_stat_needs_full_verification(tmp_path):
    manifest = _small_cache(tmp_path)
    path = tmp_path / manifest["encoders"]["b"]["file"]
    _flip_byte(path, keep_mtime=True)
    CachedFeatures(tmp_path, ["b"])  # the cheap check cannot see it (documented)
    with pytest.raises(CacheError, match=f"{path.name}: checksum mismatch"):
        CachedFeatures(tmp_path, ["b"], verify="full")
    with pytest.raises(CacheError, match=f"{path.name}: checksum mismatch"):
        verify_cache(tmp_path)


def test_only_rank_0_removes_stale_temps_before_the_barrier(tmp_path):
    stale = tmp_path / "parts" / "000001" / "x.npy.4242.tmp"  # another rank's file, or a killed writer's
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    seen = []
    barrier = lambda: seen.append(stale.exists())
    embed_pass(tmp_path, [], {}, None, 8, 0, torch.device("cpu"), rank=1, world=2, barrier=barrier)
    assert stale.exists() and seen == [True]
    embed_pass(tmp_path, [], {}, None, 8, 0, torch.device("cpu"), rank=0, world=2, barrier=barrier)
    assert seen == [True, False]  # removed before rank 0 reached the barrier the others wait at
    with pytest.raises(ValueError, match="needs a barrier"):
        embed_pass(tmp_path, [], {}, None, 8, 0, torch.device("cpu"), rank=0, world=2)


class _Counted:
    def __init__(self, transform):
        self.transform, self.calls = transform, 0

    def __call__(self, image):
        self.calls += 1
        return self.transform(image)


@pytest.mark.parametrize("item_bytes", [None, 1])  # one item per batch / one item per transform group
def test_shared_transforms_run_once_and_give_the_ungrouped_features(tiny_root, tmp_path, item_bytes):
    _, units, specs = _tiny(tiny_root)
    encoders = {s.name: ImageEncoder(s) for s in specs}  # resnet10t and convnext_atto share a data config
    for enc in encoders.values():
        enc.transform = _Counted(enc.transform)
    stats = embed_pass(tmp_path, units[:1], encoders, None, 60, 0, torch.device("cpu"), item_bytes=item_bytes)
    assert stats["samples"] == 100
    assert sum(e.transform.calls for e in encoders.values()) == 2 * 100  # 2 distinct configs, not 3 encoders
    samples = list(units[0].samples())
    for name, enc in encoders.items():
        with torch.no_grad():
            want = np.concatenate([enc(torch.stack([enc.transform.transform(s["image"]) for s in samples[i:i + 60]]))
                                   .half().numpy() for i in range(0, 100, 60)])
        got = np.load(tmp_path / "parts" / units[0].name / f"{files.slug(name)}.npy")
        assert got.tobytes() == want.tobytes(), name


def test_items_stay_within_the_byte_budget(tiny_root):
    _, units, specs = _tiny(tiny_root)
    encoders = {s.name: ImageEncoder(s) for s in specs}
    transforms = {name: enc.transform for name, enc in encoders.items()}  # 3 groups of 60 x 3 x 32 x 32 fp32
    one_group = 60 * 3 * 32 * 32 * 4
    items = [i for i in _UnitDataset(units[:1], transforms, 60, item_bytes=2 * one_group) if not i["end"]]
    assert [len(i["images"]) for i in items] == [2, 1, 3]  # batch of 60: 2 groups fit; batch of 40: all 3
    assert all(sum(t.nbytes for t in i["images"].values()) <= 2 * one_group for i in items)
    assert [len(i.get("keys", [])) for i in items] == [60, 0, 40]


def test_missing_encoder_named(tiny_root):
    cfg, _, _ = _tiny(tiny_root)
    with pytest.raises(CacheError, match="no features for 'resnet18'"):
        CachedFeatures(cfg.cache_path, ["resnet18"])


def test_bad_samples_in_shards_are_counted_in_the_manifest(tiny_root, tmp_path):
    import webdataset as wds

    from hnet.data.shards import iter_shard

    _, units, specs = _tiny(tiny_root)
    good = list(units[0].samples())[:3]
    jpg = next((tiny_root / "data").rglob("*.jpg")).read_bytes()
    with wds.TarWriter(str(tmp_path / "000000.tar")) as sink:
        for s in good:
            sink.write({"__key__": s["key"], "jpg": jpg, "txt": s["caption"]})
        sink.write({"__key__": "broken", "jpg": b"\xff\xd8\xff garbage", "txt": "a red circle"})
    with pytest.warns(UserWarning, match="bad sample broken"):
        manifest = build_cache(tmp_path / "cache", shard_units(str(tmp_path / "000000.tar")), specs[:1],
                               None)["manifest"]
    assert manifest["count"] == 3 and manifest["skipped_samples"] == {"000000": 1}
    assert [s["key"] for s in iter_shard(str(tmp_path / "000000.tar"))] == [s["key"] for s in good]


def test_older_cache_text_array_serves_its_own_text_encoder_only(tmp_path):
    """A cache from before text encoders had names in it (one `text` array + manifest text_encoder) reads as that
    encoder's captions, and as no other's."""
    from hnet.data.cache import TEXT as OLD_TEXT

    text = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float16)
    write_cache(tmp_path, ["a", "b", "c", "d"], {OLD_TEXT: text}, text_encoder="all-MiniLM-L6-v2")
    cache = CachedFeatures(tmp_path, [TEXT])
    assert np.array_equal(cache[TEXT], text) and cache.width(TEXT) == 8
    with pytest.raises(CacheError, match="no features for 'text:other'"):
        CachedFeatures(tmp_path, [text_key("other")])


def test_unnamed_text_array_cannot_stand_for_several_text_encoders(synthetic_cfg):
    """A synthetic cache's one `text` array (no text encoder recorded) serves a one-text run, not an N x M one,
    where every text encoder would silently read the same captions."""
    import dataclasses

    from hnet import files
    from hnet.data.cache import TEXT as OLD_TEXT
    from hnet.data.cache import open_training_cache

    manifest = files.read_json(synthetic_cfg.cache_path / "manifest.json")
    key = text_key("all-MiniLM-L6-v2")
    manifest["encoders"][OLD_TEXT] = manifest["encoders"].pop(key)
    files.write_json(synthetic_cfg.cache_path / "manifest.json", manifest)
    assert open_training_cache(synthetic_cfg, []).width(key) == 24
    with pytest.raises(CacheError, match="names no text encoder"):
        open_training_cache(dataclasses.replace(synthetic_cfg, text_encoders=["a", "b"]), [])
