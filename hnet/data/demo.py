"""Built-in data: captioned images of coloured shapes, generated deterministically from a seed (no download).

Training pairs are written in the CC-595k layout (`metadata.json` + `images/`) so they take the same path as
real data (shards -> embed -> train). Held-out zero-shot images are written as an ImageFolder
(`<class>/<n>.jpg`, class = "<colour> <shape>") and evaluated like CIFAR.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from hnet import files

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 220, 30),
           "purple": (140, 40, 170), "orange": (245, 140, 20)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.22, "medium": 0.36, "large": 0.52}
POSITIONS = {"top left": (0.27, 0.27), "top right": (0.73, 0.27), "bottom left": (0.27, 0.73),
             "bottom right": (0.73, 0.73), "centre": (0.5, 0.5)}
CAPTION_TEMPLATES = ("a {size} {colour} {shape} in the {position}.",
                     "a photo of a {size} {colour} {shape}, {position}.",
                     "{colour} {shape} on a grey background.",
                     "there is a {colour} {shape} in the {position} of the picture.",
                     "a {colour} {shape}.")


def class_names() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # cross
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


def render(rng: np.random.Generator, size: int) -> tuple[Image.Image, dict]:
    """One random image and its attributes."""
    colour = rng.choice(list(COLOURS))
    shape = rng.choice(SHAPES)
    scale = rng.choice(list(SIZES))
    position = rng.choice(list(POSITIONS))
    grey = int(rng.integers(90, 170))
    noise = rng.normal(0, 12, (size, size, 3))
    background = np.clip(grey + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    px, py = POSITIONS[position]
    jitter = rng.normal(0, 0.03, 2)
    r = SIZES[scale] * size / 2
    cx = float(np.clip(px + jitter[0], 0.15, 0.85)) * size
    cy = float(np.clip(py + jitter[1], 0.15, 0.85)) * size
    tint = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 15, 3), 0, 255).astype(int)
    _draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, tuple(int(t) for t in tint))
    return image, {"colour": colour, "shape": shape, "size": scale, "position": position}


def write_595k(out: str | Path, n: int, seed: int = 0, size: int = 64) -> Path:
    """Write n captioned images in the CC-595k layout; returns the metadata.json path. Idempotent."""
    out = Path(out)
    meta_path = out / "metadata.json"
    if meta_path.exists() and len(files.read_json(meta_path)) == n:
        return meta_path
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in tqdm(range(n), desc="demo images", leave=False):
        image, attrs = render(rng, size)
        template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
        name = f"demo_{seed}_{i:07d}"
        image.save(out / "images" / f"{name}.jpg", quality=92)
        records.append({"id": name, "image": f"{name}.jpg", "caption": template.format(**attrs), **attrs})
    files.write_json(meta_path, records)
    return meta_path


def write_zeroshot(out: str | Path, n: int, seed: int = 12345, size: int = 64) -> Path:
    """Write n held-out images as an ImageFolder with one folder per class. Idempotent."""
    out = Path(out)
    done = out / "done.json"
    if done.exists() and files.read_json(done).get("n") == n:
        return out
    shutil.rmtree(out, ignore_errors=True)  # a different size: no stale images from the old set
    rng = np.random.default_rng(seed)
    for i in range(n):
        image, attrs = render(rng, size)
        folder = out / f"{attrs['colour']} {attrs['shape']}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:06d}.jpg", quality=92)
    files.write_json(done, {"n": n, "seed": seed, "classes": class_names()})
    return out

