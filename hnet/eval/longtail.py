"""The long-tail view of zero-shot classification: each class's accuracy against how often the class occurs in the
run's TRAINING captions, grouped ImageNet-LT style into many / medium / few segments.

A class occurs in a caption when its name or its simple plural appears as whole words, case-insensitive (`red
circle`, `Red Circles`; the words may be split by any whitespace within the caption). Counts are captions, not
matches: a caption naming a class twice counts once. They are counted once per (training shards, classes), with
one compiled regex per class over chunks of captions read from the shards' text members (images are never
decoded), and cached under CACHE/eval/longtail_<digest>.json. Segments (eval.longtail_many, eval.longtail_few):
many = more than `many` captions, few = fewer than `few`, medium = the rest (both boundaries included).
"""
from __future__ import annotations

import hashlib
import itertools
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from hnet import files
from hnet.config import Config
from hnet.data.shards import expand_urls, iter_shard_captions
from hnet.data.sources import built_shards
from hnet.eval.zeroshot import calibration
from hnet.report_probes import SEGMENTS

CHUNK = 20_000  # captions per regex pass
MATCHING = "v1: whole words, case-insensitive, name or simple plural, captions counted once"


def plural(word: str) -> str:
    """The simple English plural of a word: -es after s/x/z/ch/sh, -ies for a consonant + y, else -s."""
    low = word.lower()
    if low.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if low.endswith("y") and len(low) > 1 and low[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def class_pattern(classname: str) -> re.Pattern:
    """A caption line that names the class (or its plural: the last word's) as whole words, case-insensitive."""
    words = classname.replace("_", " ").split()
    if not words:
        raise ValueError(f"class name '{classname}' has no words to match")
    forms = [words, words[:-1] + [plural(words[-1])]]
    alternatives = "|".join(r"[^\S\n]+".join(map(re.escape, form)) for form in forms)  # never across captions
    return re.compile(rf"^[^\n]*?(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE | re.MULTILINE)


def count_mentions(captions: Iterable[str], classnames: list[str], chunk: int = CHUNK) -> list[int]:
    """How many of `captions` name each class (one compiled regex per class, run over chunks of captions joined by
    newlines, so the loop in Python is per chunk, not per caption; skipped on a chunk without the class's first
    word)."""
    patterns = [class_pattern(c) for c in classnames]
    first_words = [c.replace("_", " ").split()[0].lower() for c in classnames]  # a fast test before the regex
    counts = [0] * len(classnames)
    captions = iter(captions)
    while block := list(itertools.islice(captions, chunk)):
        text = "\n".join(c.replace("\n", " ").replace("\r", " ") for c in block)
        lowered = text.lower()
        for i, pattern in enumerate(patterns):
            if first_words[i] in lowered:
                counts[i] += len(pattern.findall(text))
    return counts


# ---- the training captions of a run ------------------------------------------------------------------------------

def training_shards(cfg: Config) -> tuple[list[str], str]:
    """(local shard files, "") the run's training captions are read from, or ([], why there are none)."""
    pattern, why = built_shards(cfg)
    if not pattern:
        return [], why
    try:
        urls = expand_urls(pattern)
    except ValueError as err:
        return [], str(err)
    remote = [u for u in urls if "://" in u or u.startswith("pipe:")]
    if remote:
        return [], f"data.shards: captions are read from local shards only, not {remote[0]}"
    return urls, ""


def training_captions(cfg: Config, urls: list[str]) -> Iterator[str]:
    """The captions the run trained on, streamed: the first data.samples_per_encoder samples when set, every caption
    of each sample (only its first with data.captions=first)."""
    samples = (caps for url in urls for caps in iter_shard_captions(url))
    samples = (caps for caps in samples if caps)
    if cfg.data.samples_per_encoder > 0:
        samples = itertools.islice(samples, cfg.data.samples_per_encoder)
    for caps in samples:
        yield from (caps[:1] if cfg.data.captions == "first" else caps)


def class_counts(cfg: Config, classnames: list[str]) -> tuple[list[int] | None, str]:
    """(training-caption count per class, where they came from), or (None, why not); cached per shards + classes."""
    urls, why = training_shards(cfg)
    if not urls:
        return None, why
    stamp = [f"{u}:{Path(u).stat().st_size}" for u in urls]
    key = "\n".join([MATCHING, *stamp, str(cfg.data.samples_per_encoder), cfg.data.captions, *classnames])
    path = cfg.cache_root / "eval" / f"longtail_{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.exists():
        saved = files.read_json(path)
        return saved["counts"], saved["source"]
    counts = count_mentions(training_captions(cfg, urls), classnames)
    source = f"{len(urls)} training shard(s) under {Path(urls[0]).parent}"
    files.write_json(path, {"counts": counts, "source": source, "classes": classnames})
    return counts, source


# ---- metrics ----------------------------------------------------------------------------------------------------

def segment_of(count: int, many: int, few: int) -> str:
    """ImageNet-LT's split by training count: many (> many), few (< few), medium (few..many, both included)."""
    return "many" if count > many else "few" if count < few else "medium"


def log_frequency_slope(per_class: list[float | None], counts: list[int]) -> float | None:
    """Least-squares slope of per-class accuracy (points) against log(1 + training count), over the classes with
    images; None when fewer than two distinct counts."""
    pairs = [(np.log1p(n), a) for a, n in zip(per_class, counts) if a is not None]
    x, y = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    if len(x) < 2 or np.ptp(x) == 0:
        return None
    return float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())


def segment_metrics(hits: np.ndarray, confidence: np.ndarray, labels: np.ndarray, classes: list[int]) -> dict:
    """Top-1 (%) over the images of `classes`, their mean per-class top-1, and their 15-bin ECE (%)."""
    inside = np.isin(labels, classes)
    present = [c for c in classes if (labels == c).any()]
    if not inside.any():
        return {"classes": len(classes), "images": 0, "top1": None, "mean_class_top1": None, "ece": None}
    ece, _ = calibration(torch.as_tensor(confidence[inside], dtype=torch.float32),
                         torch.as_tensor(hits[inside], dtype=torch.float32))
    per_class = [hits[labels == c].mean() * 100 for c in present]
    return {"classes": len(classes), "images": int(inside.sum()), "top1": float(hits[inside].mean() * 100),
            "mean_class_top1": float(np.mean(per_class)), "ece": ece * 100}


def pair_longtail(hits, confidence, labels, counts: list[int], many: int, few: int) -> dict:
    """One pair's long-tail view: per segment top-1 / mean class top-1 / ECE, per-class top-1, the log-frequency
    slope."""
    hits, confidence, labels = (np.asarray(a, dtype=np.float64) for a in (hits, confidence, labels))
    labels = labels.astype(np.int64)
    segment = [segment_of(n, many, few) for n in counts]
    out = {s: segment_metrics(hits, confidence, labels, [c for c, g in enumerate(segment) if g == s])
           for s in SEGMENTS}
    per_class = [float(hits[labels == c].mean() * 100) if (labels == c).any() else None for c in range(len(counts))]
    return out | {"per_class_top1": per_class, "log_frequency_slope": log_frequency_slope(per_class, counts)}


def boundaries(many: int, few: int) -> dict:
    return {"many": f"> {many}", "medium": f"{few}..{many}", "few": f"< {few}"}


def longtail_view(cfg: Config, classnames: list[str], per_image: dict[str, dict], labels) -> dict:
    """The long-tail section of one data set's results: {"omitted": why} when the run's training captions cannot be
    read, else the counts, the segment boundaries used and each pair's view. `per_image`: {pair: {"hits",
    "confidence"}} over the data set's images, `labels` their classes."""
    if not cfg.eval.longtail:
        return {"omitted": "eval.longtail=false"}
    counts, source = class_counts(cfg, classnames)
    if counts is None:
        return {"omitted": f"no training captions reachable from the run's config ({source})"}
    many, few = cfg.eval.longtail_many, cfg.eval.longtail_few
    labels = np.asarray(labels)
    segment = [segment_of(n, many, few) for n in counts]
    return {"source": source, "matching": MATCHING, "boundaries": boundaries(many, few), "many": many, "few": few,
            "counts": counts, "segment_classes": {s: segment.count(s) for s in SEGMENTS},
            "encoders": {pair: pair_longtail(m["hits"], m["confidence"], labels, counts, many, few)
                         for pair, m in per_image.items()}}
