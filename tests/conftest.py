import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from hnet.config import load_config  # noqa: E402


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (they are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def padded_pair_features(pairs, rows: int):
    """Random unit features of `rows` samples for (image width, text width) `pairs`, each at its true widths and
    zero-padded to the widest: (widths, text widths, images, texts, padded images, padded texts)."""
    import torch
    import torch.nn.functional as F

    widths, text_widths = torch.tensor([w for w, _ in pairs]), torch.tensor([t for _, t in pairs])
    images = [F.normalize(torch.randn(rows, w), dim=-1) for w, _ in pairs]
    texts = [F.normalize(torch.randn(rows, t), dim=-1) for _, t in pairs]
    padded = torch.stack([F.pad(x, (0, int(widths.max()) - x.shape[1])) for x in images])
    padded_text = torch.stack([F.pad(x, (0, int(text_widths.max()) - x.shape[1])) for x in texts])
    return widths, text_widths, images, texts, padded, padded_text


@pytest.fixture(autouse=True)
def _fresh_text_folders():
    """Each test starts with no local text folders registered (the registry is per process)."""
    from hnet.text_folders import TEXT_FOLDERS

    saved = dict(TEXT_FOLDERS)
    TEXT_FOLDERS.clear()
    yield
    TEXT_FOLDERS.clear()
    TEXT_FOLDERS.update(saved)


def with_train(cfg, **train_kw):
    """cfg with some train.* fields changed."""
    import dataclasses

    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_kw))


TINY_ENCODERS = ["resnet10t@img_size=32", "vit_tiny_patch16_224@img_size=32", "convnext_atto@img_size=32"]


def tiny_overrides(root) -> list[str]:
    return [f"out_root={root}", f"encoders={TINY_ENCODERS}", "image_weights=random", "data.demo_samples=240",
            "data.demo_eval_samples=96", "data.demo_image_size=32", "data.shard_size=100",
            "data.embed_batch_size=60", "train.batch_size=64", "train.epochs=2", "train.warmup_steps=2",
            "train.log_every=1", "train.ckpt_every=4", "eval.datasets=[demo]", "name=tiny"]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A tiny built-in data set embedded once per test session (3 random-init encoders + MiniLM)."""
    from hnet.experiments.train_run import embed_training_data

    root = tmp_path_factory.mktemp("tiny")
    embed_training_data(load_config(None, tiny_overrides(root)))
    return root


@pytest.fixture
def tiny_cfg(tiny_root, tmp_path):
    """Config over the shared tiny cache, with its own run dir."""
    return load_config(None, tiny_overrides(tiny_root) + [f"data.cache_dir={tiny_root}/cache/demo",
                                                          f"name=run_{tmp_path.name}"])


@pytest.fixture
def synthetic_cfg(tmp_path):
    """Config over a synthetic cache: random unit features, unique random captions (no duplicate pairs)."""
    import numpy as np

    from hnet.data.cache import write_cache
    from hnet.models.encoders import text_key

    rng = np.random.default_rng(0)
    widths = {"resnet10t@img_size=32": 48, "vit_tiny_patch16_224@img_size=32": 16, "convnext_atto@img_size=32": 32}
    unit = lambda n, d: (lambda x: x / np.linalg.norm(x, axis=1, keepdims=True))(rng.normal(size=(n, d)))
    arrays = {name: unit(128, w) for name, w in widths.items()} | {text_key("all-MiniLM-L6-v2"): unit(128, 24)}
    write_cache(tmp_path / "cache", [f"k{i}" for i in range(128)], arrays)
    return load_config(None, tiny_overrides(tmp_path) + [f"data.cache_dir={tmp_path}/cache"])


PAIR_TEXTS = ["all-MiniLM-L6-v2", "other-text"]  # captions of both are synthetic: no text encoder is loaded


@pytest.fixture
def pairs_cfg(tmp_path):
    """3 image x 2 text encoders (text widths 24 and 16) over a synthetic cache in which every encoder sees one
    shared latent through its own random linear map, so every pair (also one never trained) can be stitched."""
    import numpy as np

    from hnet import files
    from hnet.data.cache import write_cache
    from hnet.models.encoders import text_key

    rng = np.random.default_rng(0)
    latent = rng.normal(size=(256, 12))
    view = lambda d: (lambda x: x / np.linalg.norm(x, axis=1, keepdims=True))(
        latent @ rng.normal(size=(12, d)) + 0.1 * rng.normal(size=(256, d)))
    widths = {"resnet10t@img_size=32": 48, "vit_tiny_patch16_224@img_size=32": 16, "convnext_atto@img_size=32": 32}
    arrays = {name: view(w) for name, w in widths.items()}
    arrays |= {text_key(PAIR_TEXTS[0]): view(24), text_key(PAIR_TEXTS[1]): view(16)}
    manifest = write_cache(tmp_path / "cache", [f"k{i}" for i in range(256)], arrays)
    # FLOPs per caption, as embedding would have measured them (the synthetic text encoders cannot be loaded)
    manifest["flops_per_sample"] = {text_key(PAIR_TEXTS[0]): 2.0e7, text_key(PAIR_TEXTS[1]): 1.0e7}
    files.write_json(tmp_path / "cache" / "manifest.json", manifest)
    return load_config(None, tiny_overrides(tmp_path) + [f"data.cache_dir={tmp_path}/cache",
                                                         f"text_encoders={PAIR_TEXTS}"])
