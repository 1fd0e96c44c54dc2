"""Zero-shot classification of every (image encoder, text encoder) pair of a run, through its (generated or
trained) connector.

Class embeddings: for each class, every template is filled in, embedded by the pair's text encoder, normalised,
averaged, and normalised again (prompt ensembling); computed once per (text encoder, dataset, templates) and
cached. Evaluation images are embedded once per encoder into an embedding cache like the training data.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hnet import files
from hnet.config import Config
from hnet.data.cache import CachedFeatures
from hnet.data.embed import build_cache
from hnet.data.zeroshot import ZeroShotSet, load_zeroshot, templates_for
from hnet.distributed import default_accelerator
from hnet.flops import FlopsLedger, forward_flops, zeroshot_head_flops
from hnet.models.encoders import TextEncoder, specs_for
from hnet.models.identity import identity_digest, text_identity
from hnet.models.losses import contrastive_logits
from hnet.models.moe import eval_routing
from hnet.models.stitch import StitchModel, padded_pair, project

ECE_BINS = 15


def class_embeddings(text_encoder: str, classnames: list[str], templates: tuple[str, ...],
                     cache_dir: Path, accelerator=None) -> torch.Tensor:
    """[C, T] prompt-ensembled, L2-normalised class embeddings on the accelerator's device; cached on disk
    (computed and written by the main process, read by the others)."""
    identity = identity_digest(text_identity(text_encoder))  # the model's files, not only its name
    digest = hashlib.sha256("\n".join([identity, text_encoder, *classnames, *templates]).encode()).hexdigest()[:16]
    path = cache_dir / f"classifier_{digest}.safetensors"
    device = accelerator.device if accelerator else torch.device("cpu")
    if (accelerator is None or accelerator.is_main_process) and not path.exists():
        encoder = TextEncoder(text_encoder, device)
        prompts = [t.format(c=c) for c in classnames for t in templates]
        emb = encoder.encode(prompts).view(len(classnames), len(templates), -1)
        weight = F.normalize(F.normalize(emb, dim=-1).mean(dim=1), dim=-1)
        files.write_safetensors(path, {"weight": weight.cpu().contiguous()})
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return load_file(str(path))["weight"].to(device)


def hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1/0 per image: its top-scoring class is its label (the one zero-shot scorer: runs, probes, benchmarks)."""
    return (logits.argmax(dim=-1) == labels).float()


def zero_shot_top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (%) of [M, C] logits."""
    return float(hits(logits, labels).mean()) * 100


def calibration(conf: torch.Tensor, correct: torch.Tensor) -> tuple[float, list[dict]]:
    """(ECE as a fraction, reliability bins) of per-image confidences and 1/0 hits: ECE_BINS equal-width
    confidence bins, each weighted by its share of the images."""
    bins = torch.clamp((conf * ECE_BINS).long(), max=ECE_BINS - 1)
    ece, reliability = 0.0, []
    for b in range(ECE_BINS):
        inside = bins == b
        if inside.any():
            gap = (correct[inside].mean() - conf[inside].mean()).abs()
            ece += float(inside.float().mean() * gap)
            reliability.append({"bin": b, "count": int(inside.sum()), "accuracy": float(correct[inside].mean()),
                                "confidence": float(conf[inside].mean())})
    return ece, reliability


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, n_classes: int) -> dict:
    """top-1/top-5 (%), NLL, 15-bin ECE, per-class accuracy, and the reliability-diagram bins."""
    probs = logits.softmax(dim=-1)
    conf = probs.max(dim=-1).values
    correct = hits(logits, labels)
    k = min(5, n_classes)
    top5 = (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1).float()
    ece, reliability = calibration(conf, correct)
    per_class = [float(correct[labels == c].mean()) * 100 if (labels == c).any() else None for c in range(n_classes)]
    present = [p for p in per_class if p is not None]  # clip_benchmark: balanced accuracy over the labels present
    return {"top1": float(correct.mean()) * 100, "top5": float(top5.mean()) * 100,
            "mean_per_class_recall": sum(present) / len(present),
            "nll": float(F.cross_entropy(logits, labels)), "ece": ece * 100, "n": int(len(labels)),
            "per_class_top1": per_class, "reliability": reliability}


@torch.no_grad()
def zero_shot_logits(model: StitchModel, index: int, features: torch.Tensor, classifier: torch.Tensor,
                     params=None, aux: dict | None = None) -> torch.Tensor:
    """Scaled logits [M, C] through pair `index`'s connector, or through given connector `params` (one pair:
    auto-decoding, fine-tuning) for features and class embeddings of any widths (`aux`: see stitch.project)."""
    index = torch.tensor([index], device=model.widths.device)
    if params is None:
        params = model.source(index)
    image, text, widths, text_widths = padded_pair(model, features, classifier)
    a, b = project(model.shape, params, widths, text_widths, image, text, aux)
    return contrastive_logits(a, b, model.logit_scale(index))[0]  # APE: each connector's own scale


def eval_cache(cfg: Config, dataset: ZeroShotSet, names: list[str], weights: dict[str, str],
               accelerator=None) -> tuple[CachedFeatures, list[str]]:
    """The dataset's features for `names` (embedded once, split across ranks, then reused); also which encoders
    this call embedded."""
    root = cfg.cache_root / "eval" / dataset.key
    specs = specs_for(names, weights, cfg.image_weights)
    stats = build_cache(root, dataset.units, specs, None, batch_size=cfg.eval.batch_size,
                        num_workers=cfg.data.num_workers, accelerator=accelerator, has_labels=True)
    return CachedFeatures(root, names + ["labels"]), stats["embedded"]


class ZeroShotProbe:
    """One zero-shot dataset, embedded for a set of image encoders, with class embeddings from each text encoder
    (default cfg.texts), ready to score connectors quickly (also mid-run). Build it on every rank (the embedding
    pass is split across them); features, labels and class embeddings live on the accelerator's device."""

    def __init__(self, cfg: Config, dataset_name: str, names: list[str], weights: dict[str, str], accelerator=None,
                 texts: list[str] | None = None):
        accelerator = accelerator or default_accelerator(cfg)
        self.device = accelerator.device
        with accelerator.main_process_first():  # the demo set writes its images on first use
            self.dataset = load_zeroshot(dataset_name, cfg)
        cache, embedded = eval_cache(cfg, self.dataset, names, weights, accelerator)
        self.cached = {n: n not in embedded for n in names}
        self.labels = torch.from_numpy(np.array(cache["labels"])).to(self.device)
        self.features = {n: torch.from_numpy(np.asarray(cache[n], np.float32)).to(self.device) for n in names}
        self.templates_name, templates = templates_for(cfg, self.dataset)
        self.n_templates = len(templates)
        self.classifiers = {t: class_embeddings(t, self.dataset.classnames, templates, cfg.cache_root / "eval",
                                                accelerator) for t in (texts or cfg.texts)}

    @property
    def key(self) -> str:
        return self.dataset.key

    def metrics(self, model: StitchModel, index: int, per_image: bool = False) -> dict:
        """Pair `index` of the model (`per_image`: also its hits, 1/0 per image, under "hits", and its softmax
        confidence, under "confidence")."""
        image, text = model.pair_names(index)
        aux: dict = {}
        logits = zero_shot_logits(model, index, self.features[image], self.classifiers[text], aux=aux)
        out = classification_metrics(logits, self.labels, len(self.dataset.classnames))
        if "router_logits" in aux:  # moe: load, entropy, dead experts, and routing by class
            out["routing"] = eval_routing(aux["router_logits"][0], self.labels, model.shape.top_k,
                                          len(self.dataset.classnames))
        if not per_image:
            return out
        return out | {"hits": hits(logits, self.labels).to(torch.uint8).cpu().numpy(),
                      "confidence": logits.softmax(dim=-1).max(dim=-1).values.cpu().numpy()}

    @torch.no_grad()
    def pair_hits(self, model: StitchModel, pairs) -> np.ndarray:
        """Per-image hits [pairs, images] of the model's pairs `pairs`, their connectors generated in one call."""
        params = model.source(torch.as_tensor(pairs, device=model.widths.device))
        rows = []
        for slot, p in enumerate(pairs):
            image, text = model.pair_names(int(p))
            one = [(w[slot:slot + 1], b[slot:slot + 1]) for w, b in params]
            logits = zero_shot_logits(model, int(p), self.features[image], self.classifiers[text], params=one)
            rows.append(hits(logits, self.labels).cpu().numpy())
        return np.stack(rows)

    def top1(self, model: StitchModel, pairs) -> list[float]:
        """Top-1 (%) of the model's pairs `pairs` on all images."""
        return [float(h.mean() * 100) for h in self.pair_hits(model, pairs)]

    def encoder_flops(self, name: str) -> float:
        return forward_flops(name, len(self.labels))

    @property
    def embed_flops(self) -> float:
        """Encoder forwards over the images for every encoder of the probe, computed now or found cached: a run's
        evaluation costs the same whichever run filled the cache first."""
        return sum(self.encoder_flops(n) for n in self.features)

    def charge_embedding(self, ledger: FlopsLedger) -> None:
        """Charge each encoder's forwards over the images once per run (`cached`: reused, not computed now)."""
        ledger.charge_embedding(self.key, self.features, len(self.labels),
                                [n for n in self.features if not self.cached[n]])

    def flops(self, model: StitchModel) -> float:
        """Connector + logits of one pair over the dataset."""
        return len(self.labels) * zeroshot_head_flops(model.shape, len(self.dataset.classnames))

    def charge_heads(self, ledger: FlopsLedger, model: StitchModel, key: str, encoders: int = 1) -> None:
        """One scoring call of `encoders` connectors (pairs) over the dataset."""
        ledger.charge("eval", key, encoders * self.flops(model), steps=1, samples=encoders * len(self.labels))


