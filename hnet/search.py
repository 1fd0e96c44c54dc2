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

import torch
from accelerate import PartialState

from hnet import io
from hnet.cache import MANIFEST, text_key
from hnet.config import Config, ConfigError, HypernetConfig, dataset_name
from hnet.connectors import ConnectorShape
from hnet.data.shards import MANIFEST as SHARDS_MANIFEST
from hnet.data.sources import prepare_shards
from hnet.evaluate import evaluate_run
from hnet.flops import forward_flops, train_step_flops
from hnet.model import StitchModel
from hnet.pairs import Pairs
from hnet.ranking import agreement, pair_grid_markdown
from hnet.run import train_run
from hnet.train import total_steps


def has_budget(cfg: Config) -> bool:
    s = cfg.search
    return bool(s.steps or s.encoders_per_step or s.samples_per_encoder or s.lr)


def search_config(cfg: Config) -> Config:
    """The hypernetwork run at the search budget (`search.*` over `train`/`data`)."""
    s = cfg.search
    train = dataclasses.replace(cfg.train, encoders_per_step=s.encoders_per_step, lr=s.lr or cfg.train.lr)
    if s.steps:  # exactly this many steps, however many epochs over the budget's pairs that is
        train = dataclasses.replace(train, max_steps=s.steps, epochs=max(cfg.train.epochs, float(s.steps)))
    data = dataclasses.replace(cfg.data, samples_per_encoder=s.samples_per_encoder)
    return dataclasses.replace(cfg, name=f"{cfg.name}_search", method="hypernet", train=train, data=data,
                               held_out="", held_out_pairs=[])


def training_sample_count(cfg: Config) -> int:
    """Pairs in the whole training set (what a grid search trains on): the full cache, else the shards' manifest."""
    manifest = cfg.cache_root / MANIFEST
    if manifest.exists():
        return int(io.read_json(manifest)["count"])
    shards = Path(prepare_shards(cfg)).parent / SHARDS_MANIFEST
    if shards.exists() and "total" in io.read_json(shards):
        return int(io.read_json(shards)["total"])
    raise ConfigError(f"data.shards: cannot tell how many training pairs there are (no {manifest}, no {shards}); "
                      f"embed the full data once or make the shards with scripts/make_shards.py")


def grid_search_cost(cfg: Config, meta: dict, count: int, text_flops_per_sample: float) -> dict:
    """FLOPs of training one separate connector per encoder pair of `meta` (a model.json: image_encoders,
    image_widths, text_widths, pairs) at cfg.train's settings (batch: search.grid_batch_size when set) over `count`
    samples in one process, and of embedding those samples with every image encoder and every text encoder
    (`text_flops_per_sample`: all text encoders together, per caption)."""
    c, names, widths = cfg.connector, meta["image_encoders"], meta["image_widths"]
    shape = ConnectorShape(c.kind, c.direction, max(widths), max(meta["text_widths"]), c.depth, c.hidden)
    pairs = Pairs.from_list(meta["pairs"])
    with torch.device("meta"):
        model = StitchModel("separate", shape, widths, HypernetConfig(), text_widths=meta["text_widths"], pairs=pairs)
    batch = cfg.search.grid_batch_size or cfg.train.batch_size
    train = dataclasses.replace(cfg.train, encoders_per_step=0, batch_size=batch)
    steps = total_steps(dataclasses.replace(cfg, train=train), count // batch)
    per_step = train_step_flops(model, len(pairs), batch)["total"] * cfg.train.grad_accum
    embed = sum(forward_flops(n, count) for n in names) + count * text_flops_per_sample
    return {"steps": steps, "batch": batch, "samples": count, "train": per_step * steps, "embed": embed}


def _spent(run_dir: Path) -> dict:
    """The search run's ledger: training, eval heads, and the two embedding passes, kept apart."""
    phases = io.read_json(run_dir / "flops.json")["phases"]
    eval_parts = phases["eval"].get("parts", {})
    eval_embed = sum(p["flops"] for k, p in eval_parts.items() if k.startswith("embed/"))
    final_heads = sum(p["flops"] for k, p in eval_parts.items() if k.startswith("heads/"))
    return {"train": phases["train"]["flops"], "eval_heads": phases["eval"]["flops"] - eval_embed,
            "final_eval_heads": final_heads,
            "embed": phases["embed"]["flops"], "eval_embed": eval_embed,
            "steps": phases["train"]["steps"], "samples_embedded": phases["embed"]["samples"]}


def run_search(cfg: Config, separate_run: str | Path | None = None) -> dict:
    search = search_config(cfg)
    spec = cfg.search.dataset or cfg.eval.datasets[0]
    dataset = dataset_name(spec)
    train_run(search)
    results = evaluate_run(search, search.run_dir, [spec])
    top1 = {n: m["top1"] for n, m in results["datasets"][dataset]["encoders"].items()}
    meta = io.read_json(search.run_dir / "model.json")
    manifest = io.read_json(search.cache_path / MANIFEST)
    spent = _spent(search.run_dir)
    text_flops = sum(manifest["flops_per_sample"][text_key(t)] for t in meta["text_encoders"])
    grid = grid_search_cost(cfg, meta, training_sample_count(cfg), text_flops)
    # the same final evaluation (not the search run's mid-run probes, which a grid search need not run)
    grid["eval_heads"], grid["eval_embed"] = spent["final_eval_heads"], spent["eval_embed"]
    out = {"dataset": dataset, "run": str(search.run_dir), "budget": dataclasses.asdict(cfg.search),
           "ranking": [{"rank": i + 1, "encoder": n, "predicted_top1": top1[n]}
                       for i, n in enumerate(sorted(top1, key=top1.get, reverse=True))],
           "flops": _totals(spent), "grid_search": _totals(grid), "pairs": results.get("pairs", {})}
    out["ratio"] = {k: out["grid_search"][k] / out["flops"][k] for k in ("train", "total", "total_with_embed")}
    if separate_run:
        evaluated = io.read_json(Path(separate_run) / "eval.json")["datasets"]
        if dataset not in evaluated:
            raise ConfigError(f"--separate {separate_run}: its eval.json has no '{dataset}' results (has: "
                              f"{', '.join(evaluated)}); evaluate it on search.dataset first")
        truth = evaluated[dataset]["encoders"]
        out["agreement"] = agreement(top1, {n: m["top1"] for n, m in truth.items()}) | {"separate": str(separate_run)}
    if PartialState().is_main_process:
        io.write_json(search.run_dir / "search.json", out)
        io.write_text(search.run_dir / "search.md", search_markdown(out))
    return out


def _totals(cost: dict) -> dict:
    """Search or grid cost: train, without embedding (train + eval heads), with every embedding pass."""
    total = cost["train"] + cost["eval_heads"]
    return cost | {"total": total, "total_with_embed": total + cost["embed"] + cost["eval_embed"]}


def search_markdown(r: dict) -> str:
    b, f, g = r["budget"], r["flops"], r["grid_search"]
    lines = [f"### Encoder search on {r['dataset']} (hypernetwork: {f['steps']} steps, "
             f"k={b['encoders_per_step'] or 'all'}, {f['samples_embedded']} pairs embedded per encoder)", "",
             "| rank | encoder | predicted zero-shot top-1 |", "|---:|---|---:|"]
    lines += [f"| {row['rank']} | {row['encoder']} | {row['predicted_top1']:.1f} |" for row in r["ranking"]]
    pairs = r.get("pairs", {})
    if len({t for _, t in pairs.values()}) > 1:
        lines += ["", *pair_grid_markdown(pairs, {"search": {row["encoder"]: row["predicted_top1"]
                                                             for row in r["ranking"]}})]
    lines += ["", "| FLOPs | search (hypernetwork) | grid search (APE, estimated) | grid / search |",
              "|---|---:|---:|---:|"]
    for key, label in (("train", "training"), ("total", "training + evaluation heads"),
                       ("total_with_embed", "with every embedding pass")):
        lines.append(f"| {label} | {f[key]:.3g} | {g[key]:.3g} | x{r['ratio'][key]:.2f} |")
    lines.append(f"\nGrid search: {g['steps']} steps per connector over {g['samples']} pairs; both sides pay the same "
                 f"evaluation-set embedding ({f['eval_embed']:.3g} FLOPs).")
    if "agreement" in r:
        a = r["agreement"]
        lines.append(f"Against the finished grid search ({a['separate']}): Spearman {a['spearman']:.3f}, Kendall "
                     f"{a['kendall']:.3f}, same best encoder: {'yes' if a['top1_hit'] else 'no'} "
                     f"({a['predicted_best']} vs {a['true_best']}), regret {a['regret']:.1f} points, "
                     f"top-3 recall {a['top3_recall']:.2f}.")
    return "\n".join(lines) + "\n"
