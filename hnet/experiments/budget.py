"""A searcher's settings at a budget: its own learning rate and weight decay (search.lr / search.weight_decay, else
the full run's), and a warmup that scales with the steps the budget allows."""
from __future__ import annotations

from hnet.config import Config


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
