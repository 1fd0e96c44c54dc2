"""CC-595k layout -> webdataset tar shards (.jpg, .txt, .json), and the shard reader.

The writer is resumable shard by shard and atomic (temp file + rename); bad images are skipped, counted and named
in `manifest.json`. The reader expands brace patterns, splits shards by node and DataLoader worker, and skips bad
samples with a warning that names the shard and key.
"""
from __future__ import annotations

import io as pyio
import json
import re
import tarfile
import warnings
from pathlib import Path
from typing import Iterator

import braceexpand
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from hnet import files
from hnet.files import MANIFEST

LAYOUT = 2  # 2: one sample per image with every caption (1: one sample per metadata row)


class DataError(ValueError):
    """Bad data input (missing file, no shards matched); the message names the path."""


# ---------------------------------------------------------------- 595k metadata

def _caption_from_chat(record: dict) -> str:
    for turn in record.get("conversations", []):
        if turn.get("from") == "gpt":
            return str(turn.get("value", ""))
    return ""


def load_metadata(path: str | Path) -> list[dict]:
    """Read `metadata.json` (list of {id, image, caption | captions}) or `chat.json` (LLaVA conversations) into one
    record per image with every caption of it (`captions`): records naming the same image, as in a one-row-per-pair
    file like `metadata_all_captions.json`, are grouped (id: the image's path without extension), in order of first
    appearance."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--metadata: file not found: {path}")
    try:
        records = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"--metadata {path}: not valid JSON ({err})") from None
    if not isinstance(records, list):
        raise DataError(f"--metadata {path}: expected a list of records")
    by_image: dict[str, dict] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "image" not in rec:
            raise DataError(f"--metadata {path}: record {i} has no 'image' field")
        captions = _captions(rec, f"--metadata {path}: record {i}")
        image = str(rec["image"])
        if image in by_image:
            grouped = by_image[image]
            grouped["captions"] += captions
            grouped["id"] = str(Path(image).with_suffix(""))  # sample_key makes a key of it
            continue
        meta = {k: v for k, v in rec.items() if k not in ("conversations", "captions")}
        by_image[image] = {"id": str(rec.get("id", Path(image).stem)), "image": image, "captions": captions,
                           "meta": meta}
    out = list(by_image.values())
    for rec in out:
        rec["caption"] = rec["captions"][0] if rec["captions"] else ""
        rec["meta"]["captions"] = rec["captions"]
    return out


def _captions(rec: dict, where: str) -> list[str]:
    """A record's non-empty captions: `captions` (a list), `caption`, or the first gpt turn of a conversation."""
    if "captions" in rec:
        if not isinstance(rec["captions"], list) or not all(isinstance(c, str) for c in rec["captions"]):
            raise DataError(f"{where}: 'captions' must be a list of strings")
        captions = rec["captions"]
    else:
        captions = [str(rec["caption"]) if "caption" in rec else _caption_from_chat(rec)]
    return [c for c in captions if c.strip()]


def sample_key(record_id: str) -> str:
    """webdataset splits key and extension at the first dot, so keys must not contain one."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", record_id)


def _read_image_bytes(path: Path) -> tuple[bytes | None, str]:
    """Bytes of a decodable image, or (None, reason)."""
    if not path.is_file():
        return None, "missing"
    data = path.read_bytes()
    try:
        with Image.open(pyio.BytesIO(data)) as img:
            img.convert("RGB").load()
    except Exception as err:  # PIL raises many types for corrupt files
        return None, f"unreadable ({type(err).__name__})"
    return data, ""


def _jpeg_bytes(data: bytes) -> bytes:
    """Keep JPEG bytes as they are; re-encode anything else so every shard member is a real .jpg."""
    if data[:3] == b"\xff\xd8\xff":
        return data
    buf = pyio.BytesIO()
    Image.open(pyio.BytesIO(data)).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_shards(metadata: str | Path, images: str | Path, out: str | Path, shard_size: int = 1000) -> dict:
    """Convert a 595k-layout folder into tar shards; returns the manifest. Resumes after the last finished shard."""
    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise DataError(f"--images: folder not found: {images}")
    if shard_size <= 0:
        raise DataError(f"--shard-size: must be > 0, got {shard_size}")
    records = load_metadata(metadata)
    out.mkdir(parents=True, exist_ok=True)
    files.remove_stale_temps(out)
    manifest_path = out / MANIFEST
    manifest = files.read_json(manifest_path) if manifest_path.exists() else None
    if not manifest or manifest.get("shard_size") != shard_size or manifest.get("source") != str(metadata) \
            or manifest.get("layout") != LAYOUT:
        manifest = {"source": str(metadata), "shard_size": shard_size, "layout": LAYOUT, "shards": [], "skipped": [],
                    "complete": False}
    chunks = [records[i:i + shard_size] for i in range(0, len(records), shard_size)]
    dropped = {s["id"] for s in manifest["skipped"] if s["reason"] != "duplicate key"}
    seen = {sample_key(r["id"]) for chunk in chunks[:len(manifest["shards"])] for r in chunk
            if r["id"] not in dropped}
    for index in tqdm(range(len(manifest["shards"]), len(chunks)), desc="shards", unit="shard"):
        manifest = _write_one_shard(chunks[index], index, images, out, seen, manifest)
        files.write_json(manifest_path, manifest)
    manifest["complete"] = True
    manifest["total"] = sum(s["count"] for s in manifest["shards"])
    manifest["total_captions"] = sum(s.get("captions", s["count"]) for s in manifest["shards"])
    manifest["pattern"] = shard_pattern(out, len(manifest["shards"]))
    files.write_json(manifest_path, manifest)
    if manifest["skipped"]:
        warnings.warn(f"make_shards: skipped {len(manifest['skipped'])} samples (see {manifest_path})")
    return manifest


def _write_one_shard(chunk: list[dict], index: int, images: Path, out: Path, seen: set, manifest: dict) -> dict:
    name = f"{index:06d}.tar"
    keys: list[str] = []
    captions = 0
    with files.atomic_path(out / name) as tmp:
        with wds.TarWriter(str(tmp), mtime=0) as sink:  # reproducible bytes
            for rec in chunk:
                key = sample_key(rec["id"])
                data, reason = _read_image_bytes(images / rec["image"])
                if key in seen:
                    data, reason = None, "duplicate key"
                elif not rec["caption"].strip():
                    data, reason = None, "empty caption"
                if data is None:
                    manifest["skipped"].append({"id": rec["id"], "image": rec["image"], "reason": reason})
                    warnings.warn(f"make_shards: skipping {rec['id']} ({images / rec['image']}): {reason}")
                    continue
                seen.add(key)
                keys.append(key)
                captions += len(rec["captions"])
                # `txt`: the first caption (for other webdataset readers); `json` carries all of them
                sink.write({"__key__": key, "jpg": _jpeg_bytes(data), "txt": rec["caption"],
                            "json": json.dumps(rec["meta"]).encode()})
    manifest["shards"].append({"name": name, "count": len(keys), "captions": captions})
    return manifest


def shard_pattern(folder: str | Path, n: int) -> str:
    return str(Path(folder) / (f"{{000000..{n - 1:06d}}}.tar" if n > 1 else "000000.tar"))


# ---------------------------------------------------------------- reading

def expand_urls(pattern: str) -> list[str]:
    """Brace pattern (or comma/space separated list) -> shard paths; refuses a pattern that matches nothing."""
    urls = [u for part in pattern.replace(",", " ").split() for u in braceexpand.braceexpand(part)]
    missing = [u for u in urls if "://" not in u and not Path(u).exists()]
    if not urls or len(missing) == len(urls):
        raise DataError(f"data.shards: pattern '{pattern}' matches no shard files")
    if missing:
        warnings.warn(f"data.shards: {len(missing)} shard files missing, e.g. {missing[0]}")
    return [u for u in urls if u not in missing]


class SkipCounter:
    """A webdataset handler that warns with the shard name and counts instead of raising."""

    def __init__(self):
        self.errors: list[str] = []

    def __call__(self, exn: Exception) -> bool:
        self.errors.append(repr(exn))
        warnings.warn(f"shard reader: skipped after error: {exn!r}")
        return True


def decode_sample(sample: dict) -> dict | None:
    """Raw webdataset sample -> {key, image (PIL RGB), caption, captions, url}: `captions` every caption of the image
    (the `json` member's list, written by make_shards; else the one `txt`), `caption` the first; None when the
    image or every caption is bad."""
    key, url = sample.get("__key__"), sample.get("__url__")
    try:
        image = Image.open(pyio.BytesIO(sample["jpg"])).convert("RGB")
        captions = _sample_captions(sample)
    except Exception as err:
        warnings.warn(f"shard reader: bad sample {key} in {url}: {type(err).__name__}: {err}")
        return None
    if not captions:
        warnings.warn(f"shard reader: empty caption for {key} in {url}")
        return None
    return {"key": key, "image": image, "caption": captions[0], "captions": captions, "url": url}


def _sample_captions(sample: dict) -> list[str]:
    listed = json.loads(sample["json"]).get("captions") if "json" in sample else None
    if isinstance(listed, list) and listed:
        return [str(c).strip() for c in listed if str(c).strip()]
    caption = sample["txt"].decode("utf-8").strip()
    return [caption] if caption else []


def iter_shard(url: str, report_bad: bool = False) -> Iterator[dict]:
    """Decoded samples of one shard, in file order, bad ones skipped with a warning (or, with `report_bad`,
    yielded as {"key", "bad": url} so the caller can count them); a truncated tar ends the shard early."""
    handler = SkipCounter()
    stream = wds.WebDataset([url], handler=handler, shardshuffle=False, empty_check=False,
                            nodesplitter=None, workersplitter=None)
    for sample in stream:
        decoded = decode_sample(sample)
        if decoded is not None:
            yield decoded
        elif report_bad:
            yield {"key": sample.get("__key__"), "bad": url}
    if report_bad and handler.errors:
        yield {"key": None, "bad": f"{url}: {handler.errors[-1]}"}


def make_reader(pattern: str, resampled: bool = False, seed: int = 0) -> wds.WebDataset:
    """Training-style reader: shards split by node and by worker, optional resampling, bad samples skipped."""
    urls = expand_urls(pattern)
    dataset = wds.WebDataset(urls, resampled=resampled, handler=SkipCounter(), shardshuffle=False,
                             nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
                             empty_check=False, seed=seed)
    return dataset.map(decode_sample).select(lambda s: s is not None)


def iter_shard_captions(url: str) -> Iterator[list[str]]:
    """Every sample's captions of one local shard, in file order, from its `json`/`txt` members only (the image
    payloads are skipped, never read or decoded): the `json` member's list when it has one, else the `txt`."""
    key, members = None, {}
    with tarfile.open(url) as tar:
        for member in tar:
            stem, _, ext = member.name.partition(".")
            if stem != key:
                if key is not None:
                    yield _member_captions(members)
                key, members = stem, {}
            if ext in ("json", "txt") and member.isfile():
                members[ext] = tar.extractfile(member).read()
    if key is not None:
        yield _member_captions(members)


def _member_captions(members: dict[str, bytes]) -> list[str]:
    try:
        return _sample_captions(members)
    except (KeyError, ValueError, UnicodeDecodeError):  # no text member, or a bad one: a sample without captions
        return []
