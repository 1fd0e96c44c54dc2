"""Searches that spend their budget on what costs, embedding: successive halving (of separate connectors, or of one
hypernetwork per rung) and training-free proxies, each scored against the grid search's truth on evaluation images
it never saw, with its whole cost next to the grid search's whole cost.

    python scripts/search.py --config CFG --method halving|hypernet-halving|proxy [--separate TRUTH_RUN ...]
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from accelerate import PartialState

from hnet import files, runs
from hnet.config import Config, ConfigError, dataset_name
from hnet.data.cache import CachedFeatures
from hnet.distributed import make_accelerator
from hnet.eval.ranking import read_truth_hits, scores_agreement
from hnet.experiments.budget import warn_ignored_search_settings
from hnet.experiments.halving import Halving, ranking_scores
from hnet.experiments.proxies import score_pairs
from hnet.experiments.search import _totals, grid_search_steps, training_caption_count, training_sample_count
from hnet.experiments.search_data import SearchFeatures, embedding_cost
from hnet.flops import grid_search_cost
from hnet.models.encoders import read_encoder_list, text_key
from hnet.models.pairs import Pairs
from hnet.report_ranking import budgeted_search_markdown


def search_dir(cfg: Config) -> Path:
    return Path(cfg.out_root) / f"{cfg.name}_search_{cfg.search.method}"


def run_budgeted_search(cfg: Config, truth_runs: list[str | Path] | None = None) -> dict:
    """Run cfg.search.method (halving | hypernet-halving | proxy) and write search.json / search.md."""
    warn_ignored_search_settings(cfg)
    accelerator = make_accelerator(cfg)
    with accelerator.main_process_first():  # it may build the shards: one rank, then the others read them
        count = training_sample_count(cfg)
    out_dir = search_dir(cfg)
    if cfg.search.method == "proxy":
        found = _proxy(cfg, accelerator, min(cfg.search.proxy_samples, count))
    else:
        if cfg.search.val_samples + cfg.search.rung_samples > count:
            raise ConfigError(f"search.val_samples + search.rung_samples: {cfg.search.val_samples} + "
                              f"{cfg.search.rung_samples} exceed the {count} training samples")
        halving = Halving(cfg, accelerator, cfg.search.method == "hypernet-halving", out_dir)
        found = halving.run(count - cfg.search.val_samples, grid_search_steps(cfg, count))
        found["scores"] = ranking_scores(found["rungs"], found.get("prefilter"))
    grid = _grid_cost(cfg, count, found["widths"], found["per_sample"], truth_runs)
    out = {"method": cfg.search.method, "dataset": dataset_name(cfg.search.dataset or cfg.eval.datasets[0]),
           "run": str(out_dir), "budget": dataclasses.asdict(cfg.search), "scores": found["scores"],
           "best": found.get("best") or _best(found["scores"]), "rungs": found.get("rungs"),
           "prefilter": found.get("prefilter"),
           "flops": found["cost"], "grid_search": _totals(grid)}
    out["ratio"] = {k: out["grid_search"][k] / out["flops"][k] if out["flops"][k] else None
                    for k in ("total", "total_with_embed")}
    if truth_runs:
        names = list(found["scores"])
        truth = read_truth_hits(truth_runs, out["dataset"], names)
        out["agreement"] = scores_agreement(found["scores"], truth, names) | {"separate": [str(r) for r in truth_runs]}
    if PartialState().is_main_process:
        files.write_json(out_dir / runs.SEARCH, out)
        files.write_text(out_dir / runs.SEARCH_MD, budgeted_search_markdown(out))
    return out


def _best(scores: dict[str, float]) -> list[str]:
    top = max(scores.values())
    return [n for n, s in scores.items() if s == top]


def _proxy(cfg: Config, accelerator, samples: int) -> dict:
    """A training-free proxy (cfg.search.proxy) of every pair on the first `samples` training samples (each image's
    first caption): its forwards and the proxy's own FLOPs."""
    specs = read_encoder_list(cfg.encoders, cfg.image_weights)
    features = SearchFeatures(cfg, accelerator, specs, cfg.texts, 0, "first")
    names = [s.name for s in specs] + [text_key(t) for t in cfg.texts]
    cache = CachedFeatures(features.piece(0, samples, [s.name for s in specs], cfg.texts))
    found, flops = score_pairs(cfg.search.proxy, cache, [s.name for s in specs], cfg.texts)
    multi = len(cfg.texts) > 1
    scores = {f"{image} + {text}" if multi else image: v for (image, text), v in found.items()}
    parts = embedding_cost(features.root, [{"piece": f"0_{samples}", "names": names}])
    embed = sum(p["flops"] for p in parts.values())
    cost = {"embed": embed, "train": 0.0, "eval_heads": flops, "eval_embed": 0.0, "embed_parts": parts,
            "total": flops, "total_with_embed": embed + flops}
    return {"scores": scores, "cost": cost, "samples": samples, **features.describe(cache.root)}


def _grid_cost(cfg: Config, count: int, widths: dict[str, int], per_sample: dict[str, float], truth_runs) -> dict:
    """What a grid search of the zoo costs: every pair's connector at cfg.train's settings (the ledger's formulas),
    every encoder's forwards over every training sample and caption, and (from a truth run's ledger, when given)
    evaluating every pair on the zero-shot set."""
    images = [s.name for s in read_encoder_list(cfg.encoders, cfg.image_weights)]
    meta = {"image_encoders": images, "image_widths": [widths[n] for n in images],
            "text_widths": [widths[text_key(t)] for t in cfg.texts],
            "pairs": Pairs.grid(len(images), len(cfg.texts)).as_list()}
    grid = grid_search_cost(cfg, meta, count, sum(per_sample[text_key(t)] for t in cfg.texts),
                            grid_search_steps(cfg, count), captions=training_caption_count(cfg, count))
    grid["eval_heads"], grid["eval_embed"] = 0.0, 0.0
    if truth_runs:
        dataset = dataset_name(cfg.search.dataset or cfg.eval.datasets[0])
        spent = runs.zero_shot_eval_flops(truth_runs[0], dataset)
        grid["eval_embed"], grid["eval_heads"] = spent["embed"], spent["heads"]
    return grid
