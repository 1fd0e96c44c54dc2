"""The identity of an encoder's features: what a cached feature was computed by. A cache entry whose identity
differs from the configured encoder's (other weights, preprocessing, options, model files or feature format) is
embedded again, never silently reused."""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch

from hnet.models.encoders import (
    OPEN_CLIP_PREFIX,
    EncoderSpec,
    create_timm,
    data_config,
    parse_text_spec,
    resolve_sentence_model,
)

FEATURE_FORMAT = 1  # bump when what a feature IS changes (pooling, normalisation, dtype): every cache re-embeds


def image_identity(spec: EncoderSpec) -> dict:
    """What an image encoder's features depend on: its name (options included), the weights actually loaded (a
    file's sha256; a hub name for timm's pretrained weights; the seeded random init), the resolved preprocessing and
    the feature format. Built on the meta device: no weights are read but a file's bytes."""
    with torch.device("meta"):
        model = create_timm(EncoderSpec(spec.name, spec.model_name, spec.options, "random"), "meta")
    config = data_config(model, spec)
    return {"name": spec.name, "weights": _weights_identity(spec), "preprocessing": _jsonable(config),
            "format": FEATURE_FORMAT}


def text_identity(name: str) -> dict:
    """What a text encoder's caption embeddings depend on: its name (layers and pooling options included), the model
    it loads (a local folder: the sha256 of its files; a hub name as it is) and the feature format."""
    base, _ = parse_text_spec(name)
    source = base if base.startswith(OPEN_CLIP_PREFIX) else resolve_sentence_model(base)
    folder = Path(source)
    model = {"folder_sha256": folder_digest(folder)} if folder.is_dir() else {"hub": source}
    return {"name": name, "model": model, "format": FEATURE_FORMAT}


def identity_digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def identity_changes(old: dict, new: dict) -> list[str]:
    """The fields whose values differ between two identities (what a message names)."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _weights_identity(spec: EncoderSpec) -> str | None:
    """None when a weights file is gone: its cached features (if any) can be used but not checked."""
    if spec.weights in ("random", "pretrained"):
        return f"{spec.weights}:{spec.model_name}"
    path = Path(spec.weights)
    return f"file:{file_digest(path)}" if path.is_file() else None


def _jsonable(config: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(config.items())}


@functools.lru_cache(maxsize=None)
def _digest_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file, computed once per (path, size, mtime) in a process."""
    stat = path.stat()
    return _digest_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def folder_digest(folder: Path) -> str:
    """sha256 over a model folder: every file's relative name and content digest."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)}\0{file_digest(path)}\n".encode())
    return digest.hexdigest()
