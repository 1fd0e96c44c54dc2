"""The search: rank every (image encoder, text encoder) pair of a zoo by the zero-shot accuracy of its
hypernetwork-generated connector, at a search budget (steps, k of the N x M encoder pairs per step, training
samples per encoder), and say what that cost next to what a grid search (one separate connector per encoder pair,
APE, at the config's full `train` settings) would cost.

The grid search's cost is computed with the same per-op formulas the ledger uses for a real APE run (tested: the
estimate equals a finished separate run's ledger), so the ratio compares like with like.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from accelerate import PartialState

from hnet import files, runs
from hnet.config import Config, ConfigError, dataset_name
from hnet.data.sources import prepare_shards
from hnet.eval.evaluate import evaluate_run
from hnet.eval.ranking import read_truth_hits, split_agreement
from hnet.experiments.budget import scaled_warmup, searcher_settings, warn_ignored_search_settings
from hnet.experiments.train_run import train_run
from hnet.files import MANIFEST
from hnet.files import MANIFEST as SHARDS_MANIFEST
from hnet.flops import charged_captions, grid_batch_size, grid_search_cost
from hnet.models.encoders import text_key
from hnet.report_ranking import search_markdown
from hnet.train.optim import total_steps


def has_budget(cfg: Config) -> bool:
    s = cfg.search
    return bool(s.steps or s.encoders_per_step or s.samples_per_encoder or s.lr)


def search_config(cfg: Config, full_steps: int = 0) -> Config:
    """The hypernetwork run at the search budget (`search.*` over `train`/`data`). Its warmup is the full run's
    share of warmup applied to the budget's steps (`full_steps`: the full schedule's), so a short budget is not all
    warmup."""
    s = cfg.search
    lr, weight_decay = searcher_settings(cfg)
    train = dataclasses.replace(cfg.train, encoders_per_step=s.encoders_per_step, lr=lr, weight_decay=weight_decay)
    if s.steps:  # exactly this many steps, however many epochs over the budget's pairs that is
        warmup = scaled_warmup(cfg.train.warmup_steps, s.steps, full_steps)
        train = dataclasses.replace(train, max_steps=s.steps, epochs=max(cfg.train.epochs, float(s.steps)),
                                    warmup_steps=warmup)
    data = dataclasses.replace(cfg.data, samples_per_encoder=s.samples_per_encoder)
    return dataclasses.replace(cfg, name=f"{cfg.name}_search", method="hypernet", train=train, data=data,
                               held_out="", held_out_pairs=[])


def training_sample_count(cfg: Config) -> int:
    """Pairs in the whole training set (what a grid search trains on): the full cache, else the shards' manifest."""
    manifest = cfg.cache_root / MANIFEST
    if manifest.exists():
        return int(files.read_json(manifest)["count"])
    shards = Path(prepare_shards(cfg)).parent / SHARDS_MANIFEST
    if shards.exists() and "total" in files.read_json(shards):
        return int(files.read_json(shards)["total"])
    raise ConfigError(f"data.shards: cannot tell how many training pairs there are (no {manifest}, no {shards}); "
                      f"embed the full data once or make the shards with scripts/make_shards.py")


def training_caption_count(cfg: Config, count: int) -> int:
    """Captions of the whole training set a grid search embeds with each text encoder (one per image with
    data.captions=first): from the full cache, else the shards' manifest, else one per pair."""
    manifest = cfg.cache_root / MANIFEST
    if manifest.exists():
        captions = int(files.read_json(manifest).get("caption_count", count))
    else:
        shards = Path(prepare_shards(cfg)).parent / SHARDS_MANIFEST
        captions = int(files.read_json(shards).get("total_captions", count)) if shards.exists() else count
    return charged_captions(cfg, captions, count)


def grid_search_steps(cfg: Config, count: int) -> int:
    """Steps of each separate connector of a grid search at cfg.train's settings over `count` samples."""
    batch = grid_batch_size(cfg)
    train = dataclasses.replace(cfg.train, encoders_per_step=0, batch_size=batch)
    return total_steps(dataclasses.replace(cfg, train=train), count // batch)


def _spent(run_dir: Path) -> dict:
    """The search run's ledger: training, eval heads, and the two embedding passes, kept apart."""
    phases = files.read_json(run_dir / runs.FLOPS)["phases"]
    eval_parts = phases["eval"].get("parts", {})
    eval_embed = sum(p["flops"] for k, p in eval_parts.items() if k.startswith("embed/"))
    final_heads = sum(p["flops"] for k, p in eval_parts.items() if k.startswith("heads/"))
    return {"train": phases["train"]["flops"], "eval_heads": phases["eval"]["flops"] - eval_embed,
            "final_eval_heads": final_heads,
            "embed": phases["embed"]["flops"], "eval_embed": eval_embed,
            "steps": phases["train"]["steps"], "samples_embedded": phases["embed"]["samples"]}


TRUTH_SEED_OFFSET = 1000  # truth run i trains from seed train.seed + 1000 + i: init and data order no method uses


def truth_configs(cfg: Config) -> list[Config]:
    """The grid searches every ranking is scored against: separate connectors over every pair of the zoo at the
    config's `train` settings, from `search.truth_seeds` seeds that no method run uses."""
    return [dataclasses.replace(cfg, name=f"{cfg.name}_truth{i}", method="separate", held_out_pairs=[],
                                train=dataclasses.replace(cfg.train, seed=cfg.train.seed + TRUTH_SEED_OFFSET + i,
                                                          eval_every=0))
            for i in range(cfg.search.truth_seeds)]


def train_truth(cfg: Config, datasets: list[str]) -> list[Path]:
    """Train and evaluate the truth's runs (their cost is the protocol's, charged to no method)."""
    out = []
    for truth in truth_configs(cfg):
        train_run(truth)
        evaluate_run(truth, truth.run_dir, datasets)
        out.append(truth.run_dir)
    return out


def run_search(cfg: Config, separate_runs: list[str | Path] | None = None) -> dict:
    warn_ignored_search_settings(cfg)
    count = training_sample_count(cfg)
    search = search_config(cfg, grid_search_steps(cfg, count))
    spec = cfg.search.dataset or cfg.eval.datasets[0]
    dataset = dataset_name(spec)
    train_run(search)
    results = evaluate_run(search, search.run_dir, [spec])
    top1 = {n: m["top1"] for n, m in results["datasets"][dataset]["encoders"].items()}
    meta = files.read_json(search.run_dir / runs.MODEL)
    manifest = files.read_json(search.cache_path / MANIFEST)
    spent = _spent(search.run_dir)
    text_flops = sum(manifest["flops_per_sample"][text_key(t)] for t in meta["text_encoders"])
    ran = files.read_json(search.run_dir / runs.FLOPS)["phases"]["train"]["parts"]  # at the search's world size
    grid = grid_search_cost(cfg, meta, count, text_flops, grid_search_steps(cfg, count), ran.get("world", 1),
                            ran.get("local_loss", False), training_caption_count(cfg, count))
    # the same final evaluation (not the search run's mid-run probes, which a grid search need not run)
    grid["eval_heads"], grid["eval_embed"] = spent["final_eval_heads"], spent["eval_embed"]
    out = {"dataset": dataset, "run": str(search.run_dir), "budget": dataclasses.asdict(cfg.search),
           "ranking": [{"rank": i + 1, "encoder": n, "predicted_top1": top1[n]}
                       for i, n in enumerate(sorted(top1, key=top1.get, reverse=True))],
           "flops": _totals(spent), "grid_search": _totals(grid), "pairs": results.get("pairs", {})}
    out["ratio"] = {k: out["grid_search"][k] / out["flops"][k] for k in ("train", "total", "total_with_embed")}
    if isinstance(separate_runs, (str, Path)):
        separate_runs = [separate_runs]
    if separate_runs:
        common = list(top1)
        for run in separate_runs:
            evaluated = files.read_json(Path(run) / runs.EVAL)["datasets"]
            if dataset not in evaluated:
                raise ConfigError(f"--separate {run}: its eval.json has no '{dataset}' results (has: "
                                  f"{', '.join(evaluated)}); evaluate it on search.dataset first")
            common = [n for n in common if n in evaluated[dataset]["encoders"]]
        split = split_agreement(runs.read_hits(search.run_dir, dataset, common),
                                read_truth_hits(separate_runs, dataset, common), common)
        out["agreement"] = split | {"separate": [str(r) for r in separate_runs]}
    if PartialState().is_main_process:
        files.write_json(search.run_dir / runs.SEARCH, out)
        files.write_text(search.run_dir / runs.SEARCH_MD, search_markdown(out))
    return out


def _totals(cost: dict) -> dict:
    """Search or grid cost: train, without embedding (train + eval heads), with every embedding pass."""
    total = cost["train"] + cost["eval_heads"]
    return cost | {"total": total, "total_with_embed": total + cost["embed"] + cost["eval_embed"]}
