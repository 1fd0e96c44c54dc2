"""Zero-shot classification data: CIFAR-10/100 (torchvision's pickled layout or an ImageFolder), ImageNet-1k val
(ImageFolder of wnid folders, standard class order, class names from open_clip's metadata), and the built-in
demo set; prompt templates. Nothing is ever downloaded.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from PIL import Image

from hnet.cache import Unit
from hnet.config import Config, ConfigError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG"}
CHUNK = 1000  # images per cache unit

# The 18 CIFAR prompts of CLIP's prompt-engineering notebook (as used by clip_benchmark).
CIFAR_TEMPLATES = tuple(f"a {q}photo of {a} {s}{{c}}." for a in ("a", "the") for q, s in
                        [("", ""), ("blurry ", ""), ("black and white ", ""), ("low contrast ", ""),
                         ("high contrast ", ""), ("bad ", ""), ("good ", ""), ("", "small "), ("", "big ")])
TEMPLATES = {"one": ("a photo of a {c}.",), "cifar": CIFAR_TEMPLATES,
             "imagenet": tuple(t("{c}") for t in OPENAI_IMAGENET_TEMPLATES)}


@dataclass
class ZeroShotSet:
    name: str
    classnames: list[str]
    units: list[Unit]
    size: int


def _files_samples(files: list[tuple[str, int]]):
    for path, label in files:
        yield {"key": Path(path).stem + f"_{label}", "image": Image.open(path).convert("RGB"), "label": label}


def _array_samples(images: np.ndarray, labels: np.ndarray, offset: int):
    for i, (image, label) in enumerate(zip(images, labels)):
        yield {"key": f"{offset + i:07d}", "image": Image.fromarray(image), "label": int(label)}


def image_folder(name: str, root: Path, max_images: int = 0, classnames: list[str] | None = None) -> ZeroShotSet:
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ConfigError(f"eval.{name}: no class folders in {root}")
    files = [(str(f), label) for label, folder in enumerate(folders) for f in sorted(folder.iterdir())
             if f.suffix in IMAGE_EXTENSIONS]
    if max_images:  # a class-balanced subset: take every k-th file
        step = max(1, len(files) // max_images)
        files = files[::step][:max_images]
    names = classnames or [f.name.replace("_", " ") for f in folders]
    units = [Unit(f"chunk_{i // CHUNK:05d}", partial(_files_samples, files[i:i + CHUNK]))
             for i in range(0, len(files), CHUNK)]
    return ZeroShotSet(name, names, units, len(files))


def cifar_pickled(name: str, root: Path, max_images: int = 0) -> ZeroShotSet:
    """torchvision's layout: cifar-10-batches-py/test_batch or cifar-100-python/test (+ meta)."""
    ten = name == "cifar10"
    batch = root / ("test_batch" if ten else "test")
    meta = root / ("batches.meta" if ten else "meta")
    with open(batch, "rb") as fh:
        data = pickle.load(fh, encoding="latin1")
    with open(meta, "rb") as fh:
        names = pickle.load(fh, encoding="latin1")["label_names" if ten else "fine_label_names"]
    images = data["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.asarray(data["labels" if ten else "fine_labels"])
    if max_images:
        images, labels = images[:max_images], labels[:max_images]
    units = [Unit(f"chunk_{i // CHUNK:05d}", partial(_array_samples, images[i:i + CHUNK], labels[i:i + CHUNK], i))
             for i in range(0, len(images), CHUNK)]
    return ZeroShotSet(name, [n.replace("_", " ") for n in names], units, len(images))


def load_zeroshot(name: str, cfg: Config) -> ZeroShotSet:
    from hnet.data import demo
    from hnet.data.sources import demo_root

    if name == "demo":
        root = demo.write_zeroshot(demo_root(cfg) / "zeroshot", cfg.data.demo_eval_samples,
                                   size=cfg.data.demo_image_size)
        return image_folder(name, root, cfg.eval.max_images)
    if name not in ("cifar10", "cifar100", "imagenet"):
        raise ConfigError(f"--datasets: unknown dataset '{name}' (valid: demo, cifar10, cifar100, imagenet)")
    root_str = getattr(cfg.eval, name)
    if not root_str:
        raise ConfigError(f"eval.{name}: set the dataset folder, e.g. eval.{name}=/data/{name}")
    root = Path(root_str)
    if not root.is_dir():
        raise ConfigError(f"eval.{name}: folder not found: {root}")
    if name.startswith("cifar") and ((root / "test_batch").exists() or (root / "test").is_file()):
        return cifar_pickled(name, root, cfg.eval.max_images)
    classnames = list(IMAGENET_CLASSNAMES) if name == "imagenet" else None
    dataset = image_folder(name, root, cfg.eval.max_images, classnames)
    if name == "imagenet" and len({p.name for p in root.iterdir() if p.is_dir()}) != len(IMAGENET_CLASSNAMES):
        raise ConfigError(f"eval.imagenet: {root} must hold the 1000 wnid class folders")
    return dataset
