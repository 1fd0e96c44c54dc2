"""Auto-decoding: a connector for an encoder the hypernetwork never saw, by optimising ONLY a new cond embedding.

The hypernetwork (and logit scale) are frozen: `requires_grad_(False)` and the optimiser holds nothing but the new
embedding, so its weights stay bit-identical (tests/test_autodecode.py checks). The budget is steps, samples or
FLOPs, whichever runs out first; accuracy is logged against FLOPs spent along the way. The embedding is saved
into the run, so `evaluate.py` and `connector_for()` treat the new encoder like a trained one.

Only the samples the budget uses are embedded with the new encoder (the first (steps + finetune_steps) x batch
training samples; the training cache's features when it already holds the encoder). Ledger of the run: the
decoding (and fine-tuning) steps in `autodecode`; the new encoder's forwards over those samples as an `embed` part
named after it; the zero-shot probes along the curve (connector + logits over the eval set each call) and the eval
set's embedding for the new encoder in `eval`, like every other evaluation.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from hnet import io
from hnet.cache import TEXT, CachedFeatures, CacheError, open_training_cache
from hnet.embed_pass import build_cache
from hnet.config import Config, ConfigError
from hnet.connectors import Connector
from hnet.data.features import FeatureBatches
from hnet.data.sources import first_samples_unit, prepare_shards, shard_units
from hnet.evaluate import ZeroShotProbe, default_accelerator
from hnet.flops import FlopsLedger, autodecode_step_flops, connector_macs, forward_flops, logits_macs
from hnet.losses import clip_loss
from hnet.model import StitchModel, load_model, project
from hnet.zoo import parse_spec


def initial_cond(model: StitchModel, width: int, how: str, seed: int) -> torch.Tensor:
    conds = model.source.cond.detach()
    if how == "same_width":
        same = model.widths == width
        if same.any():
            return conds[same].mean(dim=0)
    if how == "random":
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(conds.shape[1], generator=gen).to(conds.device) * conds.std()
    return conds.mean(dim=0)


def _check(model: StitchModel, names: list[str], trained: list[str], encoder: str) -> None:
    if model.method != "hypernet":
        raise ConfigError("--run: auto-decoding needs a hypernetwork run (learn_multi_mapper.py), not 'separate'")
    if encoder in trained:
        raise ConfigError(f"--encoder: '{encoder}' was trained in this run; auto-decoding is for unseen encoders")


def _check_width(model: StitchModel, width: int, encoder: str) -> None:
    if model.shape.direction == "image_to_text" and width > model.shape.image_width:
        raise ConfigError(f"--encoder: '{encoder}' is {width} wide; this run's connectors take at most "
                          f"{model.shape.image_width}")


def autodecode(cfg: Config, run_dir, encoder: str, weights: str | None = None, accelerator=None) -> dict:
    """Decode a cond embedding for `encoder` on the accelerator's device. Every rank takes part in embedding;
    the main process decodes, writes the files and the ledger; the others wait and read its result."""
    accelerator = accelerator or default_accelerator(cfg)
    run_dir = Path(run_dir)
    model, names = load_model(run_dir)
    meta = io.read_json(run_dir / "model.json")
    _check(model, names, meta.get("trained", names), encoder)
    spec = parse_spec({"name": encoder, "weights": weights or cfg.image_weights})
    ad = cfg.autodecode
    model = model.to(accelerator.device).requires_grad_(False)
    step_flops = autodecode_step_flops(model, ad.batch_size)
    steps = planned_steps(ad, step_flops)
    data, embedded = decoding_data(cfg, spec, (steps + ad.finetune_steps) * ad.batch_size, accelerator)
    _check_width(model, data.widths[0], encoder)
    probe = ZeroShotProbe(cfg, cfg.eval.datasets[0], [encoder], {encoder: spec.weights}, accelerator)
    out = run_dir / "autodecode" / f"{io.slug(encoder)}.json"
    if accelerator.is_main_process:
        ledger = FlopsLedger(run_dir)
        result = _decode(cfg, model, data, probe, spec, steps, step_flops, run_dir, meta, ledger)
        result["embed"] = embedded
        ledger.charge("embed", encoder, embedded["flops"], images=embedded["samples"], cached=embedded["cached"])
        probe.charge_embedding(ledger)
        ledger.save()
        io.write_json(out, result)
    accelerator.wait_for_everyone()
    return io.read_json(out)


def planned_steps(ad, step_flops: int) -> int:
    """Steps the budget allows: autodecode.steps, capped by .samples and .flops when they are set."""
    caps = [ad.steps]
    if ad.samples:
        caps.append(ad.samples // ad.batch_size)
    if ad.flops:
        caps.append(int(ad.flops // step_flops))
    return max(0, min(caps))


def _decode(cfg: Config, model: StitchModel, data: FeatureBatches, probe: ZeroShotProbe, spec, steps: int,
            step_flops: int, run_dir: Path, meta: dict, ledger: FlopsLedger) -> dict:
    ad, encoder, device = cfg.autodecode, spec.name, probe.device
    width = data.widths[0]
    cond = torch.nn.Parameter(initial_cond(model, width, ad.init, cfg.train.seed).clone().to(device))
    optimizer = torch.optim.Adam([cond], lr=ad.lr)
    scales = model.source.scales_for(width)
    probe_key = f"autodecode_probe/{probe.key}/{encoder}"

    def top1() -> float:
        probe.charge_heads(ledger, model, probe_key)
        return probe.top1_of_params(model, model.source.generate(cond[None].detach(), scales), encoder)

    curve = [{"step": 0, "flops": 0, "samples": 0, "top1": top1()}]
    loss = torch.tensor(float("nan"))
    for step in tqdm(range(1, steps + 1), desc=f"autodecode {encoder}"):
        params = model.source.generate(cond[None], scales)
        loss = _clip_step(model, params, data, step - 1, width, optimizer)
        if (ad.eval_every and step % ad.eval_every == 0) or step == steps:
            curve.append({"step": step, "flops": step * step_flops, "samples": step * ad.batch_size,
                          "top1": top1(), "loss": float(loss)})
    _save_into_run(run_dir, meta, encoder, width, spec.weights, cond.detach())
    spent = steps * step_flops
    ledger.charge("autodecode", f"decode/{encoder}", spent, steps=steps, samples=steps * ad.batch_size,
                  per_step=step_flops)
    result = {"encoder": encoder, "width": width, "init": ad.init, "steps": steps, "samples": steps * ad.batch_size,
              "flops": spent, "top1": curve[-1]["top1"], "curve": curve, "dataset": cfg.eval.datasets[0],
              "device": str(cond.device), "features_device": str(probe.labels.device)}
    if ad.finetune_steps > 0:
        params = model.source.generate(cond[None].detach(), scales)
        result["finetune"] = finetune(cfg, model, params, width, data, probe, encoder, run_dir)
        probe.charge_heads(ledger, model, probe_key)
        ledger.charge("autodecode", f"finetune/{encoder}", result["finetune"]["flops"], steps=ad.finetune_steps,
                      samples=ad.finetune_steps * ad.batch_size)
    return result


def _clip_step(model: StitchModel, params, data: FeatureBatches, micro_step: int, width: int, optimizer):
    """One contrastive step on the frozen model's device through connector `params`; returns the loss."""
    device = model.log_scale.device
    image, text = data.batch(micro_step, np.array([0]))
    image = F.pad(image.to(device), (0, model.shape.image_width - width))
    a, b = project(model.shape, params, torch.tensor([width], device=device), image, text.to(device))
    loss = clip_loss(a, b, model.logit_scale(), gather=False)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


class PrefixFeatures:
    """The first `count` samples of the training data, read the way FeatureBatches reads a cache: the new
    encoder's features (from a cache of only the shards those samples are in, or the training cache when it
    already holds the encoder) with the captions' embeddings of the training cache."""

    def __init__(self, images: CachedFeatures, text: CachedFeatures, name: str, count: int):
        self.count, self.name = count, name
        self.arrays = {name: images[name], TEXT: text[TEXT]}  # only rows < count are ever read
        self.widths = {name: images.width(name)}

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def width(self, name: str) -> int:
        return self.widths[name]


def decoding_data(cfg: Config, spec, budget: int, accelerator) -> tuple[FeatureBatches, dict]:
    """Batches over the first `budget` training samples (all the decoding and fine-tuning steps use), and what
    embedding them with the new encoder costs: {samples, flops, cached}."""
    train_cache = open_training_cache(cfg, [])
    count = min(max(budget, cfg.autodecode.batch_size), train_cache.count)
    cached = spec.name in train_cache.manifest["encoders"]
    images = train_cache if cached else _prefix_cache(cfg, spec, count, train_cache, accelerator)
    data = FeatureBatches(PrefixFeatures(images, train_cache, spec.name, count), [spec.name],
                          cfg.autodecode.batch_size, cfg.train.seed)
    flops = forward_flops(spec.name, count)
    return data, {"samples": count, "flops": int(flops), "cached": cached}


def _prefix_cache(cfg: Config, spec, count: int, train_cache: CachedFeatures, accelerator) -> CachedFeatures:
    """Embed the new encoder over exactly the first `count` training samples: one unit reading the shards in
    order and stopping there (later shards are never opened; small by construction, so not split over ranks)."""
    with accelerator.main_process_first():
        pattern = prepare_shards(cfg)
    unit = first_samples_unit(shard_units(pattern), count)
    root = cfg.cache_path / "autodecode" / f"{io.slug(spec.name)}_first{count}"
    build_cache(root, [unit], [spec], None, batch_size=cfg.data.embed_batch_size, num_workers=0,
                accelerator=accelerator)
    cache = CachedFeatures(root, [spec.name])
    if cache.keys() != train_cache.keys()[:count]:
        raise CacheError(f"{root}: its samples are not the first {count} of the training cache {cfg.cache_path}")
    return cache


def finetune(cfg: Config, model: StitchModel, params, width: int, data: FeatureBatches, probe: ZeroShotProbe,
             encoder: str, run_dir) -> dict:
    """Optionally fine-tune the decoded connector's weights directly (the hypernetwork is not involved);
    saved as a plain connector at RUN_DIR/autodecode/<encoder>.finetuned.safetensors."""
    ad = cfg.autodecode
    params = [(w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()) for w, b in params]
    optimizer = torch.optim.Adam([t for pair in params for t in pair], lr=ad.finetune_lr)
    for step in range(ad.finetune_steps):
        _clip_step(model, params, data, 10_000_000 + step, width, optimizer)  # batches after the decoding ones
    connector = Connector.from_params(model.shape, [(w.detach().cpu(), b.detach().cpu()) for w, b in params], width)
    io.write_safetensors(run_dir / "autodecode" / f"{io.slug(encoder)}.finetuned.safetensors", connector.state_dict())
    step_flops = 2 * sum(sum(p.values()) for p in (connector_macs(model.shape.layers, 1, ad.batch_size),
                                                      logits_macs(1, ad.batch_size, model.shape.dims[-1])))
    return {"steps": ad.finetune_steps, "flops": step_flops * ad.finetune_steps,
            "top1": probe.top1_of_params(model, [(w.detach(), b.detach()) for w, b in params], encoder)}


def _save_into_run(run_dir, meta: dict, encoder: str, width: int, weights: str, cond: torch.Tensor) -> None:
    path = run_dir / "cond_embeddings.safetensors"
    conds = load_file(str(path))
    conds[encoder] = cond.cpu().contiguous()
    io.write_safetensors(path, conds)
    meta.setdefault("trained", list(meta["names"]))
    if encoder not in meta["names"]:
        meta["names"].append(encoder)
        meta["widths"].append(width)
    meta.setdefault("weights", {})[encoder] = weights
    io.write_json(run_dir / "model.json", meta)


def compare_to_separate(result: dict, separate_curve: list[dict]) -> dict:
    """Auto-decoding vs a separate connector trained from scratch on the same encoder.

    `separate_curve`: [{"flops", "top1"}] along the baseline's training. Returns the baseline's accuracy at the
    auto-decoding's FLOPs, and the FLOPs the baseline needed to first reach the auto-decoded accuracy.
    """
    flops, top1 = result["flops"], result["top1"]
    at_equal = [p["top1"] for p in separate_curve if p["flops"] <= flops]
    reached = [p["flops"] for p in separate_curve if p["top1"] >= top1]
    final = separate_curve[-1]
    return {"autodecode_top1": top1, "autodecode_flops": flops,
            "separate_top1_at_equal_flops": at_equal[-1] if at_equal else None,
            "separate_flops_to_equal_top1": reached[0] if reached else None,
            "flops_ratio_to_equal_top1": (reached[0] / flops) if reached and flops else None,
            "separate_final_top1": final["top1"], "separate_total_flops": final["flops"],
            "fraction_of_separate_top1": top1 / final["top1"] if final["top1"] else None,
            "separate_total_flops_ratio": final["flops"] / flops if flops else None}
