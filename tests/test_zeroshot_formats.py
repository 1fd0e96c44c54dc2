"""Zero-shot data set layouts (wnid subsets, ImageNet-V2, ImageFolder + classnames.txt, clip_benchmark webdataset,
CIFAR pickles), templates per data set, and retrieval with several captions per image."""
import dataclasses
import io as _io
import pickle

import numpy as np
import pytest
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from PIL import Image

from hnet.config import ConfigError, load_config, parse_dataset_spec
from hnet.data.zeroshot import (
    TEMPLATES,
    imagenet_wnids,
    load_zeroshot,
    read_dataset,
    templates_for,
)
from hnet.eval.evaluate import evaluate_run
from hnet.eval.retrieval import read_captions, recall_multi


def _image(seed: int, size: int = 8) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def _folder(root, classes: dict[str, int]):
    """ImageFolder: {folder name: number of images}."""
    seed = 0
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            seed += 1
            _image(seed).save(root / name / f"img_{i}.png")
    return root


def _labels(ds) -> list[int]:
    return [s["label"] for u in ds.units for s in u.samples()]


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"out_root={tmp_path}", *overrides])


def test_wnid_subset_gets_imagenet_names_its_own_label_order_and_80_templates(tmp_path):
    wnids = imagenet_wnids()
    picked = {wnids[217]: 1, wnids[0]: 2, wnids[1]: 3}  # created out of order; labels follow sorted wnids
    _folder(tmp_path / "imagenette", picked)
    ds = load_zeroshot(f"inette={tmp_path / 'imagenette'}", _cfg(tmp_path))
    assert ds.layout == "imagenet" and ds.name == "inette"
    assert ds.classnames == [IMAGENET_CLASSNAMES[0], IMAGENET_CLASSNAMES[1], IMAGENET_CLASSNAMES[217]]
    assert ds.classnames[0] == "tench" and not any(n.startswith("n0") for n in ds.classnames)
    assert _labels(ds) == [0, 0, 1, 1, 1, 2]
    assert ds.default_templates() == ("imagenet", TEMPLATES["imagenet"]) and len(TEMPLATES["imagenet"]) == 80


def test_wnid_full_val_keeps_the_standard_class_index(tmp_path):
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids) and wnids[0] == "n01440764"
    cfg = _cfg(tmp_path, f"eval.imagenet={_folder(tmp_path / 'val', {wnids[5]: 1, wnids[999]: 1})}")
    ds = load_zeroshot("imagenet", cfg)  # the eval.imagenet= key still works, and a subset is no longer refused
    assert ds.classnames == [IMAGENET_CLASSNAMES[5], IMAGENET_CLASSNAMES[999]]


def test_imagenet_v2_folder_k_is_class_k(tmp_path):
    _folder(tmp_path / "v2", {"0": 1, "10": 2, "2": 1})  # sorted as text: 0, 10, 2
    ds = read_dataset("v2", tmp_path / "v2")
    assert ds.layout == "imagenet_v2" and ds.classnames == list(IMAGENET_CLASSNAMES)
    assert sorted(_labels(ds)) == [0, 2, 10, 10]
    assert ds.default_templates()[0] == "imagenet"


def test_imagefolder_with_classnames_and_templates_files(tmp_path):
    root = _folder(tmp_path / "pets", {"b_dog": 2, "a_cat": 1})
    (root / "classnames.txt").write_text("cat\ndog\n")
    (root / "templates.txt").write_text("a photo of a {c}, a pet.\na drawing of a {c}.\n")
    ds = read_dataset("pets", root)
    assert ds.layout == "classnames" and ds.classnames == ["cat", "dog"] and _labels(ds) == [0, 1, 1]
    assert ds.default_templates() == (f"file:{root / 'templates.txt'}",
                                      ("a photo of a {c}, a pet.", "a drawing of a {c}."))
    (root / "classnames.txt").write_text("cat\n")
    with pytest.raises(ConfigError, match="classnames.txt: 1 class names for 2 class folders"):
        read_dataset("pets", root)
    (root / "classnames.txt").write_text("cat\ndog\n")
    (root / "templates.txt").write_text("a photo of a thing.\n")
    with pytest.raises(ConfigError, match=r"templates.txt:1: .*placeholder"):
        read_dataset("pets", root)


def _clip_benchmark_wds(root, labels_per_shard: list[list[int]], classnames: list[str]):
    import webdataset as wds

    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\nitap of a {c}.\n")
    seed = 0
    for s, labels in enumerate(labels_per_shard):
        with wds.TarWriter(str(root / "test" / f"{s}.tar")) as sink:
            for label in labels:
                seed += 1
                buf = _io.BytesIO()
                _image(seed).save(buf, format="WEBP")
                sink.write({"__key__": f"s{seed:04d}", "webp": buf.getvalue(), "cls": str(label).encode()})
    return root


def test_clip_benchmark_webdataset_folder(tmp_path):
    root = _clip_benchmark_wds(tmp_path / "wds_cars", [[2, 0, 1], [1, 1]], ["audi", "bmw", "fiat"])
    ds = read_dataset("cars", root)
    assert ds.layout == "wds" and ds.size == 5 and ds.classnames == ["audi", "bmw", "fiat"]
    assert _labels(ds) == [2, 0, 1, 1, 1]
    assert ds.default_templates()[1] == ("a photo of a {c}.", "itap of a {c}.")
    first = read_dataset("cars", root, max_images=4)  # the first 4 in shard order
    assert first.size == 4 and _labels(first) == [2, 0, 1, 1]
    sample = next(ds.units[0].samples())
    assert sample["image"].size == (8, 8) and sample["key"] != next(ds.units[1].samples())["key"]


def test_cifar_pickles_get_cifar_templates_under_any_name(tmp_path):
    data = {"data": np.zeros((3, 3072), np.uint8), "labels": [0, 1, 0]}
    (tmp_path / "c10").mkdir()
    (tmp_path / "c10" / "test_batch").write_bytes(pickle.dumps(data))
    (tmp_path / "c10" / "batches.meta").write_bytes(pickle.dumps({"label_names": ["airplane", "automobile"]}))
    ds = read_dataset("mycifar", tmp_path / "c10")
    assert ds.layout == "cifar" and ds.default_templates()[0] == "cifar" and _labels(ds) == [0, 1, 0]


def test_template_choice_per_dataset_and_override(tmp_path):
    plain = read_dataset("shapes", _folder(tmp_path / "shapes", {"red_square": 1, "circle": 1}))
    named_cifar = read_dataset("cifar10", _folder(tmp_path / "c10", {"airplane": 1, "bird": 1}))
    inet = read_dataset("inet", _folder(tmp_path / "inet", {imagenet_wnids()[3]: 1}))
    auto = _cfg(tmp_path)
    assert auto.eval.templates == "auto" and plain.classnames == ["circle", "red square"]
    assert [templates_for(auto, d)[0] for d in (plain, named_cifar, inet)] == ["one", "cifar", "imagenet"]
    forced = _cfg(tmp_path, "eval.templates=one")
    assert {templates_for(forced, d) for d in (plain, named_cifar, inet)} == {("one", TEMPLATES["one"])}


def test_unknown_layout_is_one_line_naming_the_folder(tmp_path):
    (tmp_path / "odd" / "sub").mkdir(parents=True)
    (tmp_path / "odd" / "sub" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError) as err:
        read_dataset("odd", tmp_path / "odd")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "odd") in message and "clip_benchmark" in message
    _folder(tmp_path / "badwnid", {"n99999999": 1})
    with pytest.raises(ConfigError, match="not among the ImageNet-1k classes"):
        read_dataset("x", tmp_path / "badwnid")


def test_dataset_specs_and_cache_keys(tmp_path):
    assert parse_dataset_spec("inet_r=/data/imagenet-r", "--datasets") == ("inet_r", "/data/imagenet-r")
    assert parse_dataset_spec("cifar10", "--datasets") == ("cifar10", "")
    for bad, msg in [("cifr10", "did you mean 'cifar10'"), ("a b=/x", "NAME in NAME=PATH"), ("x=", "empty PATH")]:
        with pytest.raises(ConfigError, match=msg):
            parse_dataset_spec(bad, "--datasets")
    with pytest.raises(ConfigError, match=r"eval.datasets: .*given twice"):
        _cfg(tmp_path, "eval.datasets=[a=/x,a=/y]")
    with pytest.raises(ConfigError, match="--datasets x=.*folder not found"):
        load_zeroshot(f"x={tmp_path / 'nope'}", _cfg(tmp_path))
    one = read_dataset("set", _folder(tmp_path / "one", {"cat": 1, "dog": 1}))
    two = read_dataset("set", _folder(tmp_path / "two", {"cat": 1, "dog": 1}))
    assert one.size == two.size and one.key != two.key and one.key.startswith("set_2_")


# ---- retrieval ------------------------------------------------------------------------------------------------

def brute_force_recall(sim: torch.Tensor, positive: torch.Tensor, k: int) -> float:
    """Sort each query's items by score, a right item after every wrong one it ties with; hit if any right
    item is in the first k."""
    hits = 0
    for i in range(sim.shape[0]):
        order = sorted(range(sim.shape[1]), key=lambda j: (-float(sim[i, j]), bool(positive[i, j])))
        hits += any(bool(positive[i, j]) for j in order[:k])
    return 100.0 * hits / sim.shape[0]


def test_recall_any_caption_and_pessimistic_ties_match_brute_force():
    g = torch.Generator().manual_seed(0)
    n_images, per = 12, 5
    text_image = torch.arange(n_images).repeat_interleave(per)[torch.randperm(n_images * per, generator=g)]
    sim = torch.randint(0, 6, (n_images, n_images * per), generator=g).float()  # coarse scores: many ties
    positive = text_image[None, :] == torch.arange(n_images)[:, None]
    for k in (1, 5, 10):
        assert recall_multi(sim, positive, (k,))[f"R@{k}"] == pytest.approx(brute_force_recall(sim, positive, k))
        assert recall_multi(sim.T, positive.T, (k,))[f"R@{k}"] == pytest.approx(
            brute_force_recall(sim.T, positive.T, k))
    tie = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # query 0 ties its right item with a wrong one
    assert recall_multi(tie, torch.eye(2, dtype=torch.bool), (1,))["R@1"] == 50.0


def _coco(tmp_path, n_images=4, per=5):
    import json

    images_dir = tmp_path / "val2014"
    images_dir.mkdir()
    images, annotations = [], []
    for i in range(n_images):
        _image(i).save(images_dir / f"COCO_{i}.jpg")
        images.append({"id": 100 + i, "file_name": f"COCO_{i}.jpg"})
        annotations += [{"id": 10 * i + c, "image_id": 100 + i, "caption": f"image {i} caption {c} "}
                        for c in range(per)]
    annotations.reverse()  # annotations are not grouped or ordered by image in COCO's files
    (tmp_path / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return tmp_path / "captions_val2014.json", images_dir


def test_coco_captions_file_five_per_image(tmp_path):
    path, images_dir = _coco(tmp_path)
    caps = read_captions(path, images_dir)
    assert [p.name for p in caps.images] == [f"COCO_{i}.jpg" for i in range(4)] and len(caps.texts) == 20
    assert all(t.startswith(f"image {caps.text_image[j]} ") for j, t in enumerate(caps.texts))
    assert np.bincount(caps.text_image).tolist() == [5, 5, 5, 5]
    assert len(read_captions(path, images_dir, max_images=2).texts) == 10
    with pytest.raises(ConfigError, match="eval.retrieval_images: 4 images"):
        read_captions(path, tmp_path / "elsewhere")


def test_karpathy_split_file(tmp_path):
    import json

    (tmp_path / "flickr").mkdir()
    images = []
    for i, split in enumerate(["train", "test", "val", "test"]):
        _image(i).save(tmp_path / "flickr" / f"{i}.jpg")
        sentences = [{"raw": f"img {i} s{c}"} for c in range(5)]
        images.append({"filename": f"{i}.jpg", "split": split, "sentences": sentences})
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    caps = read_captions(tmp_path / "dataset_flickr30k.json", tmp_path / "flickr")
    assert [p.name for p in caps.images] == ["1.jpg", "3.jpg"] and caps.texts[5] == "img 3 s0"
    assert caps.text_image == [0] * 5 + [1] * 5
    (tmp_path / "bad.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(ConfigError, match="neither a COCO captions file"):
        read_captions(tmp_path / "bad.json", tmp_path)


def test_evaluate_run_on_specs_and_a_coco_captions_file(tiny_cfg, tmp_path):
    """End to end: a 3-class wnid subset given as NAME=PATH and COCO-style retrieval with 5 captions per image;
    R@K from the run equals the brute-force count on the connector's own outputs."""
    import torch.nn.functional as F

    from hnet import files
    from hnet.data.cache import CachedFeatures
    from hnet.models.encoders import TextEncoder
    from hnet.runs import connector_for
    from hnet.train.loop import train

    path, images_dir = _coco(tmp_path, n_images=12)
    wnids = imagenet_wnids()
    subset = _folder(tmp_path / "inet3", {wnids[0]: 2, wnids[1]: 2, wnids[2]: 2})
    ev = dataclasses.replace(tiny_cfg.eval, retrieval=str(path), retrieval_images=str(images_dir))
    cfg = dataclasses.replace(tiny_cfg, eval=ev, train=dataclasses.replace(tiny_cfg.train, max_steps=1))
    train(cfg)
    results = evaluate_run(cfg, cfg.run_dir, [f"inet3={subset}"])
    r = results["datasets"]["inet3"]
    assert r["classes"] == list(IMAGENET_CLASSNAMES[:3]) and r["templates"] == "imagenet" and r["n"] == 6
    report = files.read_json(cfg.run_dir / "eval" / "inet3.json")
    enc = cfg.encoders[0]
    assert report["metrics"][enc]["acc1"] == pytest.approx(r["encoders"][enc]["top1"] / 100)
    csv = (cfg.run_dir / "eval.csv").read_text().splitlines()
    assert len(csv) == 1 + 2 * len(cfg.encoders) and csv[0].startswith("run,dataset,task,encoder")
    caps = read_captions(path, images_dir)
    text = TextEncoder(cfg.text_encoder).encode(caps.texts)
    positive = torch.tensor(caps.text_image)[None, :] == torch.arange(12)[:, None]
    parts = files.read_json(cfg.run_dir / "flops.json")["phases"]["eval"]["parts"]
    cache_key = next(k.split("/")[1] for k in parts if k.startswith("embed/retrieval_"))  # this run's, not another's
    root = cfg.cache_root / "eval" / cache_key
    for name in cfg.encoders:
        got = results["retrieval"][name]
        assert got["n"] == 12 and got["n_texts"] == 60
        with torch.no_grad():
            image = F.normalize(connector_for(cfg.run_dir, name)(
                torch.from_numpy(np.asarray(CachedFeatures(root, [name])[name], np.float32))), dim=-1)
        sim = image @ F.normalize(text, dim=-1).T
        for k in (1, 5, 10):
            assert got["image_to_text"][f"R@{k}"] == pytest.approx(brute_force_recall(sim, positive, k))
            assert got["text_to_image"][f"R@{k}"] == pytest.approx(brute_force_recall(sim.T, positive.T, k))
    assert any(k.startswith(f"embed/{root.name}/") for k in parts)
    assert any(k.startswith("heads/inet3_6_") for k in parts)
