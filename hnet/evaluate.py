"""Zero-shot classification of every encoder in a run, through its (generated or trained) connector.

Class embeddings: for each class, every template is filled in, embedded by the run's text encoder, normalised,
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

from hnet import io
from hnet.cache import CachedFeatures, build_cache
from hnet.config import Config
from hnet.data.zeroshot import TEMPLATES, ZeroShotSet, load_zeroshot
from hnet.flops import FlopsLedger, connector_macs, encoder_flops
from hnet.losses import contrastive_logits
from hnet.model import StitchModel, load_model, project
from hnet.report import plot_reliability
from hnet.retrieval import evaluate_retrieval
from hnet.zoo import TextEncoder, specs_for

ECE_BINS = 15


def class_embeddings(text_encoder: str, classnames: list[str], templates: tuple[str, ...],
                     cache_dir: Path) -> torch.Tensor:
    """[C, T] prompt-ensembled, L2-normalised class embeddings; cached on disk."""
    digest = hashlib.sha256("\n".join([text_encoder, *classnames, *templates]).encode()).hexdigest()[:16]
    path = cache_dir / f"classifier_{digest}.safetensors"
    if path.exists():
        return load_file(str(path))["weight"]
    encoder = TextEncoder(text_encoder)
    prompts = [t.format(c=c) for c in classnames for t in templates]
    emb = encoder.encode(prompts).view(len(classnames), len(templates), -1)
    weight = F.normalize(F.normalize(emb, dim=-1).mean(dim=1), dim=-1)
    io.write_safetensors(path, {"weight": weight.contiguous()})
    return weight


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, n_classes: int) -> dict:
    """top-1/top-5 (%), NLL, 15-bin ECE, per-class accuracy, and the reliability-diagram bins."""
    probs = logits.softmax(dim=-1)
    conf, pred = probs.max(dim=-1)
    correct = (pred == labels).float()
    k = min(5, n_classes)
    top5 = (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1).float()
    bins = torch.clamp((conf * ECE_BINS).long(), max=ECE_BINS - 1)
    ece, reliability = 0.0, []
    for b in range(ECE_BINS):
        inside = bins == b
        if inside.any():
            gap = (correct[inside].mean() - conf[inside].mean()).abs()
            ece += float(inside.float().mean() * gap)
            reliability.append({"bin": b, "count": int(inside.sum()), "accuracy": float(correct[inside].mean()),
                                "confidence": float(conf[inside].mean())})
    per_class = [float(correct[labels == c].mean()) * 100 if (labels == c).any() else None for c in range(n_classes)]
    return {"top1": float(correct.mean()) * 100, "top5": float(top5.mean()) * 100,
            "nll": float(F.cross_entropy(logits, labels)), "ece": ece * 100, "n": int(len(labels)),
            "per_class_top1": per_class, "reliability": reliability}


@torch.no_grad()
def zero_shot_logits(model: StitchModel, index: int, features: torch.Tensor, classifier: torch.Tensor,
                     params=None) -> torch.Tensor:
    """Scaled logits [M, C] through encoder `index`'s connector, or through given connector `params`
    (auto-decoding, fine-tuning) for features of any width."""
    width = features.shape[1]
    if params is None:
        params = model.source(torch.tensor([index], device=model.widths.device))
    image = F.pad(features.float(), (0, model.shape.image_width - width)).unsqueeze(0)
    a, b = project(model.shape, params, torch.tensor([width]), image, classifier)
    return contrastive_logits(a, b, model.logit_scale())[0]


def eval_cache(cfg: Config, dataset: ZeroShotSet, names: list[str],
               weights: dict[str, str]) -> tuple[CachedFeatures, list[str]]:
    """The dataset's features for `names` (embedded once, then reused); also which encoders this call embedded."""
    root = cfg.cache_path / "eval" / f"{dataset.name}_{dataset.size}"
    specs = specs_for(names, weights, cfg.image_weights)
    stats = build_cache(root, dataset.units, specs, None, batch_size=cfg.eval.batch_size,
                        num_workers=cfg.data.num_workers, has_labels=True)
    return CachedFeatures(root, names + ["labels"]), stats["embedded"]


class ZeroShotProbe:
    """One zero-shot dataset, embedded for a set of encoders, ready to score connectors quickly (also mid-run)."""

    def __init__(self, cfg: Config, dataset_name: str, names: list[str], weights: dict[str, str]):
        self.dataset = load_zeroshot(dataset_name, cfg)
        cache, self.embedded = eval_cache(cfg, self.dataset, names, weights)
        self.labels = torch.from_numpy(np.asarray(cache["labels"]))
        self.features = {n: torch.from_numpy(np.asarray(cache[n], np.float32)) for n in names}
        self.classifier = class_embeddings(cfg.text_encoder, self.dataset.classnames, TEMPLATES[cfg.eval.templates],
                                           cfg.cache_path / "eval")

    def metrics(self, model: StitchModel, index: int, name: str) -> dict:
        logits = zero_shot_logits(model, index, self.features[name], self.classifier)
        return classification_metrics(logits, self.labels, len(self.dataset.classnames))

    def top1_of_params(self, model: StitchModel, params, name: str) -> float:
        logits = zero_shot_logits(model, -1, self.features[name], self.classifier, params=params)
        return float((logits.argmax(dim=-1) == self.labels).float().mean()) * 100

    @property
    def embed_flops(self) -> float:
        """Encoder forwards this probe ran to embed the images (features already cached cost nothing again)."""
        return sum(len(self.labels) * encoder_flops(n)["gflops"] * 1e9 for n in self.embedded)

    def flops(self, model: StitchModel) -> float:
        """Connector + logits of one encoder over the dataset."""
        return len(self.labels) * _head_flops(model, self.classifier)


def evaluate_run(cfg: Config, run_dir: Path, datasets: list[str]) -> dict:
    model, names = load_model(run_dir)
    weights = io.read_json(run_dir / "model.json").get("weights", {})
    ledger = FlopsLedger(run_dir)
    results: dict = {"templates": cfg.eval.templates, "text_encoder": cfg.text_encoder, "datasets": {}}
    eval_flops = 0.0
    for name in datasets:
        probe = ZeroShotProbe(cfg, name, names, weights)
        per_encoder = {enc: probe.metrics(model, i, enc) for i, enc in enumerate(names)}
        eval_flops += probe.embed_flops + len(names) * probe.flops(model)
        classes = probe.dataset.classnames
        results["datasets"][name] = {"classes": classes, "encoders": per_encoder, "chance_top1": 100.0 / len(classes)}
        results["datasets"][name]["reliability_png"] = str(plot_reliability(results["datasets"][name], name,
                                                                            run_dir / f"reliability_{name}.png"))
    if cfg.eval.retrieval:
        results["retrieval"] = evaluate_retrieval(cfg, model, names, weights)
    ledger.add("eval", eval_flops, samples=sum(r["encoders"][names[0]]["n"] * len(names)
                                               for r in results["datasets"].values()))
    ledger.save()
    io.write_json(run_dir / "eval.json", results)
    io.write_text(run_dir / "eval.md", markdown_table(results))
    return results


def _head_flops(model: StitchModel, classifier: torch.Tensor) -> float:
    """Per-image FLOPs of connector + class logits (the class side is amortised and left out)."""
    macs = connector_macs(model.shape.layers, 1, 1)["forward"] + classifier.numel()
    return 2.0 * macs


def markdown_table(results: dict) -> str:
    lines = []
    for enc, r in results.get("retrieval", {}).items():
        i2t, t2i = r["image_to_text"], r["text_to_image"]
        lines.append(f"retrieval {enc} (n={r['n']}): image->text " + " ".join(f"{k} {v:.1f}" for k, v in i2t.items())
                     + " | text->image " + " ".join(f"{k} {v:.1f}" for k, v in t2i.items()))
    for name, r in results["datasets"].items():
        lines += [f"### {name} (zero-shot, templates: {results['templates']}, chance {r['chance_top1']:.1f}%)", "",
                  "| encoder | top-1 | top-5 | NLL | ECE |", "|---|---:|---:|---:|---:|"]
        for enc, m in r["encoders"].items():
            lines.append(f"| {enc} | {m['top1']:.1f} | {m['top5']:.1f} | {m['nll']:.3f} | {m['ece']:.1f} |")
        lines.append("")
    return "\n".join(lines)
