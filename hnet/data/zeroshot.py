"""Zero-shot classification data, read offline in the layouts CLIP evaluations use; prompt templates.

A data set is a name (`demo`, or `cifar10`/`cifar100`/`imagenet` with the folder in `eval.<name>`) or a spec
`NAME=PATH`. The layout is detected from the folder:
  cifar         torchvision's pickles (test_batch + batches.meta, or test + meta; or their parent folder)
  wds           clip_benchmark's webdataset layout: classnames.txt, [zeroshot_classification_templates.txt],
                test/*.tar with `cls` and an image field
  classnames    an ImageFolder with classnames.txt (line i = i-th class folder in sorted order), [templates.txt]
  imagenet      an ImageFolder of ImageNet wnids, any subset of the 1000 (val, Imagenette, -100, -R, -A, -Sketch):
                labels in the subset's sorted wnid order, class names mapped by wnid
  imagenet_v2   an ImageFolder with folders 0..999: folder k is ImageNet class k, 1000-way classifier
  folder        any other ImageFolder: the folder names are the class names
Templates: the data set's own file, else CIFAR's 18 for CIFAR, OpenAI's 80 for ImageNet and its variants, `one`
otherwise; `eval.templates` (when not `auto`) overrides them all.
"""
from __future__ import annotations

import functools
import hashlib
import io as _io
import pickle
import re
import tarfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import webdataset as wds
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from PIL import Image
from timm.data import ImageNetInfo

from hnet.config import Config, ConfigError, parse_dataset_spec
from hnet.data.cache import Unit

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG"}
WDS_IMAGE_FIELDS = ("webp", "jpg", "jpeg", "png")
CHUNK = 1000  # images per cache unit
LAYOUTS = ("cifar (torchvision pickles)", "wds (clip_benchmark: classnames.txt + test/*.tar)",
           "classnames (ImageFolder + classnames.txt)", "imagenet (wnid folders, any subset)",
           "imagenet_v2 (folders 0..999)", "folder (ImageFolder, folder names as classes)")

# The 18 CIFAR prompts of CLIP's prompt-engineering notebook (as used by clip_benchmark).
CIFAR_TEMPLATES = tuple(f"a {q}photo of {a} {s}{{c}}." for a in ("a", "the") for q, s in
                        [("", ""), ("blurry ", ""), ("black and white ", ""), ("low contrast ", ""),
                         ("high contrast ", ""), ("bad ", ""), ("good ", ""), ("", "small "), ("", "big ")])
TEMPLATES = {"one": ("a photo of a {c}.",), "cifar": CIFAR_TEMPLATES,
             "imagenet": tuple(t("{c}") for t in OPENAI_IMAGENET_TEMPLATES)}
DEFAULT_TEMPLATES = {"cifar": "cifar", "imagenet": "imagenet", "imagenet_v2": "imagenet"}
WNID = re.compile(r"n\d{8}")


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in the standard (sorted) class order, from timm's bundled metadata (read once)."""
    info = ImageNetInfo()
    return tuple(info.index_to_label_name(i) for i in range(info.num_classes()))


@dataclass
class ZeroShotSet:
    name: str
    classnames: list[str]
    units: list[Unit]
    size: int
    layout: str = "folder"
    root: str = ""
    templates: tuple[str, ...] = ()  # the data set's own templates ("" = the layout's default set)
    templates_file: str = ""

    @property
    def key(self) -> str:
        """Cache and ledger key: two data sets read from different folders never share one."""
        if not self.root:
            return f"{self.name}_{self.size}"
        digest = hashlib.sha256(f"{self.layout}:{Path(self.root).resolve()}".encode()).hexdigest()[:8]
        return f"{self.name}_{self.size}_{digest}"

    def default_templates(self) -> tuple[str, tuple[str, ...]]:
        """(what, templates): the data set's own file, else the set for its layout/name."""
        if self.templates:
            return f"file:{self.templates_file}", self.templates
        which = DEFAULT_TEMPLATES.get(self.layout) or ("cifar" if self.name in ("cifar10", "cifar100") else "one")
        return which, TEMPLATES[which]


def templates_for(cfg: Config, dataset: ZeroShotSet) -> tuple[str, tuple[str, ...]]:
    if cfg.eval.templates != "auto":
        return cfg.eval.templates, TEMPLATES[cfg.eval.templates]
    return dataset.default_templates()


# ---- readers ---------------------------------------------------------------------------------------------------

def _files_samples(files: list[tuple[str, int]]):
    for path, label in files:
        yield {"key": Path(path).stem + f"_{label}", "image": Image.open(path).convert("RGB"), "label": label}


def _array_samples(images: np.ndarray, labels: np.ndarray, offset: int):
    for i, (image, label) in enumerate(zip(images, labels)):
        yield {"key": f"{offset + i:07d}", "image": Image.fromarray(image), "label": int(label)}


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder_units(folders: list[Path], labels: list[int], max_images: int) -> tuple[list[Unit], int]:
    files = [(str(f), label) for label, folder in zip(labels, folders) for f in sorted(folder.iterdir())
             if f.suffix in IMAGE_EXTENSIONS]
    if max_images:  # a class-balanced subset: take every k-th file
        step = max(1, len(files) // max_images)
        files = files[::step][:max_images]
    units = [Unit(f"chunk_{i // CHUNK:05d}", partial(_files_samples, files[i:i + CHUNK]))
             for i in range(0, len(files), CHUNK)]
    return units, len(files)


def image_folder(name: str, root: Path, max_images: int = 0, classnames: list[str] | None = None) -> ZeroShotSet:
    """An ImageFolder: label = index of the class folder in sorted order; names from `classnames` or folders."""
    folders = _class_folders(root)
    if not folders:
        raise ConfigError(f"{name}: no class folders in {root}")
    units, size = _folder_units(folders, list(range(len(folders))), max_images)
    names = classnames or [f.name.replace("_", " ") for f in folders]
    return ZeroShotSet(name, names, units, size)


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_templates(path: Path) -> tuple[str, ...]:
    templates = tuple(read_lines(path))
    for i, t in enumerate(templates):
        if "{c}" not in t:
            raise ConfigError(f"{path}:{i + 1}: template '{t}' has no {{c}} placeholder for the class name")
    if not templates:
        raise ConfigError(f"{path}: no templates in the file")
    return templates


def cifar_pickled(name: str, root: Path, max_images: int = 0) -> ZeroShotSet:
    """torchvision's layout: cifar-10-batches-py/test_batch + batches.meta or cifar-100-python/test + meta."""
    ten = (root / "test_batch").is_file()
    batch, meta = (root / "test_batch", root / "batches.meta") if ten else (root / "test", root / "meta")
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
    return ZeroShotSet(name, [n.replace("_", " ") for n in names], units, len(images), "cifar", str(root))


def wnid_folder(name: str, root: Path, max_images: int = 0) -> ZeroShotSet:
    """ImageNet or a subset/variant of it: labels follow the subset's sorted wnids, names looked up by wnid."""
    folders = _class_folders(root)
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    units, size = _folder_units(folders, list(range(len(folders))), max_images)
    names = [IMAGENET_CLASSNAMES[index[f.name]] for f in folders]
    return ZeroShotSet(name, names, units, size, "imagenet", str(root))


def imagenet_v2(name: str, root: Path, max_images: int = 0) -> ZeroShotSet:
    """ImageNet-V2: folder k holds images of ImageNet class k; the classifier covers all 1000 classes."""
    folders = sorted(_class_folders(root), key=lambda p: int(p.name))
    units, size = _folder_units(folders, [int(f.name) for f in folders], max_images)
    return ZeroShotSet(name, list(IMAGENET_CLASSNAMES), units, size, "imagenet_v2", str(root))


def named_folder(name: str, root: Path, max_images: int = 0) -> ZeroShotSet:
    """An ImageFolder with classnames.txt (one name per class folder, sorted folder order), optional templates.txt."""
    folders = _class_folders(root)
    names = read_lines(root / "classnames.txt")
    if len(names) != len(folders):
        raise ConfigError(f"{root / 'classnames.txt'}: {len(names)} class names for {len(folders)} class folders")
    dataset = image_folder(name, root, max_images, names)
    dataset.layout, dataset.root = "classnames", str(root)
    if (root / "templates.txt").is_file():
        dataset.templates, dataset.templates_file = read_templates(root / "templates.txt"), str(root / "templates.txt")
    return dataset


def _wds_samples(url: str, limit: int):
    stream = wds.WebDataset([url], shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None)
    for i, sample in enumerate(stream):
        if i >= limit:
            return
        field_ = next((f for f in WDS_IMAGE_FIELDS if f in sample), None)
        if field_ is None or "cls" not in sample:
            raise ConfigError(f"{url}: sample '{sample['__key__']}' lacks `cls` or an image field {WDS_IMAGE_FIELDS}")
        image = Image.open(_io.BytesIO(sample[field_])).convert("RGB")
        yield {"key": f"{Path(url).stem}_{sample['__key__']}", "image": image, "label": int(sample["cls"])}


def _tar_count(url: Path) -> int:
    """Samples in a shard: the `cls` members (headers only, the payloads are skipped)."""
    with tarfile.open(url) as tar:
        return sum(1 for m in tar if m.name.endswith(".cls"))


def clip_benchmark_wds(name: str, root: Path, max_images: int = 0) -> ZeroShotSet:
    """clip_benchmark's converted data sets: classnames.txt, zeroshot_classification_templates.txt, test/*.tar."""
    shards = sorted((root / "test").glob("*.tar"), key=lambda p: (len(p.stem), p.stem))
    names = read_lines(root / "classnames.txt")
    units, size = [], 0
    for shard in shards:
        count = _tar_count(shard)
        take = min(count, max_images - size) if max_images else count
        if take <= 0:
            break
        units.append(Unit(shard.stem, partial(_wds_samples, str(shard), take)))
        size += take
    dataset = ZeroShotSet(name, names, units, size, "wds", str(root))
    tfile = root / "zeroshot_classification_templates.txt"
    if tfile.is_file():
        dataset.templates, dataset.templates_file = read_templates(tfile), str(tfile)
    return dataset


# ---- layout detection ------------------------------------------------------------------------------------------

def detect_layout(root: Path) -> str:
    """Which reader a folder needs; one line naming the folder and the accepted layouts when none fits."""
    if (root / "test_batch").is_file() or ((root / "test").is_file() and (root / "meta").is_file()):
        return "cifar"
    if (root / "classnames.txt").is_file() and list((root / "test").glob("*.tar")):
        return "wds"
    folders = _class_folders(root)
    if folders and (root / "classnames.txt").is_file():
        return "classnames"
    names = [f.name for f in folders]
    if names and all(WNID.fullmatch(n) for n in names):
        unknown = sorted(set(names) - set(imagenet_wnids()))
        if unknown:
            raise ConfigError(f"{root}: wnid folders not among the ImageNet-1k classes: {unknown[:5]}")
        return "imagenet"
    if names and all(n.isdigit() for n in names):
        if any(int(n) >= len(IMAGENET_CLASSNAMES) for n in names):
            raise ConfigError(f"{root}: numbered folders must be ImageNet class indices 0..999 (ImageNet-V2)")
        return "imagenet_v2"
    if any(any(f.suffix in IMAGE_EXTENSIONS for f in folder.iterdir()) for folder in folders):
        return "folder"
    raise ConfigError(f"{root}: unknown data set layout; accepted: {'; '.join(LAYOUTS)}")


def _cifar_root(root: Path) -> Path:
    for sub in ("cifar-10-batches-py", "cifar-100-python"):
        if (root / sub).is_dir() and not (root / "test_batch").exists():
            return root / sub
    return root


READERS = {"cifar": cifar_pickled, "wds": clip_benchmark_wds, "classnames": named_folder, "imagenet": wnid_folder,
           "imagenet_v2": imagenet_v2}


def read_dataset(name: str, root: Path, max_images: int = 0) -> ZeroShotSet:
    root = _cifar_root(root)
    layout = detect_layout(root)
    if layout == "folder":
        dataset = image_folder(name, root, max_images)
        dataset.root = str(root)
        return dataset
    return READERS[layout](name, root, max_images)


def dataset_root(spec: str, cfg: Config) -> tuple[str, Path]:
    """(name, folder) of a data set spec: NAME=PATH, or a known name whose folder is in eval.<name>."""
    name, path = parse_dataset_spec(spec, "--datasets")
    where = f"--datasets {spec}"
    if not path:
        path = getattr(cfg.eval, name)
        where = f"eval.{name}"
        if not path:
            raise ConfigError(f"eval.{name}: set the dataset folder, e.g. eval.{name}=/data/{name} "
                              f"(or give --datasets {name}=/data/{name})")
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"{where}: folder not found: {root}")
    return name, root


def load_zeroshot(spec: str, cfg: Config) -> ZeroShotSet:
    from hnet.data import demo
    from hnet.data.sources import demo_root

    if spec == "demo":
        root = demo.write_zeroshot(demo_root(cfg) / "zeroshot", cfg.data.demo_eval_samples,
                                   size=cfg.data.demo_image_size)
        return image_folder("demo", root, cfg.eval.max_images)
    name, root = dataset_root(spec, cfg)
    return read_dataset(name, root, cfg.eval.max_images)

