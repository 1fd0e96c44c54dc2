import json

import numpy as np
import pytest
import torch

from hnet.cache import TEXT, CachedFeatures, CacheError, build_cache, embed_pass
from hnet.config import load_config
from hnet.data.sources import prepare_shards, shard_units
from hnet.zoo import ImageEncoder, read_encoder_list
from tests.conftest import tiny_overrides


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


def test_corrupted_cache_detected_by_checksum(tiny_root, tmp_path):
    cfg, units, specs = _tiny(tiny_root)
    build_cache(tmp_path, units, specs[:1], None)
    path = tmp_path / json.loads((tmp_path / "manifest.json").read_text())["encoders"][specs[0].name]["file"]
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"{path.name}: checksum mismatch"):
        CachedFeatures(tmp_path, [specs[0].name])


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
