"""Linear probe (clip_benchmark's protocol): each image encoder's ceiling on a labelled folder, beside zero-shot.

A labelled folder NAME=PATH (eval.linear_probe) holds PATH/train and PATH/test, each in a layout hnet.data.zeroshot
reads (an ImageFolder, + classnames.txt, ImageNet wnids, ...) with the same classes. Per image encoder of the run, a
logistic regression (torch, full-batch L-BFGS, on the run's device) is fitted on the frozen, cached image features
of train: its L2 weight is chosen from eval.probe_l2 on a seeded, class-stratified validation split carved from
TRAIN (eval.probe_val_fraction of each class; the test split is never seen), then refitted on all of train with
the chosen weight and scored once on test. Zero-shot top-1 of every pair on the same test images sits beside it.
Costs (the feature forwards of both splits, every optimisation pass and prediction) go to the eval phase.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hnet.config import Config, ConfigError, parse_dataset_spec
from hnet.data.zeroshot import read_dataset
from hnet.eval.zeroshot import ZeroShotProbe, classification_metrics, eval_cache
from hnet.flops import FlopsLedger, linear_probe_flops
from hnet.models.stitch import StitchModel

HISTORY = 10  # L-BFGS stored pairs


def split_train_val(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows) of a train split: per class, a seeded `fraction` of its rows (at least one when
    it has two or more) is held out for validation."""
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, round(fraction * len(rows))) if len(rows) > 1 else 0
        val.append(rows[:k])
        fit.append(rows[k:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, steps: int) -> dict:
    """Multinomial logistic regression on x [N, D] (mean cross-entropy + l2 * |W|^2, bias unpenalised), fitted by
    full-batch L-BFGS from zeros on x's device; returns weight, bias, and the passes and iterations it took."""
    weight = torch.zeros(x.shape[1], n_classes, device=x.device, requires_grad=True)
    bias = torch.zeros(n_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=steps, history_size=HISTORY,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)
    passes = 0

    def closure():
        nonlocal passes
        passes += 1
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + l2 * (weight ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    iterations = int(opt.state[weight].get("n_iter", 0))
    return {"weight": weight.detach(), "bias": bias.detach(), "passes": passes, "iterations": iterations,
            "flops": linear_probe_flops(len(x), x.shape[1], n_classes, passes, iterations=iterations,
                                        history=HISTORY)}


def probe_logits(fit: dict, x: torch.Tensor) -> torch.Tensor:
    return x @ fit["weight"] + fit["bias"]


def prediction_flops(x: torch.Tensor, n_classes: int) -> float:
    return linear_probe_flops(len(x), x.shape[1], n_classes, backward=False)


def choose_l2(x: torch.Tensor, y: torch.Tensor, n_classes: int, grid: list[float], fraction: float, seed: int,
              steps: int) -> tuple[float, list[dict], float]:
    """(chosen L2 weight, validation top-1 per grid value, FLOPs) from TRAIN rows only: each value is fitted on
    the fit rows and scored on the held-out validation rows; the best validation top-1 wins, ties going to the
    stronger regularisation."""
    fit_rows, val_rows = split_train_val(y.cpu().numpy(), fraction, seed)
    fit_rows, val_rows = (torch.as_tensor(r, device=x.device) for r in (fit_rows, val_rows))
    table, flops = [], 0.0
    for l2 in grid:
        model = fit_logistic(x[fit_rows], y[fit_rows], n_classes, l2, steps)
        top1 = float((probe_logits(model, x[val_rows]).argmax(-1) == y[val_rows]).float().mean()) * 100
        flops += model["flops"] + prediction_flops(x[val_rows], n_classes)
        table.append({"l2": l2, "val_top1": top1, "iterations": model["iterations"]})
    best = max(table, key=lambda r: (r["val_top1"], r["l2"]))
    return best["l2"], table, flops


def probe_encoder(train_x, train_y, test_x, test_y, n_classes: int, cfg: Config) -> dict:
    """One image encoder's probe: L2 chosen on a split of train, refitted on all of train, scored on test."""
    ev = cfg.eval
    l2, table, flops = choose_l2(train_x, train_y, n_classes, ev.probe_l2, ev.probe_val_fraction, cfg.train.seed,
                                 ev.probe_steps)
    model = fit_logistic(train_x, train_y, n_classes, l2, ev.probe_steps)
    metrics = classification_metrics(probe_logits(model, test_x), test_y, n_classes)
    flops += model["flops"] + prediction_flops(test_x, n_classes)
    return metrics | {"l2": l2, "selection": table, "iterations": model["iterations"], "flops": flops,
                      "n_train": len(train_y)}


class LinearProbeSet:
    """One labelled folder's two splits, embedded for the run's image encoders (build it on every rank: the
    embedding pass is split across them); the test split is also a zero-shot probe for the run's pairs."""

    def __init__(self, cfg: Config, spec: str, names: list[str], weights: dict[str, str], accelerator,
                 texts: list[str]):
        self.cfg = cfg
        self.name, root = _split_roots(spec)
        self.test = ZeroShotProbe(cfg, f"{self.name}={root / 'test'}", names, weights, accelerator, texts)
        self.train_set = read_dataset(f"{self.name}_train", root / "train", cfg.eval.max_images)
        if self.train_set.classnames != self.test.dataset.classnames:
            raise ConfigError(f"eval.linear_probe {spec}: train/ and test/ have different classes "
                              f"({len(self.train_set.classnames)} vs {len(self.test.dataset.classnames)})")
        cache, self.embedded = eval_cache(cfg, self.train_set, names, weights, accelerator)
        device = self.test.device
        self.train_y = torch.from_numpy(np.array(cache["labels"])).to(device)
        self.train_x = {n: torch.from_numpy(np.asarray(cache[n], np.float32)).to(device) for n in names}

    def evaluate(self, model: StitchModel, labels: list[str], ledger: FlopsLedger) -> dict:
        """Per image encoder the probe on test, per pair zero-shot top-1 on the same test images; charged."""
        classes = len(self.test.dataset.classnames)
        encoders = {n: probe_encoder(x, self.train_y, self.test.features[n], self.test.labels, classes, self.cfg)
                    for n, x in self.train_x.items()}
        zero_shot = {label: self.test.metrics(model, p)["top1"] for p, label in enumerate(labels)}
        self.charge(ledger, model, encoders, len(labels))
        return {"classes": self.test.dataset.classnames, "n_train": len(self.train_y), "n_test": len(self.test.labels),
                "train_path": self.train_set.root, "test_path": self.test.dataset.root, "key": self.test.key,
                "grid": self.cfg.eval.probe_l2, "val_fraction": self.cfg.eval.probe_val_fraction,
                "encoders": {n: {k: v for k, v in m.items() if k != "reliability"} for n, m in encoders.items()},
                "pairs": {label: list(model.pair_names(p)) for p, label in enumerate(labels)},
                "zero_shot_top1": zero_shot}

    def charge(self, ledger: FlopsLedger, model: StitchModel, encoders: dict, pairs: int) -> None:
        ledger.charge_embedding(self.train_set.key, self.train_x, len(self.train_y), self.embedded)
        self.test.charge_embedding(ledger)
        self.test.charge_heads(ledger, model, f"heads/{self.test.key}", pairs)
        for n, m in encoders.items():
            iterations = m["iterations"] + sum(r["iterations"] for r in m["selection"])  # every fit's
            ledger.charge("eval", f"linear_probe/{self.test.key}/{n}", m["flops"], steps=iterations,
                          samples=m["n_train"], l2=m["l2"])


def _split_roots(spec: str) -> tuple[str, Path]:
    name, path = parse_dataset_spec(spec if "=" in spec else f"{spec}=", "eval.linear_probe")
    root = Path(path)
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise ConfigError(f"eval.linear_probe {spec}: no {split}/ folder in {root} (a labelled folder needs "
                              f"train/ and test/)")
    return name, root
