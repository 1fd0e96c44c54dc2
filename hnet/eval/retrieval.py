"""Image <-> text retrieval R@1/5/10 through each pair's connector, with the standard (COCO / Flickr30k) protocol.

Sources (`eval.retrieval`):
  a shard pattern of a captioned set (every caption of each image, as make_shards writes them);
  a captions JSON with `eval.retrieval_images`: COCO's captions_*.json (images + annotations) or a Karpathy split
  (images[].sentences, filtered to `eval.retrieval_split`), several captions per image.
image->text is a hit at K when ANY of the image's captions is in the top K; text->image against its one image.
Ties are counted pessimistically: an item scoring the same as the right one is ranked before it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from hnet import files
from hnet.config import RECALL_KS, Config, ConfigError
from hnet.data.cache import CachedFeatures, Unit, keys_digest
from hnet.data.embed import build_cache
from hnet.data.sources import shard_units
from hnet.flops import FlopsLedger, retrieval_head_flops
from hnet.models.encoders import TextEncoder, specs_for, text_key
from hnet.models.identity import identity_digest, text_identity
from hnet.models.stitch import StitchModel, padded_pair, project

KS = RECALL_KS
CHUNK = 1000  # images per cache unit
ROWS = 1024  # queries scored at once (bounds the [rows, items] comparison)


def recall_at_k(similarity: torch.Tensor, ks=KS) -> dict:
    """similarity[i, j] between query i and item j, the right item of query i being j = i."""
    return recall_multi(similarity, torch.eye(*similarity.shape, dtype=torch.bool, device=similarity.device), ks)


def recall_multi(similarity: torch.Tensor, positive: torch.Tensor, ks=KS) -> dict:
    """R@K (%) of queries (rows) against items (columns), `positive[i, j]` marking the right items of query i: a
    hit when any right item is in the top K. rank = the wrong items scoring >= the best right one (pessimistic)."""
    ranks = []
    for start in range(0, len(similarity), ROWS):
        sim, pos = similarity[start:start + ROWS], positive[start:start + ROWS]
        best = sim.masked_fill(~pos, float("-inf")).max(dim=1, keepdim=True).values
        ranks.append(((sim >= best) & ~pos).sum(dim=1))
    rank = torch.cat(ranks)
    return {f"R@{k}": float((rank < k).float().mean()) * 100 for k in ks}


@torch.no_grad()
def retrieval_metrics(model: StitchModel, index: int, image: torch.Tensor, text: torch.Tensor,
                      text_image: torch.Tensor | None = None) -> dict:
    """Pair `index`: its image encoder's features `image`, its text encoder's captions `text` (true widths).
    `text_image[j]`: the image caption j describes (default: caption j <-> image j)."""
    padded, text, widths, text_widths = padded_pair(model, image, text)
    params = model.source(torch.tensor([index], device=model.widths.device))
    a, b = project(model.shape, params, widths, text_widths, padded, text)
    b = b[0] if b.dim() == 3 else b
    sim = a[0] @ b.T  # [images, texts]
    if text_image is None:
        text_image = torch.arange(sim.shape[1], device=sim.device)
    positive = text_image[None, :] == torch.arange(sim.shape[0], device=sim.device)[:, None]
    return {"image_to_text": recall_multi(sim, positive), "text_to_image": recall_multi(sim.T, positive.T),
            "n": int(sim.shape[0]), "n_texts": int(sim.shape[1])}


# ---- captions files --------------------------------------------------------------------------------------------

@dataclass
class Captions:
    images: list[Path]  # image files, in evaluation order
    texts: list[str]
    text_image: list[int]  # index into `images` of each caption


def read_captions(path: Path, images_dir: Path, split: str = "test", max_images: int = 0) -> Captions:
    """COCO captions_*.json or a Karpathy split JSON -> images with their captions."""
    try:
        data = files.read_json(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"eval.retrieval: cannot read captions file {path}: {err}") from None
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        pairs = _coco_pairs(data, images_dir)
    elif isinstance(data, dict) and data.get("images") and "sentences" in data["images"][0]:
        pairs = _karpathy_pairs(data, images_dir, split)
    else:
        raise ConfigError(f"eval.retrieval: {path} is neither a COCO captions file (images + annotations) nor a "
                          f"Karpathy split (images[].sentences)")
    pairs = [(file, caps) for file, caps in pairs if caps][:max_images or None]
    if not pairs:
        raise ConfigError(f"eval.retrieval: {path} has no captioned images (split '{split}')")
    missing = [str(f) for f, _ in pairs if not f.is_file()]
    if missing:
        raise ConfigError(f"eval.retrieval_images: {len(missing)} images of {path} not found, e.g. {missing[0]}")
    texts = [c for _, caps in pairs for c in caps]
    text_image = [i for i, (_, caps) in enumerate(pairs) for _ in caps]
    return Captions([f for f, _ in pairs], texts, text_image)


def _coco_pairs(data: dict, images_dir: Path) -> list[tuple[Path, list[str]]]:
    captions: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    return [(images_dir / im["file_name"], captions.get(im["id"], [])) for im in data["images"]]


def _karpathy_pairs(data: dict, images_dir: Path, split: str) -> list[tuple[Path, list[str]]]:
    images = data["images"]
    if any("split" in im for im in images):
        images = [im for im in images if im.get("split") == split]
    out = []
    for im in images:
        file = images_dir / im.get("filepath", "") / im["filename"]
        if not file.exists() and (images_dir / im["filename"]).exists():
            file = images_dir / im["filename"]  # images of every split in one folder
        out.append((file, [s["raw"].strip() for s in im["sentences"]]))
    return out


def _image_samples(files: list[Path], offset: int):
    for i, path in enumerate(files):
        yield {"key": f"{offset + i:07d}", "image": Image.open(path).convert("RGB"), "label": offset + i}


def caption_embeddings(text_encoder: str, texts: list[str], path: Path, accelerator=None) -> torch.Tensor:
    """[N, T] caption embeddings, computed by the main process and cached at `path`."""
    if (accelerator is None or accelerator.is_main_process) and not path.exists():
        emb = TextEncoder(text_encoder, accelerator.device if accelerator else torch.device("cpu")).encode(texts)
        files.write_safetensors(path, {"text": emb.float().cpu().contiguous()})
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return load_file(str(path))["text"]


# ---- evaluation ------------------------------------------------------------------------------------------------

def _digest(*parts: str) -> str:
    return keys_digest(list(parts))[:12]


def _captions_features(cfg: Config, specs, texts: list[str], accelerator):
    ev = cfg.eval
    caps = read_captions(Path(ev.retrieval), Path(ev.retrieval_images), ev.retrieval_split, ev.max_images)
    source = [str(Path(ev.retrieval).resolve()), str(Path(ev.retrieval_images).resolve()), ev.retrieval_split]
    root = cfg.cache_root / "eval" / f"retrieval_{_digest(*source, str(len(caps.images)))}"
    units = [Unit(f"chunk_{i // CHUNK:05d}", partial(_image_samples, caps.images[i:i + CHUNK], i))
             for i in range(0, len(caps.images), CHUNK)]
    stats = build_cache(root, units, specs, None, batch_size=ev.batch_size, num_workers=cfg.data.num_workers,
                        accelerator=accelerator, has_labels=True)
    path = lambda t: root / f"captions_{_digest(t, identity_digest(text_identity(t)), *caps.texts)}.safetensors"
    text = {t: caption_embeddings(t, caps.texts, path(t), accelerator) for t in texts}
    return root, stats, text, torch.tensor(caps.text_image)


def _shard_features(cfg: Config, specs, texts: list[str], accelerator):
    root = cfg.cache_root / "eval" / f"retrieval_{_digest(cfg.eval.retrieval)}"
    stats = build_cache(root, shard_units(cfg.eval.retrieval), specs, texts,
                        batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers, accelerator=accelerator)
    if accelerator is not None and not accelerator.is_main_process:
        return root, stats, None, None
    cache = CachedFeatures(root, [text_key(t) for t in texts])
    text = {t: torch.from_numpy(np.asarray(cache[text_key(t)], np.float32)) for t in texts}
    return root, stats, text, torch.from_numpy(np.repeat(np.arange(cache.count), cache.caption_counts()))


def retrieval_features(cfg: Config, specs, texts: list[str], accelerator=None):
    """cfg.eval.retrieval's images embedded by `specs` and captions by `texts` (cached; reused after the first
    call): (cache root, embedding stats, {text: [captions, T]} on the main process, caption -> image index)."""
    features = _captions_features if cfg.eval.retrieval.endswith(".json") else _shard_features
    return features(cfg, specs, texts, accelerator)


def evaluate_retrieval(cfg: Config, model: StitchModel, names: list[str], weights: dict[str, str],
                       accelerator=None, ledger: FlopsLedger | None = None) -> dict:
    """R@K of every pair (`names`: the model's pair names) on cfg.eval.retrieval. Every rank embeds its share of
    the images; the main process (or the only one) scores on the model's device and charges the ledger's eval
    phase."""
    images = model.image_names
    specs = specs_for(images, weights, cfg.image_weights)
    is_file = cfg.eval.retrieval.endswith(".json")
    root, stats, texts, text_image = retrieval_features(cfg, specs, model.text_names, accelerator)
    if accelerator is not None and not accelerator.is_main_process:
        return {}
    device = model.log_scale.device
    cache = CachedFeatures(root, images + (["labels"] if is_file else []))
    if is_file and not np.array_equal(np.asarray(cache["labels"]), np.arange(cache.count)):
        raise RuntimeError(f"{root}: cached images are not in the captions file's order")
    texts, text_image = {t: v.to(device) for t, v in texts.items()}, text_image.to(device)
    image_features = {n: torch.from_numpy(np.asarray(cache[n], np.float32)).to(device) for n in images}
    results = {}
    for p, label in enumerate(names):
        image, text = model.pair_names(p)
        results[label] = retrieval_metrics(model, p, image_features[image], texts[text], text_image)
    n_texts = len(next(iter(texts.values())))
    for r in results.values():
        r["dataset"] = Path(cfg.eval.retrieval).stem if is_file else "retrieval"
    if ledger is not None:
        _charge(ledger, model, images, len(names), root.name, cache.count, n_texts, stats["embedded"])
    return results


def _charge(ledger: FlopsLedger, model: StitchModel, images: list[str], pairs: int, key: str, n: int, n_texts: int,
            embedded: list[str]) -> None:
    """Image encoders' forwards over the images (once per run, `cached` when reused), and per pair the
    connector over the images plus the images x captions similarity. The captions' text-encoder pass is not
    counted here."""
    ledger.charge_embedding(key, images, n, embedded)
    ledger.charge("eval", f"heads/{key}", pairs * retrieval_head_flops(model.shape, n, n_texts), steps=1,
                  samples=n * pairs)

