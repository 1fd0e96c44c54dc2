"""benchmarks/real_zoo.py without the real data: it skips with a message naming what is missing, moves the config's
two folders, and its comparison figures are what they claim."""
import numpy as np

from hnet import files, runs
from tests.conftest import load_benchmark


def _module():
    return load_benchmark("real_zoo")


def test_skips_naming_the_missing_folders(tmp_path, capsys):
    zoo = _module()
    assert zoo.main(["--data", str(tmp_path / "nodata"), "--encoders", str(tmp_path / "noenc")]) is None
    out = capsys.readouterr().out
    assert out.startswith("SKIP real_zoo: missing ") and str(tmp_path / "nodata" / "flickr8k") in out
    assert "real_encoders/build.sh" in out


def test_config_folders_move_to_the_given_ones(tmp_path):
    zoo = _module()
    data, encoders = tmp_path / "data", tmp_path / "enc"
    for text in ("paraphrase-MiniLM-L3-v2", "all-mpnet-base-v2"):
        (encoders / "text" / text).mkdir(parents=True)
    cfg = zoo.real_config(data, encoders, tmp_path / "out", [])
    weights = {e["name"]: e["weights"] for e in cfg.encoders}
    assert len(weights) == 7 and weights["deit_tiny_patch16_224"].startswith(str(data / "weights"))
    assert weights["tf_efficientnet_lite2"].startswith(str(encoders / "image"))
    assert cfg.texts == ["all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2", "all-mpnet-base-v2"]
    assert cfg.data.metadata == str(data / "flickr8k" / "train" / "metadata_all_captions.json")
    assert cfg.eval.retrieval.startswith(str(data)) and cfg.cache_root == tmp_path / "out" / "cache"


def test_zero_shot_gap_is_the_difference_of_means_with_an_interval(tmp_path):
    zoo = _module()
    rng = np.random.default_rng(0)
    pairs = ["a + t", "b + t"]
    hyper = (rng.random((2, 400)) < 0.6).astype(np.float32)
    apes = [(rng.random((2, 400)) < 0.4).astype(np.float32) for _ in range(3)]
    for name, hits in [("hyper", hyper)] + [(f"ape{i}", h) for i, h in enumerate(apes)]:
        files.write_json(tmp_path / name / runs.EVAL, {"datasets": {"set": {"encoders": {p: {} for p in pairs}}}})
        runs.write_hits(tmp_path / name, "set", dict(zip(pairs, hits)))
    gap = zoo.zero_shot_gap(tmp_path / "hyper", [tmp_path / f"ape{i}" for i in range(3)], "set", pairs)
    expected = (hyper.mean() - np.mean(apes)) * 100
    assert np.isclose(gap["gap"], expected, atol=1e-4) and gap["ci"][0] < expected < gap["ci"][1]
    assert 2 < gap["ci"][1] - gap["ci"][0] < 15  # ~1,200 draws per side: a few points wide, not zero
