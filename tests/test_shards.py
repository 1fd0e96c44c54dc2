import json
import warnings

import pytest
from torch.utils.data import DataLoader

from hnet.data import demo
from hnet.data.shards import (
    DataError,
    expand_urls,
    iter_shard,
    load_metadata,
    make_reader,
    make_shards,
)


@pytest.fixture(scope="module")
def folder_1000(tmp_path_factory):
    root = tmp_path_factory.mktemp("595k")
    demo.write_595k(root, 1000, seed=3, size=16)
    return root


def _read_all(pattern):
    return [s for url in expand_urls(pattern) for s in iter_shard(url)]


def test_round_trip_1000_samples(folder_1000, tmp_path):
    manifest = make_shards(folder_1000 / "metadata.json", folder_1000 / "images", tmp_path, shard_size=300)
    assert [s["count"] for s in manifest["shards"]] == [300, 300, 300, 100]
    assert manifest["total"] == 1000 and not manifest["skipped"]
    records = json.loads((folder_1000 / "metadata.json").read_text())
    samples = _read_all(manifest["pattern"])
    assert [s["key"] for s in samples] == [r["id"] for r in records]
    assert [s["caption"] for s in samples] == [r["caption"] for r in records]
    assert samples[0]["image"].size == (16, 16)


def test_bad_images_skipped_counted_and_named(folder_1000, tmp_path):
    records = json.loads((folder_1000 / "metadata.json").read_text())[:20]
    broken = tmp_path / "broken"
    (broken / "images").mkdir(parents=True)
    for r in records:
        (broken / "images" / r["image"]).write_bytes((folder_1000 / "images" / r["image"]).read_bytes())
    (broken / "images" / records[3]["image"]).write_bytes(b"\xff\xd8\xff not a jpeg")
    (broken / "images" / records[7]["image"]).unlink()
    records[11]["caption"] = "   "
    (broken / "metadata.json").write_text(json.dumps(records))
    with pytest.warns(UserWarning, match=records[3]["id"]):
        manifest = make_shards(broken / "metadata.json", broken / "images", tmp_path / "shards", shard_size=8)
    reasons = {s["id"]: s["reason"] for s in manifest["skipped"]}
    assert reasons[records[3]["id"]].startswith("unreadable")
    assert reasons[records[7]["id"]] == "missing"
    assert reasons[records[11]["id"]] == "empty caption"
    assert manifest["total"] == 17 == len(_read_all(manifest["pattern"]))


def test_chat_json_layout(folder_1000, tmp_path):
    records = json.loads((folder_1000 / "metadata.json").read_text())[:5]
    chat = [{"id": r["id"], "image": r["image"], "conversations": [
        {"from": "human", "value": "Describe.\n<image>"}, {"from": "gpt", "value": r["caption"]}]} for r in records]
    (tmp_path / "chat.json").write_text(json.dumps(chat))
    assert [r["caption"] for r in load_metadata(tmp_path / "chat.json")] == [r["caption"] for r in records]


def test_truncated_shard_keeps_what_it_can_and_warns(folder_1000, tmp_path):
    manifest = make_shards(folder_1000 / "metadata.json", folder_1000 / "images", tmp_path, shard_size=500)
    first = tmp_path / "000000.tar"
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = _read_all(manifest["pattern"])
    assert 500 < len(samples) < 1000
    assert any("000000.tar" in str(w.message) or "Error" in str(w.message) for w in caught)


def test_pattern_matching_nothing_is_refused(tmp_path):
    with pytest.raises(DataError, match="matches no shard files"):
        expand_urls(str(tmp_path / "{000000..000003}.tar"))


def test_reader_splits_across_two_workers(folder_1000, tmp_path):
    manifest = make_shards(folder_1000 / "metadata.json", folder_1000 / "images", tmp_path, shard_size=100)
    reader = make_reader(manifest["pattern"]).map(lambda s: s["key"])
    loader = DataLoader(reader, batch_size=None, num_workers=2)
    keys = list(loader)
    assert len(keys) == 1000 and len(set(keys)) == 1000


def test_make_shards_resumes_after_last_finished_shard(folder_1000, tmp_path):
    full = make_shards(folder_1000 / "metadata.json", folder_1000 / "images", tmp_path / "a", shard_size=250)
    partial = tmp_path / "b"
    make_shards(folder_1000 / "metadata.json", folder_1000 / "images", partial, shard_size=250)
    manifest = json.loads((partial / "manifest.json").read_text())
    manifest["shards"], manifest["complete"] = manifest["shards"][:2], False  # as if killed after shard 2
    (partial / "manifest.json").write_text(json.dumps(manifest))
    (partial / "000002.tar").unlink()
    (partial / "000003.tar.123.tmp").write_bytes(b"half")
    again = make_shards(folder_1000 / "metadata.json", folder_1000 / "images", partial, shard_size=250)
    assert again["total"] == full["total"] == 1000
    assert not list(partial.glob("*.tmp"))
    assert (partial / "000002.tar").read_bytes() == (tmp_path / "a" / "000002.tar").read_bytes()


def test_duplicate_keys_skipped(folder_1000, tmp_path):
    records = json.loads((folder_1000 / "metadata.json").read_text())[:10]
    records[6]["id"] = records[2]["id"]
    (tmp_path / "metadata.json").write_text(json.dumps(records))
    with pytest.warns(UserWarning, match="duplicate key"):
        manifest = make_shards(tmp_path / "metadata.json", folder_1000 / "images", tmp_path / "s", shard_size=4)
    assert manifest["total"] == 9
    assert manifest["skipped"] == [{"id": records[2]["id"], "image": records[6]["image"], "reason": "duplicate key"}]


def test_non_utf8_caption_skipped_by_reader(folder_1000, tmp_path):
    import webdataset as wds

    jpg = next((folder_1000 / "images").iterdir()).read_bytes()
    with wds.TarWriter(str(tmp_path / "000000.tar")) as sink:
        sink.write({"__key__": "good", "jpg": jpg, "txt": "a red circle"})
        sink.write({"__key__": "bad", "jpg": jpg, "txt": b"\xff\xfe caption"})
    with pytest.warns(UserWarning, match="bad sample bad"):
        samples = list(iter_shard(str(tmp_path / "000000.tar")))
    assert [s["key"] for s in samples] == ["good"]
