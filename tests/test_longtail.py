"""The long-tail view: class counts from training captions, segments, ECE and the log-frequency slope."""
import json
import math

import numpy as np
import pytest
import webdataset as wds

from hnet.config import load_config
from hnet.eval.longtail import class_counts, count_mentions, longtail_view, pair_longtail, segment_of
from hnet.report_probes import longtail_markdown, longtail_metrics

CLASSES = ["cat", "red circle", "box", "butterfly", "sea lion"]


def _captions() -> list[str]:
    """Hand-made: cat in 101 captions, red circle in 100, box in 20, butterfly in 19, sea lion in 0."""
    caps = ["a cat on a mat"] * 97 + ["Cats and kittens", "CAT, cat and cat again", "two cats.", "a cat\nsleeping"]
    caps += ["a red circle"] * 98 + ["three Red  Circles", "red\tcircle on blue"]
    caps += ["a box"] * 18 + ["boxes", "a BOX"]
    caps += ["a butterfly"] * 17 + ["butterflies", "a Butterfly."]
    # none of these names a class as whole words
    caps += ["a category of concatenated cattle", "a redcircle", "circle red", "boxer", "butterflyfish", "sea", "lion"]
    return caps


def test_segment_counts_on_a_hand_made_caption_set_with_the_boundaries():
    counts = count_mentions(iter(_captions()), CLASSES, chunk=7)  # chunks cut mid-way through the caption list
    assert counts == [101, 100, 20, 19, 0]
    assert [segment_of(n, 100, 20) for n in counts] == ["many", "medium", "medium", "few", "few"]
    assert [segment_of(n, 19, 19) for n in counts] == ["many", "many", "many", "medium", "few"]
    assert count_mentions(["Sea lions", "a sea  lion"], CLASSES) == [0, 0, 0, 0, 2]


def test_ece_and_slope_on_a_hand_computed_case():
    counts = [7, 3, 0]  # log(1 + count) = 3 ln 2, 2 ln 2, 0; segments (many=5, few=1): many, medium, few
    labels = np.array([0, 0, 1, 1, 2, 2])
    hits = np.array([1, 0, 1, 0, 0, 0])
    confidence = np.array([0.62, 0.68, 0.95, 0.95, 0.5, 0.3])
    view = pair_longtail(hits, confidence, labels, counts, many=5, few=1)
    # 15 equal-width bins: 0.62 -> bin 9, 0.68 -> bin 10 (one bin of ten would hold both)
    assert view["many"]["ece"] == pytest.approx(100 * (0.5 * (1 - 0.62) + 0.5 * 0.68))
    assert view["many"] | {"ece": None} == {"classes": 1, "images": 2, "top1": 50.0, "mean_class_top1": 50.0,
                                            "ece": None}
    assert view["medium"]["ece"] == pytest.approx(100 * abs(0.5 - 0.95))
    assert view["few"]["top1"] == 0.0 and view["few"]["ece"] == pytest.approx(100 * 0.4)  # bins 7 and 4
    # per-class top-1 y = [50, 50, 0] against x = [3 ln2, 2 ln2, 0]: dx = [4, 1, -5] ln2 / 3, dy = [50, 50, -100] / 3,
    # slope = sum(dx dy) / sum(dx^2) = (750 ln2 / 9) / (42 ln2^2 / 9) = 125 / (7 ln2)
    assert view["log_frequency_slope"] == pytest.approx(125 / (7 * math.log(2)))
    assert view["per_class_top1"] == [50.0, 50.0, 0.0]


def _write_shard(path, samples):
    """A shard in make_shards' layout; the image members are not images at all (they must never be decoded)."""
    with wds.TarWriter(str(path), mtime=0) as sink:
        for i, captions in enumerate(samples):
            sink.write({"__key__": f"s{i:04d}", "jpg": b"not an image", "txt": captions[0],
                        "json": json.dumps({"captions": captions}).encode()})


def test_counts_stream_from_the_training_shards_as_the_run_trained(tmp_path):
    samples = [["a cat", "a red circle", "two boxes"]] * 3 + [["a box"]] * 2
    _write_shard(tmp_path / "000000.tar", samples[:2])
    _write_shard(tmp_path / "000001.tar", samples[2:])
    base = [f"out_root={tmp_path}", "data.source=cc595k", f"data.shards={tmp_path}/{{000000..000001}}.tar"]
    counts, source = class_counts(load_config(None, base), CLASSES)
    assert counts == [3, 3, 5, 0, 0] and "2 training shard(s)" in source
    assert class_counts(load_config(None, base + ["data.captions=first"]), CLASSES)[0] == [3, 0, 2, 0, 0]
    assert class_counts(load_config(None, base + ["data.samples_per_encoder=4"]), CLASSES)[0] == [3, 3, 4, 0, 0]
    assert list((tmp_path / "cache" / "cc595k" / "eval").glob("longtail_*.json"))  # counted once, then cached


def test_no_reachable_captions_omits_the_view_with_a_note(tmp_path):
    cfg = load_config(None, [f"out_root={tmp_path}"])  # the built-in data, never built under this out_root
    view = longtail_view(cfg, CLASSES, {"enc": {"hits": np.ones(2), "confidence": np.ones(2)}}, np.array([0, 1]))
    assert set(view) == {"omitted"} and "no complete shard set" in view["omitted"]
    assert "omitted" in longtail_markdown("demo", view)[0] and longtail_metrics(view, "enc") == {}
    off = longtail_view(load_config(None, [f"out_root={tmp_path}", "eval.longtail=false"]), CLASSES, {}, [])
    assert off == {"omitted": "eval.longtail=false"}
