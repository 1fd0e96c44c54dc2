"""Processes: the accelerator a run uses, the stop flag a signal raises, and the per-step reduction over ranks."""
from __future__ import annotations

import signal
import threading

import torch
from accelerate import Accelerator

from hnet.config import Config


def make_accelerator(cfg: Config) -> Accelerator:
    # With no accelerator present, accelerate only sets up torchrun's ranks (gloo) when told cpu=True;
    # otherwise every rank would run alone, each believing it is the main process.
    cpu = cfg.device == "cpu" or (cfg.device == "" and not torch.accelerator.is_available())
    return Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=cpu,
                       gradient_accumulation_steps=cfg.train.grad_accum,
                       log_with=cfg.train.tracker or None, project_dir=str(cfg.run_dir))


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and exits cleanly at the next step boundary. The flag is
    reduced over ranks each step, so a signal that reaches one rank stops all of them at the same step. Used as
    a context manager: the previous handlers come back when training ends."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.raised = False
        self.previous: dict = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = {sig: signal.signal(sig, self._set) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _set(self, *_):
        self.raised = True


def step_all_reduce(accelerator: Accelerator, loss: float, stop: bool) -> tuple[float, bool]:
    """One collective per step: the loss averaged over ranks (local_loss gives each rank its share; non-finite
    if it is on any rank) and whether any rank was told to stop."""
    if accelerator.num_processes == 1:
        return loss, stop
    values = torch.tensor([loss, float(stop)], dtype=torch.float64, device=accelerator.device)
    values = accelerator.reduce(values, reduction="sum")
    return float(values[0]) / accelerator.num_processes, bool(values[1] > 0)


def default_accelerator(cfg: Config) -> Accelerator:
    """The accelerator of a phase run on its own (evaluation, auto-decoding): the trainer's, GPU when there is one."""
    return make_accelerator(cfg)
