"""A searcher's settings at a budget: its own learning rate and weight decay (search.lr / search.weight_decay, else
the full run's), and a warmup that scales with the steps the budget allows."""
from __future__ import annotations

import warnings

from hnet.config import Config

HALVING_ONLY = ("lrs", "prefilter")  # search fields that only the halving methods read


def scaled_warmup(warmup: int, steps: int, full_steps: int) -> int:
    """The full schedule's warmup share of `steps` (at least 1); without a full schedule, the configured warmup
    capped at a tenth of the steps."""
    if full_steps > 0:
        return max(1, round(warmup * steps / full_steps))
    return max(1, min(warmup, steps // 10))


def searcher_settings(cfg: Config) -> tuple[float, float]:
    """(lr, weight decay) of a hypernetwork searcher: search.lr / search.weight_decay where set, else train's."""
    s = cfg.search
    return s.lr or cfg.train.lr, s.weight_decay if s.weight_decay >= 0 else cfg.train.weight_decay


def ignored_search_settings(cfg: Config) -> list[str]:
    """The search fields set in cfg that its search.method does not read (search.lrs / search.prefilter outside the
    halving methods)."""
    if cfg.search.method in ("halving", "hypernet-halving"):
        return []
    return [f"search.{name}" for name in HALVING_ONLY if getattr(cfg.search, name)]


def warn_ignored_search_settings(cfg: Config) -> None:
    for name in ignored_search_settings(cfg):
        warnings.warn(f"{name}: only --method halving|hypernet-halving reads it; --method {cfg.search.method} "
                      "ignores it", stacklevel=2)
