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

from hnet import io
from hnet.cache import CachedFeatures
from hnet.embed_pass import build_cache
from hnet.config import Config
from hnet.data.zeroshot import ZeroShotSet, load_zeroshot, templates_for
from hnet.flops import FlopsLedger, connector_macs, forward_flops
from hnet.losses import contrastive_logits
from hnet.model import StitchModel, load_model, padded_pair, project
from hnet.report import plot_reliability
from hnet.retrieval import KS, evaluate_retrieval
from hnet.zoo import TextEncoder, specs_for

ECE_BINS = 15


def default_accelerator(cfg: Config):
    """The trainer's accelerator (GPU when there is one). Imported here, not at the top: hnet.train imports
    this module for ZeroShotProbe."""
    from hnet.train import make_accelerator

    return make_accelerator(cfg)


def class_embeddings(text_encoder: str, classnames: list[str], templates: tuple[str, ...],
                     cache_dir: Path, accelerator=None) -> torch.Tensor:
    """[C, T] prompt-ensembled, L2-normalised class embeddings on the accelerator's device; cached on disk
    (computed and written by the main process, read by the others)."""
    digest = hashlib.sha256("\n".join([text_encoder, *classnames, *templates]).encode()).hexdigest()[:16]
    path = cache_dir / f"classifier_{digest}.safetensors"
    device = accelerator.device if accelerator else torch.device("cpu")
    if (accelerator is None or accelerator.is_main_process) and not path.exists():
        encoder = TextEncoder(text_encoder, device)
        prompts = [t.format(c=c) for c in classnames for t in templates]
        emb = encoder.encode(prompts).view(len(classnames), len(templates), -1)
        weight = F.normalize(F.normalize(emb, dim=-1).mean(dim=1), dim=-1)
        io.write_safetensors(path, {"weight": weight.cpu().contiguous()})
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return load_file(str(path))["weight"].to(device)


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
    present = [p for p in per_class if p is not None]  # clip_benchmark: balanced accuracy over the labels present
    return {"top1": float(correct.mean()) * 100, "top5": float(top5.mean()) * 100,
            "mean_per_class_recall": sum(present) / len(present),
            "nll": float(F.cross_entropy(logits, labels)), "ece": ece * 100, "n": int(len(labels)),
            "per_class_top1": per_class, "reliability": reliability}


@torch.no_grad()
def zero_shot_logits(model: StitchModel, index: int, features: torch.Tensor, classifier: torch.Tensor,
                     params=None) -> torch.Tensor:
    """Scaled logits [M, C] through pair `index`'s connector, or through given connector `params` (one pair:
    auto-decoding, fine-tuning) for features and class embeddings of any widths."""
    index = torch.tensor([index], device=model.widths.device)
    if params is None:
        params = model.source(index)
    image, text, widths, text_widths = padded_pair(model, features, classifier)
    a, b = project(model.shape, params, widths, text_widths, image, text)
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

    def metrics(self, model: StitchModel, index: int) -> dict:
        """Pair `index` of the model."""
        image, text = model.pair_names(index)
        logits = zero_shot_logits(model, index, self.features[image], self.classifiers[text])
        return classification_metrics(logits, self.labels, len(self.dataset.classnames))

    def top1_of_params(self, model: StitchModel, params, image: str, text: str) -> float:
        """Top-1 of one pair's connector `params` (not a pair of the model: auto-decoding, fine-tuning)."""
        logits = zero_shot_logits(model, -1, self.features[image], self.classifiers[text], params=params)
        return float((logits.argmax(dim=-1) == self.labels).float().mean()) * 100

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
        return len(self.labels) * _head_flops(model, len(self.dataset.classnames))

    def charge_heads(self, ledger: FlopsLedger, model: StitchModel, key: str, encoders: int = 1) -> None:
        """One scoring call of `encoders` connectors (pairs) over the dataset."""
        ledger.charge("eval", key, encoders * self.flops(model), steps=1, samples=encoders * len(self.labels))


def model_device(model: StitchModel) -> str:
    return str(next(model.parameters()).device)


def evaluate_run(cfg: Config, run_dir: Path, datasets: list[str], accelerator=None) -> dict:
    """Zero-shot (and retrieval) metrics of every pair of a run on the accelerator's device. Every rank
    takes part in embedding; the main process scores and writes eval.json, eval.md, eval.csv, eval/<dataset>.json,
    plots and the ledger. `datasets`: names or NAME=PATH specs (hnet.data.zeroshot)."""
    accelerator = accelerator or default_accelerator(cfg)
    run_dir = Path(run_dir)
    model, names = load_model(run_dir)
    model = model.to(accelerator.device)
    weights = io.read_json(run_dir / "model.json").get("weights", {})
    main = accelerator.is_main_process
    ledger = FlopsLedger(run_dir)
    results: dict = {"templates": cfg.eval.templates, "text_encoder": ", ".join(model.text_names),
                     "text_encoders": model.text_names, "datasets": {}, "device": model_device(model),
                     "pairs": {label: list(model.pair_names(p)) for p, label in enumerate(names)}}
    for spec in datasets:
        probe = ZeroShotProbe(cfg, spec, model.image_names, weights, accelerator, model.text_names)
        if main:
            results["datasets"][probe.dataset.name] = _score(probe, model, names, run_dir, ledger)
        del probe
    if cfg.eval.retrieval:
        results["retrieval"] = evaluate_retrieval(cfg, model, names, weights, accelerator, ledger)
    if main:
        ledger.save()
        io.write_json(run_dir / "eval.json", results)
        write_reports(run_dir, results)
    accelerator.wait_for_everyone()
    return results if main else io.read_json(run_dir / "eval.json")


def _score(probe: ZeroShotProbe, model: StitchModel, names: list[str], run_dir: Path, ledger: FlopsLedger) -> dict:
    if probe.labels.device != next(model.parameters()).device:
        raise RuntimeError(f"evaluation features on {probe.labels.device}, model on {model_device(model)}")
    dataset = probe.dataset
    name, classes = dataset.name, dataset.classnames
    per_encoder = {label: probe.metrics(model, p) for p, label in enumerate(names)}
    probe.charge_embedding(ledger)
    probe.charge_heads(ledger, model, f"heads/{probe.key}", len(names))
    out = {"classes": classes, "encoders": per_encoder, "chance_top1": 100.0 / len(classes),
           "layout": dataset.layout, "path": dataset.root, "key": probe.key, "n": len(probe.labels),
           "templates": probe.templates_name, "n_templates": probe.n_templates,
           "features_device": str(probe.labels.device), "cached": probe.cached}
    out["reliability_png"] = str(plot_reliability(out, name, run_dir / f"reliability_{name}.png"))
    return out


def _head_flops(model: StitchModel, n_classes: int) -> float:
    """Per-image FLOPs of connector + class logits (the class side is amortised and left out)."""
    macs = connector_macs(model.shape.layers, 1, 1)["forward"] + n_classes * model.shape.dims[-1]
    return 2.0 * macs


# ---- reports: clip_benchmark-style JSON per (run, data set), CSV and markdown over data sets and encoders --------

CSV_COLUMNS = ("run", "dataset", "task", "encoder", "n", "acc1", "acc5", "mean_per_class_recall", "ece", "nll",
               *(f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in KS))


def _clip_benchmark_metrics(m: dict) -> dict:
    """Our percentages as clip_benchmark's keys and units (fractions in [0, 1])."""
    return {"acc1": m["top1"] / 100, "acc5": m["top5"] / 100,
            "mean_per_class_recall": m["mean_per_class_recall"] / 100, "ece": m["ece"] / 100, "nll": m["nll"]}


def _retrieval_metrics(r: dict) -> dict:
    """image_retrieval = text->image, text_retrieval = image->text, as clip_benchmark names them."""
    out = {f"image_retrieval_recall@{k}": r["text_to_image"][f"R@{k}"] / 100 for k in KS}
    out.update({f"text_retrieval_recall@{k}": r["image_to_text"][f"R@{k}"] / 100 for k in KS})
    return out


def dataset_reports(run_dir: Path, results: dict) -> dict[str, dict]:
    """{file stem: content} of the per-data-set JSON files."""
    run = Path(run_dir).name
    reports = {}
    for name, r in results["datasets"].items():
        reports[name] = {"run": run, "dataset": name, "task": "zeroshot_classification", "path": r.get("path", ""),
                         "layout": r.get("layout", ""), "n": r.get("n"), "text_encoder": results["text_encoder"],
                         "templates": r.get("templates"), "n_templates": r.get("n_templates"),
                         "metrics": {enc: _clip_benchmark_metrics(m) for enc, m in r["encoders"].items()}}
    if results.get("retrieval"):
        first = next(iter(results["retrieval"].values()))
        reports["retrieval"] = {"run": run, "dataset": first.get("dataset", "retrieval"), "task": "zeroshot_retrieval",
                                "n": first["n"], "n_texts": first.get("n_texts", first["n"]),
                                "text_encoder": results["text_encoder"],
                                "metrics": {enc: _retrieval_metrics(r) for enc, r in results["retrieval"].items()}}
    return reports


def csv_rows(reports: dict[str, dict]) -> list[dict]:
    return [{"run": rep["run"], "dataset": rep["dataset"], "task": rep["task"], "encoder": enc, "n": rep["n"], **m}
            for rep in reports.values() for enc, m in rep["metrics"].items()]


def csv_table(rows: list[dict]) -> str:
    def cell(v):
        return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
    lines = [",".join(CSV_COLUMNS)]
    lines += [",".join(cell(row.get(c)) for c in CSV_COLUMNS) for row in rows]
    return "\n".join(lines) + "\n"


def write_reports(run_dir: Path, results: dict) -> None:
    reports = dataset_reports(run_dir, results)
    for stem, report in reports.items():
        io.write_json(Path(run_dir) / "eval" / f"{stem}.json", report)
    io.write_text(Path(run_dir) / "eval.csv", csv_table(csv_rows(reports)))
    io.write_text(Path(run_dir) / "eval.md", markdown_table(results))


def markdown_table(results: dict) -> str:
    lines = []
    for enc, r in results.get("retrieval", {}).items():
        i2t, t2i = r["image_to_text"], r["text_to_image"]
        lines.append(f"retrieval {enc} (n={r['n']} images, {r.get('n_texts', r['n'])} captions): image->text "
                     + " ".join(f"{k} {v:.1f}" for k, v in i2t.items())
                     + " | text->image " + " ".join(f"{k} {v:.1f}" for k, v in t2i.items()))
    for name, r in results["datasets"].items():
        lines += [f"### {name} (zero-shot, {r.get('layout', '')} layout, templates: {r.get('templates')}, "
                  f"chance {r['chance_top1']:.1f}%)", "",
                  "| encoder | top-1 | top-5 | mean per-class recall | NLL | ECE |", "|---|---:|---:|---:|---:|---:|"]
        for enc, m in r["encoders"].items():
            lines.append(f"| {enc} | {m['top1']:.1f} | {m['top5']:.1f} | {m['mean_per_class_recall']:.1f} "
                         f"| {m['nll']:.3f} | {m['ece']:.1f} |")
        lines.append("")
    return "\n".join(lines)
