"""Successive halving over the (image encoder, text encoder) pairs of a zoo, with the fidelity where the cost is:
samples embedded and steps trained (Jamieson & Talwalkar 2016; Optuna's SuccessiveHalvingPruner names the same
knobs: min resource = rung 0's samples and steps, reduction factor = eta).

Rung 0 embeds `search.rung_samples` training samples with every encoder and trains every pair briefly (with
`search.prefilter`, below: every pair the prefilter kept); each rung keeps the best max(1, n // eta) pairs (Optuna's
promotion rule) and multiplies the samples and steps of the survivors by eta, until one pair is left. An encoder is
embedded further only while one of its pairs survives, and what it embedded is reused (hnet.experiments.search_data).
Rungs are retrained from scratch on their grown samples (the rung's training is a small share of its cost; the
embedding is not repeated). Decisions are scored on held-out
SEARCH samples (caption retrieval, mean of R@1/5/10 both ways, on the first `search.val_samples` samples, which no
rung trains on), never on the evaluation images a truth is measured on; ties at a cut go to the pair named first.

`halving` trains one separate connector per surviving pair (APE); `hypernet-halving` trains ONE hypernetwork per
rung over the survivors (its own lr, weight decay, and a warmup scaled to the rung's steps). With `search.lrs`, each
rung's learner is trained at every listed learning rate and the try with the best mean held-out retrieval decides the
rung: a tuning on search data only (no evaluation image, no truth), every try's training and scoring charged.
With `search.prefilter`, a training-free proxy on the held-out search samples (embedded by every encoder anyway) keeps
the best 1/eta of the pairs before rung 0, charged its own FLOPs. A finished rung's decision is saved (halving.json)
before the next starts, so a killed search resumes with identical decisions.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hnet import files, runs
from hnet.config import Config, ConfigError
from hnet.data.cache import CachedFeatures
from hnet.eval.retrieval import retrieval_metrics
from hnet.experiments.budget import scaled_warmup, searcher_settings
from hnet.experiments.proxies import score_pairs
from hnet.experiments.search_data import SearchFeatures, embedding_cost
from hnet.flops import retrieval_head_flops
from hnet.models.encoders import read_encoder_list, text_key
from hnet.models.pairs import PAIR_SEP, split_label
from hnet.provenance import config_digest
from hnet.text_folders import text_entry_name
from hnet.train.loop import train

STATE = "halving.json"


@dataclass(frozen=True)
class Rung:
    index: int
    pairs: int  # pairs trained at this rung
    samples: int  # training samples (after the held-out search samples)
    steps: int


def rung_schedule(n_pairs: int, eta: int, samples: int, steps: int, available: int) -> list[Rung]:
    """Rungs while more than one pair is left: n, n // eta, ... pairs; samples (capped at `available`) and steps
    times eta per rung. A single pair (a prefilter that kept one) has nothing left to decide: no rung."""
    if n_pairs <= 1:
        return []
    rungs = [Rung(0, n_pairs, min(samples, available), steps)]
    while (keep := max(1, rungs[-1].pairs // eta)) > 1:
        r = len(rungs)
        rungs.append(Rung(r, keep, min(samples * eta ** r, available), steps * eta ** r))
    return rungs


def survivors(scores: dict[str, float], keep: int) -> list[str]:
    """The `keep` best pairs by score; a tie at the cut goes to the pair listed first (zoo order)."""
    order = sorted(range(len(scores)), key=lambda i: (-list(scores.values())[i], i))
    return [list(scores)[i] for i in order[:keep]]


def ranking_scores(rungs: list[dict], prefilter: dict | None = None) -> dict[str, float]:
    """One score per pair for ranking figures: the last rung it reached first, then its score there (a pair that
    survived longer ranks above every pair dropped before; one a prefilter dropped ranks by its proxy score, below
    every pair that reached rung 0)."""
    out = {}
    for done in ([prefilter | {"rung": -1}] if prefilter else []) + rungs:
        for pair, score in done["scores"].items():
            out[pair] = done["rung"] * 1000.0 + score
    return out


class Halving:
    """One halving search over cfg's zoo: `hypernet` selects the per-rung learner (False: separate connectors)."""

    def __init__(self, cfg: Config, accelerator, hypernet: bool, out: Path):
        self.cfg, self.accelerator, self.hypernet, self.out = cfg, accelerator, hypernet, Path(out)
        self.specs = read_encoder_list(cfg.encoders, cfg.image_weights)
        self.entries = {s.name: {"name": s.name, "weights": s.weights} for s in self.specs}
        self.text_entries = {text_entry_name(t): t for t in cfg.text_encoders} or {cfg.text_encoder: cfg.text_encoder}
        self.pairs = [f"{s.name}{PAIR_SEP}{t}" for s in self.specs for t in cfg.texts]
        s = cfg.search
        self.features = SearchFeatures(cfg, accelerator, self.specs, cfg.texts, s.val_samples, s.captions)
        self.digest = config_digest({"zoo": self.pairs, "search": dataclasses.asdict(s),
                                     "train": dataclasses.asdict(cfg.train), "hypernet": hypernet,
                                     "connector": dataclasses.asdict(cfg.connector)})

    def run(self, available: int, full_steps: int = 0) -> dict:
        s = self.cfg.search
        first = max(1, len(self.pairs) // s.eta) if s.prefilter else len(self.pairs)
        rungs = rung_schedule(first, s.eta, s.rung_samples, s.rung_steps, available)
        state = self._state(rungs)
        images, texts = [sp.name for sp in self.specs], self.cfg.texts
        val = self.features.piece(0, s.val_samples, images, texts)
        alive = list(self.pairs)
        if s.prefilter:
            if "prefilter" not in state:
                if self.accelerator.is_main_process:
                    files.write_json(self.out / STATE, state | {"prefilter": self._prefilter(val, first)})
                self.accelerator.wait_for_everyone()
                state = files.read_json(self.out / STATE)
            alive = state["prefilter"]["kept"]
        for rung in rungs:
            if rung.index >= len(state["rungs"]):  # else decided before a restart: the same decision, read back
                decided = self._rung(rung, alive, rungs, val, full_steps)
                if self.accelerator.is_main_process:  # one rank decides and writes; every rank reads it back
                    state["rungs"].append(decided)
                    files.write_json(self.out / STATE, state)
                self.accelerator.wait_for_everyone()
                state = files.read_json(self.out / STATE)
            alive = state["rungs"][rung.index]["kept"]
        return state | {"best": alive, "cost": self.cost(state), **self.features.describe(val)}

    def _state(self, rungs: list[Rung]) -> dict:
        path = self.out / STATE
        state = files.read_json(path) if path.exists() else None
        if state and state["config_digest"] != self.digest:
            raise ConfigError(f"{path}: a halving search with other settings (config digest {state['config_digest']}, "
                              f"now {self.digest}) is recorded here; remove {self.out} or use another name")
        return state or {"config_digest": self.digest, "method": "hypernet-halving" if self.hypernet else "halving",
                         "schedule": [dataclasses.asdict(r) for r in rungs], "rungs": []}

    def _rung(self, rung: Rung, alive: list[str], rungs: list[Rung], val: Path, full_steps: int) -> dict:
        """Embed what the rung's survivors still lack, train them at each learning rate the learner tries, and decide
        with the try of best mean held-out retrieval (on the main process; other ranks get an empty record)."""
        images = [s.name for s in self.specs if any(split_label(p, "halving")[0] == s.name for p in alive)]
        texts = [t for t in self.cfg.texts if any(split_label(p, "halving")[1] == t for p in alive)]
        v, edges = self.cfg.search.val_samples, [0] + [r.samples for r in rungs[: rung.index + 1]]
        ranges = [(v + a, v + b) for a, b in zip(edges, edges[1:]) if b > a]
        pieces = [self.features.piece(a, b, images, texts) for a, b in ranges]
        cache = self.features.training_cache(f"r{rung.index}_{'_'.join(map(str, edges[1:]))}_{self.digest[:8]}",
                                             pieces, images, texts)
        tries = [self._run_config(rung, alive, images, texts, cache, full_steps, lr) for lr in self.learning_rates()]
        for run_cfg in tries:
            if not (run_cfg.run_dir / runs.MODEL).exists():
                train(run_cfg, self.accelerator)
        if not self.accelerator.is_main_process:
            return {}
        loaded = [runs.load_model(t.run_dir) for t in tries]
        scored = [self._val_scores(model, labels, alive, val) for model, labels in loaded]
        means = [sum(s.values()) / len(s) for s in scored]
        chosen = max(range(len(tries)), key=lambda i: (means[i], -i))  # a tie goes to the first learning rate listed
        scores = scored[chosen]
        keep = rungs[rung.index + 1].pairs if rung.index + 1 < len(rungs) else 1
        n = CachedFeatures(val).count
        names = images + [text_key(t) for t in texts]
        shape = loaded[chosen][0].shape
        return {"rung": rung.index, "pairs": len(alive), "samples": rung.samples, "steps": rung.steps,
                "scores": scores, "kept": survivors(scores, keep), "run": str(tries[chosen].run_dir),
                "lr": tries[chosen].train.lr,
                "tries": [{"lr": t.train.lr, "mean_score": m, "run": str(t.run_dir)} for t, m in zip(tries, means)],
                "train_flops": sum(files.read_json(t.run_dir / runs.FLOPS)["phases"]["train"]["flops"] for t in tries),
                "val_head_flops": len(tries) * len(alive) * retrieval_head_flops(shape, n, n),
                "embedded": [{"piece": f"{a}_{b}", "names": names} for a, b in ranges]}

    def learning_rates(self) -> list[float]:
        """What each rung's learner tries: search.lrs, else the searcher's one lr (the hypernetwork's search.lr, a
        separate connector's train.lr, the grid search's own)."""
        if self.cfg.search.lrs:
            return list(self.cfg.search.lrs)
        return [searcher_settings(self.cfg)[0] if self.hypernet else self.cfg.train.lr]

    def _run_config(self, rung: Rung, alive: list[str], images: list[str], texts: list[str], cache: Path,
                    full_steps: int, lr: float) -> Config:
        t = self.cfg.train
        grid = {f"{i}{PAIR_SEP}{x}" for i in images for x in texts}
        weight_decay = searcher_settings(self.cfg)[1] if self.hypernet else t.weight_decay
        train_cfg = dataclasses.replace(
            t, max_steps=rung.steps, epochs=max(t.epochs, float(rung.steps)),
            batch_size=min(t.batch_size, rung.samples),
            warmup_steps=scaled_warmup(t.warmup_steps, rung.steps, full_steps), lr=lr, weight_decay=weight_decay,
            eval_every=0, encoders_per_step=0, ckpt_every=max(t.ckpt_every, rung.steps))
        data = dataclasses.replace(self.cfg.data, cache_dir=str(cache), samples_per_encoder=0, captions="all")
        name = f"r{rung.index}_{self.digest[:8]}" + (f"_lr{lr:g}" if self.cfg.search.lrs else "")
        return dataclasses.replace(
            self.cfg, name=name, out_root=str(self.out),
            method="hypernet" if self.hypernet else "separate",
            train=train_cfg, data=data, encoders=[self.entries[n] for n in images],
            text_encoders=[self.text_entries[x] for x in texts] if self.cfg.text_encoders else [],
            held_out="", held_out_pairs=sorted(grid - set(alive)) if len(texts) > 1 else [])

    def _prefilter(self, val: Path, keep: int) -> dict:
        """The `keep` pairs of best proxy score (search.prefilter) on the held-out search samples, which every encoder
        embeds anyway, so the filter costs only its own FLOPs."""
        found, flops = score_pairs(self.cfg.search.prefilter, CachedFeatures(val), [s.name for s in self.specs],
                                   self.cfg.texts)
        scores = {p: found[split_label(p, "halving")] for p in self.pairs}
        return {"proxy": self.cfg.search.prefilter, "scores": scores, "kept": survivors(scores, keep), "flops": flops}

    @torch.no_grad()
    def _val_scores(self, model, labels: list[str], alive: list[str], val: Path) -> dict[str, float]:
        cache = CachedFeatures(val)
        counts = torch.from_numpy(np.array(cache.caption_counts()))
        text_image = torch.repeat_interleave(torch.arange(len(counts)), counts)
        device = model.widths.device
        scores = {}
        for pair in alive:
            image, text = split_label(pair, "halving")
            index = labels.index(pair if len(model.text_names) > 1 else image)
            metrics = retrieval_metrics(model, index, torch.from_numpy(np.array(cache[image], np.float32)).to(device),
                                        torch.from_numpy(np.array(cache[text_key(text)], np.float32)).to(device),
                                        text_image.to(device))
            recalls = [*metrics["image_to_text"].values(), *metrics["text_to_image"].values()]
            scores[pair] = float(sum(recalls) / len(recalls))
        return scores

    def cost(self, state: dict) -> dict:
        """Everything the search computed: every encoder's forwards over the samples it asked for (held-out search
        samples and each rung's new training samples), every rung's training and scoring."""
        v = self.cfg.search.val_samples
        everyone = [sp.name for sp in self.specs] + [text_key(t) for t in self.cfg.texts]
        asked = [{"piece": f"0_{v}", "names": everyone}] + [e for r in state["rungs"] for e in r["embedded"]]
        parts = embedding_cost(self.features.root, asked)
        embed = sum(p["flops"] for p in parts.values())
        train_flops = sum(r["train_flops"] for r in state["rungs"])
        heads = sum(r["val_head_flops"] for r in state["rungs"]) + state.get("prefilter", {}).get("flops", 0.0)
        return {"embed": embed, "train": train_flops, "eval_heads": heads, "eval_embed": 0.0, "embed_parts": parts,
                "total": train_flops + heads, "total_with_embed": embed + train_flops + heads}
