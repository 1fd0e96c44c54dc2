"""One training loop for the hypernetwork and the separate (APE) baseline, on cached embeddings.

accelerate provides devices, DDP, AMP, gradient accumulation, checkpoint state and trackers. A step draws one
global batch and a set of encoders (all, or k of N), runs every selected encoder's connector in one batched call,
and applies a symmetric InfoNCE over [N, B, B] logits. The unit trained is an (image encoder, text encoder) pair
(hnet/pairs.py): with one text encoder, simply an encoder. Batch order and pair choice are pure functions of
(seed, step), so `resume=latest` continues exactly where a killed run stopped.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from hnet import files
from hnet.config import Config, dump_yaml, to_dict
from hnet.data.cache import open_training_cache
from hnet.data.features import FeatureBatches, Prefetcher
from hnet.distributed import StopFlag, make_accelerator, step_all_reduce
from hnet.eval.zeroshot import ZeroShotProbe
from hnet.flops import FlopsLedger, train_step_flops
from hnet.models.encoders import read_encoder_list
from hnet.models.losses import encoder_chunk, loss_and_surrogate
from hnet.models.stitch import StitchModel, build_model
from hnet.runs import save_model
from hnet.train.checkpoint import (
    remove_unfinished,
    resolve_resume,
    save_checkpoint,
    verify_checkpoint,
)
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


# ---------------------------------------------------------------- the loop

def train(cfg: Config, accelerator: Accelerator | None = None) -> dict:
    accelerator = accelerator or make_accelerator(cfg)
    set_seed(cfg.train.seed)
    specs = read_encoder_list(cfg.encoders, cfg.image_weights)
    names = [s.name for s in specs]
    cache = open_training_cache(cfg, names)
    data = FeatureBatches(cache, names, cfg.texts, cfg.train.batch_size, cfg.train.seed, cfg.data.shuffle_pairs,
                          cfg.train.overfit_batches, accelerator.process_index, accelerator.num_processes)
    model = build_model(cfg, names, data.widths, cfg.texts, data.text_widths)
    labels, trained = model.labels(), model.trained
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr)
    steps = total_steps(cfg, data.steps_per_epoch)
    # Not prepared by accelerate: a prepared scheduler steps once per rank per optimizer step (split_batches=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train.warmup_steps, steps))
    accelerator.register_for_checkpointing(scheduler)
    model, optimizer = accelerator.prepare(model, optimizer)
    run_dir = cfg.run_dir
    start = _start_or_resume(cfg, accelerator, run_dir)
    ledger = FlopsLedger(run_dir)
    raw: StitchModel = accelerator.unwrap_model(model)
    n_enc = len(encoder_subset(0, len(trained), cfg.train.encoders_per_step, cfg.train.seed))
    world = accelerator.num_processes
    step_flops = (train_step_flops(raw, n_enc, cfg.train.batch_size, world=world, local=cfg.train.local_loss)
                  | {"grad_accum": cfg.train.grad_accum, "world": world, "local_loss": cfg.train.local_loss,
                     "device": str(accelerator.device)})
    accum, k = cfg.train.grad_accum, cfg.train.encoders_per_step
    pairs_at = lambda step: trained[encoder_subset(step, len(trained), k, cfg.train.seed)]
    feed = Prefetcher(data, lambda micro: raw.pairs.members(pairs_at(micro // accum))[:2])
    probe = None
    if cfg.train.eval_every > 0:  # built and scored on every rank: no rank waits alone in a collective
        probe = ZeroShotProbe(cfg, cfg.eval.datasets[0], names, {s.name: s.weights for s in specs}, accelerator)
        probe.charge_embedding(ledger)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"train {cfg.method}",
               disable=not accelerator.is_main_process)
    last, stopped = {}, False
    draws = draw_counts(cfg, len(trained), start)
    tick, samples, skipped_total = time.perf_counter(), 0, 0
    with StopFlag() as stop:
        for step in bar:
            log = (step + 1) % cfg.train.log_every == 0 or step + 1 == steps
            loss, stopped, grad_norm, layer_norms, skipped = _one_step(cfg, accelerator, model, optimizer, scheduler,
                                                                       feed, step, pairs_at(step), log, stop.raised)
            draws[encoder_subset(step, len(trained), k, cfg.train.seed)] += 1
            skipped_total += skipped
            samples += cfg.train.batch_size * accum
            ledger.add("train", step_flops["total"] * accum, steps=1, samples=cfg.train.batch_size * accum,
                       parts=step_flops | {"encoder_draws": dict(zip([labels[p] for p in trained], draws.tolist()))})
            done = step + 1
            row = {}
            if log or skipped:
                elapsed = time.perf_counter() - tick
                row = {"step": done, "epoch": done * accum / data.steps_per_epoch, "loss": loss,
                       "lr": scheduler.get_last_lr()[0], "logit_scale": float(raw.logit_scale().detach().mean()),
                       "grad_norm": grad_norm, "samples_per_s": samples / max(elapsed, 1e-9),
                       "skipped_steps": skipped_total, "world": world, **layer_norms}
                bar.set_postfix(loss=f"{loss:.4f}")
                tick, samples = time.perf_counter(), 0
            if probe is not None and (done % cfg.train.eval_every == 0 or done == steps):
                row = {"step": done, **row, **_probe_scores(probe, raw, labels, ledger, [labels[p] for p in trained])}
            if row:
                last = row | {"flops_cum": ledger.total(), "train_flops_cum": ledger.phases["train"]["flops"]}
                if accelerator.is_main_process:
                    files.append_jsonl(run_dir / "metrics.jsonl", last)
                    accelerator.log({k: v for k, v in last.items() if k != "step"}, step=done)
            if done % cfg.train.ckpt_every == 0 or done == steps or stopped:
                ledger.save(accelerator.is_main_process)
                save_checkpoint(accelerator, run_dir, done)
            if stopped:
                accelerator.print(f"stopped by signal after step {done}; resume with train.resume=latest")
                break
    if accelerator.is_main_process and not stopped:
        save_model(run_dir, raw, cfg.hypernet, {s.name: s.weights for s in specs})
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:  # not end_training(): it would take the process group down with it,
        tracker.finish()                  # and evaluation / search run after training in the same processes
    return {"steps": steps, "last": last, "run_dir": str(run_dir), "stopped": stopped}


def _start_or_resume(cfg: Config, accelerator: Accelerator, run_dir: Path) -> int:
    resume = resolve_resume(cfg)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        files.remove_stale_temps(run_dir)
        remove_unfinished(run_dir)
        files.write_text(run_dir / "config.yaml", dump_yaml(cfg))
    if cfg.train.tracker:
        accelerator.init_trackers(cfg.name, config=_flat(to_dict(cfg)))
    if resume is None:
        if accelerator.is_main_process:
            for stale in ("metrics.jsonl", "flops.json"):
                (run_dir / stale).unlink(missing_ok=True)
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        accelerator.wait_for_everyone()
        return 0
    step = verify_checkpoint(resume)
    accelerator.load_state(str(resume))
    if accelerator.is_main_process:  # drop metrics logged after the checkpoint: they will be logged again
        rows = [r for r in files.read_jsonl(run_dir / "metrics.jsonl") if r.get("step", 0) <= step]
        files.write_text(run_dir / "metrics.jsonl", "".join(f"{json.dumps(r)}\n" for r in rows))
        FlopsLedger.rewind(run_dir, resume)
    accelerator.wait_for_everyone()
    accelerator.print(f"resumed from {resume} at step {step}")
    return step


def _probe_scores(probe, model: StitchModel, names: list[str], ledger: FlopsLedger, trained: list[str]) -> dict:
    """Mid-run zero-shot top-1 per pair (`names`: the model's pair names), and the mean over the pairs that train;
    its FLOPs go to the eval phase."""
    scores = {n: probe.metrics(model, i)["top1"] for i, n in enumerate(names)}
    probe.charge_heads(ledger, model, f"train_probe/{probe.key}", len(names))
    return {"zeroshot_top1": sum(scores[n] for n in trained) / len(trained),
            **{f"zeroshot_top1/{n}": v for n, v in scores.items()}}


def _one_step(cfg, accelerator, model, optimizer, scheduler, feed, step, pairs, log=True, stop=False):
    """One optimizer step (grad_accum micro-batches) of the model's pairs `pairs` = one scheduler step, whatever the
    world size. Returns (loss averaged over ranks, whether any rank was told to stop, grad norm, per-parameter
    grad norms (when `log`), skipped 0/1)."""
    raw: StitchModel = accelerator.unwrap_model(model)
    index = torch.as_tensor(pairs, device=accelerator.device)
    _, _, image_slot, text_slot = raw.pairs.members(pairs)
    slots = [None if s is None else torch.as_tensor(s, device=accelerator.device) for s in (image_slot, text_slot)]
    total_loss = 0.0
    for micro in range(cfg.train.grad_accum):
        image, text = feed.get(step * cfg.train.grad_accum + micro)
        image, text = image.to(accelerator.device), text.to(accelerator.device)
        with accelerator.accumulate(model):
            a, b, scale = model(index, image, text, *slots)
            loss, surrogate = loss_and_surrogate(a.float(), b.float(), scale, encoder_chunk(cfg.train.batch_size),
                                                 local=cfg.train.local_loss)
            if raw.method == "separate":  # a sum over connectors: each gets the gradient it would get alone
                surrogate = surrogate * len(pairs)
            accelerator.backward(surrogate)
        total_loss += float(loss.detach()) / cfg.train.grad_accum
    # the last micro-batch synchronised the gradients; fp16: unscale them once, before norms and clipping
    accelerator.unscale_gradients()
    layer_norms = layer_grad_norms(raw) if log else {}
    grad_norm = _clip(cfg, model, raw)
    # every rank takes the same branch: a NaN/inf loss on any rank makes the mean non-finite
    total_loss, stopped = step_all_reduce(accelerator, total_loss, stop)
    # under fp16 an overflowing gradient is the GradScaler's to skip (it then lowers the scale)
    if not math.isfinite(total_loss) or (not math.isfinite(grad_norm) and accelerator.scaler is None):
        if cfg.train.nonfinite == "stop":
            raise NonFiniteError(f"non-finite loss/gradient at step {step + 1}; the last good checkpoint "
                                 f"is kept in {cfg.run_dir / 'checkpoints'} (or set train.nonfinite=skip)")
        optimizer.zero_grad()
        scheduler.step()
        return float("nan"), stopped, grad_norm, layer_norms, 1
    with untouched_rows(optimizer.optimizer, raw.untouched(pairs), accelerator.device):
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return total_loss, stopped, grad_norm, layer_norms, int(bool(getattr(optimizer, "step_was_skipped", False)))


def _clip(cfg, model, raw: StitchModel) -> float:
    """Gradient-norm clipping of unscaled gradients: one global norm for the hypernetwork, one per connector
    for APE (as N single runs would)."""
    if cfg.train.grad_clip <= 0:
        return 0.0
    if raw.method == "separate":
        return clip_per_encoder(raw.per_pair_parameters(), cfg.train.grad_clip)
    return float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip))


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
