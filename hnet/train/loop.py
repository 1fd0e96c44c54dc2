"""The one training loop, on cached embeddings: a run of the hypernetwork or of the separate (APE) baseline,
auto-decoding a new encoder's vector, and fine-tuning decoded connectors all go through `fit(plan)`.

accelerate provides devices, DDP, AMP, gradient accumulation, checkpoint state and trackers. A step draws one
global batch and a set of the plan's pairs (all, or k of them), runs every selected pair's connector in one batched
call, and applies a symmetric InfoNCE over [N, B, B] logits. What trains is a parameter filter: the model's
tensors that require gradients, less the rows no drawn pair uses (`StitchModel.untouched`), so a new encoder's
vector trains while the hypernetwork stays bit-identical. Batch order and pair choice are pure functions of
(seed, step), so a run resumed from its checkpoint continues exactly where a killed one stopped.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from hnet import files, runs
from hnet.config import Config
from hnet.data.cache import open_training_cache
from hnet.data.features import FeatureBatches, Prefetcher
from hnet.distributed import StopFlag, make_accelerator, step_all_reduce
from hnet.eval.ranking import halves_top1, mean_halves
from hnet.eval.zeroshot import ZeroShotProbe
from hnet.flops import FlopsLedger, train_step_flops
from hnet.models.encoders import read_encoder_list
from hnet.models.losses import encoder_chunk, loss_and_surrogate
from hnet.models.moe import moe_losses
from hnet.models.stitch import StitchModel, build_model
from hnet.provenance import config_digest
from hnet.runs import save_model
from hnet.train.checkpoint import save_checkpoint, start_or_resume
from hnet.train.optim import (
    clip_per_encoder,
    draw_counts,
    encoder_subset,
    layer_grad_norms,
    lr_lambda,
    param_groups,
    total_steps,
    untouched_rows,
)


class NonFiniteError(RuntimeError):
    pass


def constant(step: int) -> float:
    return 1.0


@dataclass
class Plan:
    """What one call of `fit` trains, on what, for how long, and what it records."""
    model: StitchModel  # its tensors that require gradients train (less the rows no drawn pair uses)
    data: FeatureBatches  # batches over the encoders of the pairs (`slots`: model encoder -> data position)
    steps: int
    pairs: np.ndarray  # positions of the model's pairs that train
    lr: float
    step_flops: dict  # FLOPs of one optimizer step ("total") and its parts, as the ledger records them
    phase: str = "train"  # the ledger phase the steps are charged to
    ledger_key: str = ""  # "": the phase's running totals (a run); else an itemised part of it
    pairs_per_step: int = 0  # k of the pairs drawn per step (0 = all)
    seed: int = 0
    weight_decay: float = 0.0
    schedule: Callable[[int], float] = constant  # lr multiplier by step
    grad_clip: float = 0.0
    grad_accum: int = 1
    local_loss: bool = False
    nonfinite: str = "stop"
    first_micro_step: int = 0  # batches start here (fine-tuning reads the batches after decoding's)
    slots: tuple[np.ndarray, np.ndarray] | None = None  # image / text encoder of the model -> its data position
    probe: Callable[[int, float, FlopsLedger], dict] | None = None  # (step, loss, ledger) -> metrics fields
    probe_every: int = 0
    probe_at_start: bool = False
    on_ledger: Callable[[FlopsLedger], None] | None = None  # charges owed before the first step
    log_every: int = 0
    run: Config | None = None  # a run: metrics.jsonl, checkpoints, resume and trackers in its run dir
    desc: str = "train"

    def drawn(self, step: int) -> np.ndarray:
        return self.pairs[encoder_subset(step, len(self.pairs), self.pairs_per_step, self.seed)]

    def encoders(self, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The data positions of the image and text encoders that `pairs` use."""
        image, text = self.model.pairs.members(pairs)[:2]
        if self.slots is not None:
            image, text = self.slots[0][image], self.slots[1][text]
        return image, text


def fit(plan: Plan, accelerator: Accelerator, ledger: FlopsLedger | None = None) -> dict:
    """Train `plan` on the accelerator's device(s); every rank runs it. A run's ledger is its run dir's (opened
    after resuming); other plans charge `ledger`. Returns the last metrics row, whether a signal stopped it, the
    last loss, the model (unwrapped) and the names of the tensors the optimizer held."""
    accelerator.gradient_accumulation_steps = plan.grad_accum
    optimizer = torch.optim.AdamW(param_groups(plan.model, plan.weight_decay), lr=plan.lr)
    # Not prepared by accelerate: a prepared scheduler steps once per rank per optimizer step (split_batches=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, plan.schedule)
    if plan.run is not None:
        accelerator.register_for_checkpointing(scheduler)
    model, optimizer = accelerator.prepare(plan.model, optimizer)
    start = start_or_resume(plan.run, accelerator) if plan.run is not None else 0
    ledger = FlopsLedger(plan.run.run_dir) if plan.run is not None else ledger
    if plan.on_ledger is not None:
        plan.on_ledger(ledger)
    raw: StitchModel = accelerator.unwrap_model(model)
    accum = plan.grad_accum
    feed = Prefetcher(plan.data, lambda micro: plan.encoders(plan.drawn((micro - plan.first_micro_step) // accum)))
    draws = draw_counts(len(plan.pairs), plan.pairs_per_step, plan.seed, start)
    labels = raw.labels()
    names = [labels[p] for p in plan.pairs]  # the ledger's keys for the draw counts, named once
    bar = tqdm(range(start, plan.steps), initial=start, total=plan.steps, desc=plan.desc,
               disable=not accelerator.is_main_process)
    last, stopped, loss = {}, False, float("nan")
    tick, samples, skipped_total = time.perf_counter(), 0, 0
    if plan.probe is not None and plan.probe_at_start and start == 0:
        plan.probe(0, loss, ledger)
    # a run checkpoints and stops cleanly on SIGTERM/SIGINT; a plan without a run dir (auto-decoding, fine-tuning)
    # has nothing to resume from, so a signal interrupts it before anything is written
    with StopFlag() if plan.run is not None else contextlib.nullcontext(StopFlag()) as stop:
        for step in bar:
            log = bool(plan.log_every) and ((step + 1) % plan.log_every == 0 or step + 1 == plan.steps)
            loss, stopped, grad_norm, layer_norms, skipped = _one_step(plan, accelerator, model, optimizer, scheduler,
                                                                       feed, step, log, stop.raised)
            draws[encoder_subset(step, len(plan.pairs), plan.pairs_per_step, plan.seed)] += 1
            skipped_total += skipped
            samples += plan.data.batch_size * accum
            _charge_step(plan, ledger, draws, names)
            done = step + 1
            row = {}
            if log or skipped:
                elapsed = time.perf_counter() - tick
                row = {"step": done, "epoch": done * accum / plan.data.steps_per_epoch, "loss": loss,
                       "lr": scheduler.get_last_lr()[0], "logit_scale": float(raw.logit_scale().detach().mean()),
                       "grad_norm": grad_norm, "samples_per_s": samples / max(elapsed, 1e-9),
                       "skipped_steps": skipped_total, "world": accelerator.num_processes, **layer_norms}
                bar.set_postfix(loss=f"{loss:.4f}")
                tick, samples = time.perf_counter(), 0
            if plan.probe is not None and plan.probe_every and (done % plan.probe_every == 0 or done == plan.steps):
                row = {"step": done, **row, **plan.probe(done, loss, ledger)}
            if row:
                last = row | {"flops_cum": ledger.total(),
                              f"{plan.phase}_flops_cum": ledger.phases[plan.phase]["flops"]}
                _record(plan, accelerator, last, done)
            if plan.run is not None and (done % plan.run.train.ckpt_every == 0 or done == plan.steps or stopped):
                ledger.save(accelerator.is_main_process)
                save_checkpoint(accelerator, plan.run.run_dir, done)
            if stopped:
                accelerator.print(f"stopped by signal after step {done}; resume with train.resume=latest")
                break
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return {"last": last, "stopped": stopped, "model": raw, "loss": loss,
            "optimized": [name for name, p in raw.named_parameters() if id(p) in held]}


def _charge_step(plan: Plan, ledger: FlopsLedger, draws: np.ndarray, names: list[str]) -> None:
    """One step's FLOPs; a run's ledger also keeps how often each of its pairs (`names`) was drawn."""
    flops, samples = plan.step_flops["total"] * plan.grad_accum, plan.data.batch_size * plan.grad_accum
    if plan.ledger_key:
        ledger.charge(plan.phase, plan.ledger_key, flops, steps=1, samples=samples, per_step=plan.step_flops["total"])
        return
    ledger.add(plan.phase, flops, steps=1, samples=samples,
               parts=plan.step_flops | {"encoder_draws": dict(zip(names, draws.tolist()))})


def _record(plan: Plan, accelerator: Accelerator, row: dict, step: int) -> None:
    if plan.run is not None and accelerator.is_main_process:
        files.append_jsonl(plan.run.run_dir / runs.METRICS, row)
        accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)


def _one_step(plan: Plan, accelerator, model, optimizer, scheduler, feed, step, log=True, stop=False):
    """One optimizer step (grad_accum micro-batches) of the pairs drawn at `step` = one scheduler step, whatever the
    world size. Returns (loss averaged over ranks, whether any rank was told to stop, grad norm, per-parameter
    grad norms (when `log`), skipped 0/1)."""
    raw: StitchModel = accelerator.unwrap_model(model)
    pairs = plan.drawn(step)
    index = torch.as_tensor(pairs, device=accelerator.device)
    _, _, image_slot, text_slot = raw.pairs.members(pairs)
    slots = [None if s is None else torch.as_tensor(s, device=accelerator.device) for s in (image_slot, text_slot)]
    total_loss, routing = 0.0, {}
    for micro in range(plan.grad_accum):
        image, text = feed.get(plan.first_micro_step + step * plan.grad_accum + micro)
        image, text = image.to(accelerator.device), text.to(accelerator.device)
        with accelerator.accumulate(model):
            a, b, scale = model(index, image, text, *slots)
            loss, surrogate = loss_and_surrogate(a.float(), b.float(), scale, encoder_chunk(plan.data.batch_size),
                                                 local=plan.local_loss)
            if raw.router_logits is not None:  # moe: balance (global batch) + z loss, averaged over pairs
                aux, routing = moe_losses(raw.router_logits, raw.shape.top_k, raw.shape.balance_alpha,
                                          raw.shape.z_loss)
                surrogate = surrogate + aux
            if raw.method == "separate":  # a sum over connectors: each gets the gradient it would get alone
                surrogate = surrogate * len(pairs)
            accelerator.backward(surrogate)
        total_loss += float(loss.detach()) / plan.grad_accum
    # the last micro-batch synchronised the gradients; fp16: unscale them once, before norms and clipping
    accelerator.unscale_gradients()
    layer_norms = (layer_grad_norms(raw) | routing) if log else {}  # (and the last micro-batch's routing)
    grad_norm = _clip(plan, model, raw)
    # every rank takes the same branch: a NaN/inf loss on any rank makes the mean non-finite
    total_loss, stopped = step_all_reduce(accelerator, total_loss, stop)
    # under fp16 an overflowing gradient is the GradScaler's to skip (it then lowers the scale)
    if not math.isfinite(total_loss) or (not math.isfinite(grad_norm) and accelerator.scaler is None):
        if plan.nonfinite == "stop":
            where = plan.run.run_dir / runs.CHECKPOINTS if plan.run is not None else "no checkpoint"
            raise NonFiniteError(f"non-finite loss/gradient at step {step + 1}; the last good checkpoint "
                                 f"is kept in {where} (or set train.nonfinite=skip)")
        optimizer.zero_grad()
        scheduler.step()
        return float("nan"), stopped, grad_norm, layer_norms, 1
    with untouched_rows(optimizer.optimizer, raw.untouched(pairs), accelerator.device):
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return total_loss, stopped, grad_norm, layer_norms, int(bool(getattr(optimizer, "step_was_skipped", False)))


def _clip(plan: Plan, model, raw: StitchModel) -> float:
    """Gradient-norm clipping of unscaled gradients: one global norm for the hypernetwork, one per connector
    for APE (as N single runs would)."""
    if plan.grad_clip <= 0:
        return 0.0
    if raw.method == "separate":
        return clip_per_encoder(raw.per_pair_parameters(), plan.grad_clip)
    return float(torch.nn.utils.clip_grad_norm_(model.parameters(), plan.grad_clip))


# ---------------------------------------------------------------- a run

def train(cfg: Config, accelerator: Accelerator | None = None) -> dict:
    """A run (learn_multi_mapper.py / learn_separate_mapper.py): every trainable pair of the config's encoders over
    its training cache, with the config's schedule, probes and checkpoints; the trained model goes to the run dir."""
    accelerator = accelerator or make_accelerator(cfg)
    set_seed(cfg.train.seed)
    specs = read_encoder_list(cfg.encoders, cfg.image_weights)
    names, weights = [s.name for s in specs], {s.name: s.weights for s in specs}
    cache = open_training_cache(cfg, names)
    data = FeatureBatches(cache, names, cfg.texts, cfg.train.batch_size, cfg.train.seed, cfg.data.shuffle_pairs,
                          cfg.train.overfit_batches, accelerator.process_index, accelerator.num_processes,
                          captions=cfg.data.captions)
    model = build_model(cfg, names, data.widths, cfg.texts, data.text_widths)
    t, world = cfg.train, accelerator.num_processes
    steps = total_steps(cfg, data.steps_per_epoch)
    drawn = len(encoder_subset(0, len(model.trained), t.encoders_per_step, t.seed))
    step_flops = (train_step_flops(model, drawn, t.batch_size, world=world, local=t.local_loss)
                  | {"grad_accum": t.grad_accum, "world": world, "local_loss": t.local_loss,
                     "device": str(accelerator.device)})
    probe = None
    if t.eval_every > 0:  # built and scored on every rank: no rank waits alone in a collective
        probe = ZeroShotProbe(cfg, cfg.eval.datasets[0], names, weights, accelerator)
    plan = Plan(model, data, steps, model.trained, t.lr, step_flops, pairs_per_step=t.encoders_per_step, seed=t.seed,
                weight_decay=t.weight_decay, schedule=lr_lambda(t.warmup_steps, steps), grad_clip=t.grad_clip,
                grad_accum=t.grad_accum, local_loss=t.local_loss, nonfinite=t.nonfinite,
                probe=probe and _run_probe(probe, model), on_ledger=probe and probe.charge_embedding,
                probe_every=t.eval_every, log_every=t.log_every, run=cfg,
                desc=f"train {cfg.method}")
    out = fit(plan, accelerator)
    if accelerator.is_main_process and not out["stopped"]:
        save_model(cfg.run_dir, out["model"], cfg.hypernet, weights, config_digest(cfg))
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:  # not end_training(): it would take the process group down with it,
        tracker.finish()                  # and evaluation / search run after training in the same processes
    return {"steps": steps, "last": out["last"], "run_dir": str(cfg.run_dir), "stopped": out["stopped"]}


def _run_probe(probe: ZeroShotProbe, model: StitchModel):
    """Mid-run zero-shot top-1 per pair, and the mean over the pairs that train; its FLOPs go to the eval phase."""
    labels = model.labels()
    trained = [labels[p] for p in model.trained]

    def scores(step: int, loss: float, ledger: FlopsLedger) -> dict:
        measured = {n: probe.metrics(model, i, per_image=True) for i, n in enumerate(labels)}
        probe.charge_heads(ledger, model, f"train_probe/{probe.key}", len(labels))
        mean = mean_halves([halves_top1(measured[n]["hits"]) for n in trained])
        return {"zeroshot_top1": sum(measured[n]["top1"] for n in trained) / len(trained),
                "zeroshot_top1_val": mean["val"], "zeroshot_top1_test": mean["test"],
                **{f"zeroshot_top1/{n}": m["top1"] for n, m in measured.items()}}
    return scores
