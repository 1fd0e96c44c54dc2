"""Evaluation of a run: zero-shot classification (and retrieval) of every (image encoder, text encoder) pair
through its generated or trained connector, written as eval.json, eval.md, eval.csv and eval/<dataset>.json."""
from __future__ import annotations

from pathlib import Path

from hnet import files, runs
from hnet.config import Config
from hnet.distributed import default_accelerator
from hnet.eval.linear_probe import LinearProbeSet
from hnet.eval.longtail import longtail_view
from hnet.eval.retrieval import evaluate_retrieval, retrieval_features
from hnet.eval.zeroshot import ZeroShotProbe
from hnet.flops import FlopsLedger
from hnet.models.encoders import read_encoder_list
from hnet.models.stitch import StitchModel
from hnet.report import plot_reliability, write_reports
from hnet.report_probes import plot_longtail
from hnet.runs import load_model


def model_device(model: StitchModel) -> str:
    return str(next(model.parameters()).device)


def evaluate_run(cfg: Config, run_dir: Path, datasets: list[str], accelerator=None,
                 linear_probe: list[str] = ()) -> dict:
    """Zero-shot (and retrieval) metrics of every pair of a run on the accelerator's device, each data set with its
    long-tail view. Every rank takes part in embedding; the main process scores and writes eval.json, eval.md,
    eval.csv, eval/<dataset>.json, plots and the ledger. `datasets`: names or NAME=PATH specs (hnet.data.zeroshot);
    `linear_probe`: NAME=PATH labelled folders (train/, test/) probed per image encoder (hnet.eval.linear_probe)."""
    accelerator = accelerator or default_accelerator(cfg)
    run_dir = Path(run_dir)
    model, names = load_model(run_dir)
    model = model.to(accelerator.device)
    weights = files.read_json(run_dir / runs.MODEL).get("weights", {})
    main = accelerator.is_main_process
    ledger = FlopsLedger(run_dir)
    results: dict = {"templates": cfg.eval.templates, "text_encoder": ", ".join(model.text_names),
                     "text_encoders": model.text_names, "datasets": {}, "device": model_device(model),
                     "pairs": {label: list(model.pair_names(p)) for p, label in enumerate(names)}}
    for spec in datasets:
        probe = ZeroShotProbe(cfg, spec, model.image_names, weights, accelerator, model.text_names)
        if main:
            results["datasets"][probe.dataset.name] = _score(cfg, probe, model, names, run_dir, ledger)
        del probe
    if cfg.eval.retrieval:
        results["retrieval"] = evaluate_retrieval(cfg, model, names, weights, accelerator, ledger)
    for spec in linear_probe:
        probes = LinearProbeSet(cfg, spec, model.image_names, weights, accelerator, model.text_names)
        if main:
            results.setdefault("linear_probe", {})[probes.name] = probes.evaluate(model, names, ledger)
        del probes
    if main:
        ledger.save()
        files.write_json(run_dir / runs.EVAL, results)
        write_reports(run_dir, results)
    accelerator.wait_for_everyone()
    return results if main else files.read_json(run_dir / runs.EVAL)


def embed_eval_sets(cfg: Config, accelerator=None) -> None:
    """Embed every evaluation set of cfg (zero-shot images and class prompts, retrieval images and captions) with
    every configured encoder ahead of the runs that read them (the one-time cost, resumable)."""
    accelerator = accelerator or default_accelerator(cfg)
    specs = read_encoder_list(cfg.encoders, cfg.image_weights)
    for spec in cfg.eval.datasets:
        ZeroShotProbe(cfg, spec, [s.name for s in specs], {s.name: s.weights for s in specs}, accelerator, cfg.texts)
    if cfg.eval.retrieval:
        retrieval_features(cfg, specs, cfg.texts, accelerator)


def _score(cfg: Config, probe: ZeroShotProbe, model: StitchModel, names: list[str], run_dir: Path,
           ledger: FlopsLedger) -> dict:
    if probe.labels.device != next(model.parameters()).device:
        raise RuntimeError(f"evaluation features on {probe.labels.device}, model on {model_device(model)}")
    dataset = probe.dataset
    name, classes = dataset.name, dataset.classnames
    per_encoder = {label: probe.metrics(model, p, per_image=True) for p, label in enumerate(names)}
    per_image = {label: {k: m.pop(k) for k in ("hits", "confidence")} for label, m in per_encoder.items()}
    runs.write_hits(run_dir, name, {label: m["hits"] for label, m in per_image.items()})
    probe.charge_embedding(ledger)
    probe.charge_heads(ledger, model, f"heads/{probe.key}", len(names))
    out = {"classes": classes, "encoders": per_encoder, "chance_top1": 100.0 / len(classes),
           "layout": dataset.layout, "path": dataset.root, "key": probe.key, "n": len(probe.labels),
           "templates": probe.templates_name, "n_templates": probe.n_templates,
           "features_device": str(probe.labels.device), "cached": probe.cached}
    out["reliability_png"] = str(plot_reliability(out, name, run_dir / f"reliability_{name}.png"))
    out["longtail"] = longtail_view(cfg, classes, per_image, probe.labels.cpu().numpy())
    if "omitted" not in out["longtail"]:
        out["longtail"]["png"] = str(plot_longtail(out["longtail"], name, run_dir / f"longtail_{name}.png"))
    return out
