"""A run dir: the names of its files, and the trained model in them.

A run's trained state is `model.safetensors` (hypernetwork or connector weights, logit scale),
`cond_embeddings.safetensors` (one vector per image encoder keyed by its name, and per text encoder keyed
`text:NAME` when there are several; hypernetwork runs) and `model.json` (method, pair names, image and text
encoders with their widths, the pairs, connector shape). `connector_for(run_dir, image, text)` rebuilds a plain
nn.Module from those files, with no training code involved.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from hnet import files
from hnet.config import HypernetConfig
from hnet.models.connectors import Connector, ConnectorShape
from hnet.models.encoders import text_key
from hnet.models.pairs import Pairs, pair_label
from hnet.models.stitch import StitchModel
from hnet.text_folders import TEXT_FOLDERS, register_text_folder

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
FLOPS = "flops.json"
CHECKPOINTS = "checkpoints"
MODEL = "model.json"
WEIGHTS = "model.safetensors"
COND_EMBEDDINGS = "cond_embeddings.safetensors"
EVAL = "eval.json"
EVAL_MD = "eval.md"
EVAL_CSV = "eval.csv"
EVAL_REPORTS = "eval"  # folder: one clip_benchmark-style JSON per data set
AUTODECODE = "autodecode"  # folder: one JSON per auto-decoded encoder, fine-tuned connectors
SEARCH = "search.json"
SEARCH_MD = "search.md"



def trained_pairs(meta: dict) -> list[str]:
    """The names of the pairs a run trained (model.json `trained`; all of them when absent)."""
    return meta.get("trained") or meta["names"]


def decoded_encoders(meta: dict) -> list[str]:
    """The encoders auto-decoded into a run (runs from before `autodecoded` was recorded: the names that did not
    train)."""
    return meta.get("autodecoded") or [n for n in meta["names"] if n not in trained_pairs(meta)]


def pair_top1(results: dict, dataset: str, names: list[str] | None = None) -> dict[str, float]:
    """Zero-shot top-1 by pair name from an eval.json (`names`: only these pairs)."""
    evals = results["datasets"]
    if dataset not in evals:
        raise KeyError(f"eval.json: no results for '{dataset}' (has: {', '.join(evals)})")
    return {n: m["top1"] for n, m in evals[dataset]["encoders"].items() if names is None or n in names}


def zero_shot_eval_flops(run_dir: str | Path, dataset: str) -> dict[str, float]:
    """A run's evaluation FLOPs on zero-shot set `dataset` (not the retrieval set's): its images' encoder forwards
    ("embed") and the connectors and class heads ("heads")."""
    parts = files.read_json(Path(run_dir) / FLOPS)["phases"]["eval"].get("parts", {})
    return {kind: sum(p["flops"] for k, p in parts.items() if k.startswith(f"{kind}/{dataset}_"))
            for kind in ("embed", "heads")}


def hits_file(run_dir: str | Path, dataset: str) -> Path:
    return Path(run_dir) / EVAL_REPORTS / f"{dataset}.hits.npy"


def write_hits(run_dir: str | Path, dataset: str, hits: dict[str, np.ndarray]) -> None:
    """Per-image zero-shot hits [pairs, images] of a run on a data set, rows in eval.json's pair order (what the
    ranking's split halves and bootstrap intervals are computed from)."""
    files.write_npy(hits_file(run_dir, dataset), np.stack(list(hits.values())).astype(np.uint8))


def read_hits(run_dir: str | Path, dataset: str, names: list[str]) -> np.ndarray:
    """The rows of pairs `names` of a run's per-image hits on `dataset` ([len(names), images], 0/1)."""
    path = hits_file(run_dir, dataset)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no per-image results (evaluate the run again with this hnet)")
    order = list(files.read_json(Path(run_dir) / EVAL)["datasets"][dataset]["encoders"])
    hits = np.load(path)
    return hits[[order.index(n) for n in names]].astype(np.float64)


def save_model(run_dir: str | Path, model: StitchModel, hypernet: HypernetConfig, weights: dict[str, str],
               config_digest: str = "") -> None:
    """Write the trained state; `weights` maps image encoder name -> how to load it (pretrained | random | file);
    `config_digest`: the digest of the resolved config that trained it (hnet.provenance), which `finished` checks."""
    run_dir = Path(run_dir)
    images, texts = model.image_names, model.text_names
    skip = ("source.cond", "source.text_cond")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in skip}
    state["log_scale"] = model.log_scale.detach().cpu().contiguous()
    files.write_safetensors(run_dir / WEIGHTS, state)
    if model.method == "hypernet":
        conds = {name: model.source.cond[i].detach().cpu().clone() for i, name in enumerate(images)}
        if model.source.text_cond is not None:
            conds |= {text_key(name): model.source.text_cond[j].detach().cpu().clone() for j, name in enumerate(texts)}
        files.write_safetensors(run_dir / COND_EMBEDDINGS, conds)
    names = model.labels()
    trained = [names[p] for p in model.trained]
    meta = {"method": model.method, "names": names, "widths": model.widths.tolist(),
            "image_encoders": images, "image_widths": model.encoder_widths,
            "text_encoders": texts, "text_widths": model.text_encoder_widths, "pairs": model.pairs.as_list(),
            "shape": dataclasses.asdict(model.shape), "hypernet": dataclasses.asdict(hypernet), "weights": weights,
            "learnable_scale": isinstance(model.log_scale, nn.Parameter), "text_folders": _text_folders(texts)}
    if trained != names:
        meta["trained"] = trained
    if config_digest:
        meta["config_digest"] = config_digest
    files.write_json(run_dir / MODEL, meta)


def finished(run_dir: str | Path, config_digest: str) -> bool:
    """Whether `run_dir` holds a trained and evaluated run of exactly the config with this digest (a run of other
    settings under the same name is not reused)."""
    run_dir = Path(run_dir)
    if not (run_dir / MODEL).exists() or not (run_dir / EVAL).exists():
        return False
    return files.read_json(run_dir / MODEL).get("config_digest") == config_digest


def _text_folders(texts: list[str]) -> dict[str, str]:
    """The local folders (config `{name, path}` entries) the run's text encoders load from, by base name."""
    bases = {t.partition("@")[0] for t in texts}
    return {b: TEXT_FOLDERS[b] for b in sorted(bases) if b in TEXT_FOLDERS}


def register_run_text_folders(run_dir: str | Path, meta: dict) -> None:
    """Make the run's local text folders loadable by name in this process (evaluation, auto-decoding)."""
    for name, folder in meta.get("text_folders", {}).items():
        register_text_folder(name, folder, f"{Path(run_dir) / MODEL}: text_folders.{name}")


def run_encoders(run_dir: str | Path, meta: dict) -> tuple[list[str], list[int], list[str], list[int], Pairs]:
    """(image encoders, their widths, text encoders, their widths, pairs) of a run's model.json (runs from
    before text_encoders: every encoder with the text encoder of its config.yaml)."""
    if "pairs" in meta:
        return (meta["image_encoders"], meta["image_widths"], meta["text_encoders"], meta["text_widths"],
                Pairs.from_list(meta["pairs"]))
    config = Path(run_dir) / CONFIG
    text = (yaml.safe_load(config.read_text()) or {}).get("text_encoder", "") if config.exists() else ""
    return (meta["names"], meta["widths"], [text], [meta["shape"]["text_width"]],
            Pairs.grid(len(meta["names"]), 1))


def load_model(run_dir: str | Path) -> tuple[StitchModel, list[str]]:
    """The run's model and its pair names (image encoder names when the run has one text encoder)."""
    run_dir = Path(run_dir)
    meta_path = run_dir / MODEL
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: no trained model in this run dir (train it first)")
    meta = files.read_json(meta_path)
    register_run_text_folders(run_dir, meta)
    shape = ConnectorShape(**meta["shape"])
    images, widths, texts, text_widths, pairs = run_encoders(run_dir, meta)
    model = StitchModel(meta["method"], shape, widths, HypernetConfig(**meta["hypernet"]), meta["learnable_scale"],
                        text_widths=text_widths, pairs=pairs, names=(images, texts))
    state = load_file(str(run_dir / WEIGHTS))
    with torch.no_grad():
        model.log_scale.copy_(state.pop("log_scale"))
        if meta["method"] == "hypernet":
            conds = load_file(str(run_dir / COND_EMBEDDINGS))
            model.source.cond.copy_(torch.stack([conds[n] for n in images]))
            if model.source.text_cond is not None:
                model.source.text_cond.copy_(torch.stack([conds[text_key(n)] for n in texts]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in ("source.cond", "source.text_cond", "log_scale")]
    if missing or unexpected:
        raise ValueError(f"{run_dir / WEIGHTS}: missing {missing}, unexpected {unexpected}")
    return model.eval(), meta["names"]


@torch.no_grad()
def connector_for(run_dir: str | Path, image: str, text: str | None = None) -> Connector:
    """A plain nn.Module connector for the pair (image encoder `image`, text encoder `text`) of a trained run,
    generated for hypernetwork runs (any combination of the run's encoders). `text` may be left out when the run
    has one text encoder."""
    model, _ = load_model(run_dir)
    images, texts, pairs = model.image_names, model.text_names, model.pairs
    if image not in images:
        raise KeyError(f"{run_dir}: no image encoder '{image}' in this run (has: {', '.join(images)})")
    if text is None and len(texts) > 1:
        raise KeyError(f"{run_dir}: the run has {len(texts)} text encoders; name one (text=..., one of: "
                       f"{', '.join(texts)})")
    text = texts[0] if text is None else text
    if text not in texts:
        raise KeyError(f"{run_dir}: no text encoder '{text}' in this run (has: {', '.join(texts)})")
    cell = (images.index(image), texts.index(text))
    p = next((p for p, ij in enumerate(zip(pairs.image, pairs.text)) if ij == cell), None)
    if p is None:
        raise KeyError(f"{run_dir}: this separate run trained no connector for ({image}, {text})")
    params = model.source(torch.tensor([p]))
    return Connector.from_params(model.shape, params, int(model.widths[p]), int(model.text_widths[p]))


def add_encoder(run_dir: Path, meta: dict, name: str, text: bool, width: int, weights: str, cond: torch.Tensor) -> None:
    """An auto-decoded image (or `text`) encoder joins the run: its vector, and a pair with every encoder of the
    other side (decoded again: a new vector, the same pairs)."""
    path = run_dir / COND_EMBEDDINGS
    conds = load_file(str(path))
    conds[text_key(name) if text else name] = cond.cpu().contiguous()
    files.write_safetensors(path, conds)
    images, image_widths, texts, text_widths, pairs = run_encoders(run_dir, meta)
    meta.setdefault("trained", list(meta["names"]))
    if not text:
        meta.setdefault("weights", {})[name] = weights
    if name in (texts if text else images):
        files.write_json(run_dir / MODEL, meta)
        return
    meta["autodecoded"] = meta.get("autodecoded", []) + [name]
    if text:
        meta["text_folders"] = meta.get("text_folders", {}) | _text_folders([name])
        texts, text_widths = texts + [name], text_widths + [width]
        new = [[i, len(texts) - 1] for i in range(len(images))]
    else:
        images, image_widths = images + [name], image_widths + [width]
        new = [[len(images) - 1, j] for j in range(len(texts))]
    meta.update(image_encoders=images, image_widths=image_widths, text_encoders=texts, text_widths=text_widths,
                pairs=pairs.as_list() + new)
    meta["names"] += [pair_label(images[i], texts[j], len(texts) > 1) for i, j in new]
    meta["widths"] += [image_widths[i] for i, _ in new]
    files.write_json(run_dir / MODEL, meta)
