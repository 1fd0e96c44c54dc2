"""Auto-decoding: a connector for an encoder the hypernetwork never saw, by optimising ONLY a new cond embedding.

The hypernetwork (and logit scale) are frozen: `requires_grad_(False)` and the optimiser holds nothing but the new
embedding, so its weights stay bit-identical (tests/test_autodecode.py checks). The budget is steps, samples or
FLOPs, whichever runs out first; accuracy is logged against FLOPs spent along the way. The embedding is saved
into the run, so `evaluate.py` and `connector_for()` treat the new encoder like a trained one.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from hnet import io
from hnet.cache import CachedFeatures
from hnet.config import Config, ConfigError
from hnet.connectors import Connector
from hnet.data.features import FeatureBatches
from hnet.embedding import embed_training_data
from hnet.evaluate import ZeroShotProbe
from hnet.flops import FlopsLedger, autodecode_step_flops, connector_macs, logits_macs
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
        return torch.randn(conds.shape[1], generator=gen) * conds.std()
    return conds.mean(dim=0)


def _check(model: StitchModel, names: list[str], trained: list[str], encoder: str) -> None:
    if model.method != "hypernet":
        raise ConfigError("--run: auto-decoding needs a hypernetwork run (learn_multi_mapper.py), not 'separate'")
    if encoder in trained:
        raise ConfigError(f"--encoder: '{encoder}' was trained in this run; auto-decoding is for unseen encoders")


def autodecode(cfg: Config, run_dir, encoder: str, weights: str | None = None) -> dict:
    model, names = load_model(run_dir)
    meta = io.read_json(run_dir / "model.json")
    trained = meta.get("trained", names)
    _check(model, names, trained, encoder)
    spec = parse_spec({"name": encoder, "weights": weights or cfg.image_weights})
    embed_training_data(cfg, extra_specs=[spec])
    cache = CachedFeatures(cfg.cache_path, [encoder])
    width = cache.width(encoder)
    if model.shape.direction == "image_to_text" and width > model.shape.image_width:
        raise ConfigError(f"--encoder: '{encoder}' is {width} wide; this run's connectors take at most "
                          f"{model.shape.image_width}")
    model.requires_grad_(False)
    ad = cfg.autodecode
    cond = torch.nn.Parameter(initial_cond(model, width, ad.init, cfg.train.seed).clone())
    optimizer = torch.optim.Adam([cond], lr=ad.lr)
    data = FeatureBatches(cache, [encoder], ad.batch_size, cfg.train.seed)
    probe = ZeroShotProbe(cfg, cfg.eval.datasets[0], [encoder], {encoder: spec.weights})
    step_flops = autodecode_step_flops(model, ad.batch_size)
    scales = model.source.scales_for(width)
    def top1() -> float:
        return probe.top1_of_params(model, model.source.generate(cond[None].detach(), scales), encoder)

    curve = [{"step": 0, "flops": 0, "samples": 0, "top1": top1()}]
    spent, samples, step = 0, 0, 0
    bar = tqdm(total=ad.steps, desc=f"autodecode {encoder}")
    while step < ad.steps and (not ad.samples or samples + ad.batch_size <= ad.samples) and \
            (not ad.flops or spent + step_flops <= ad.flops):
        image, text = data.batch(step, np.array([0]))
        image = F.pad(image, (0, model.shape.image_width - width))
        params = model.source.generate(cond[None], scales)
        a, b = project(model.shape, params, torch.tensor([width]), image, text)
        loss = clip_loss(a, b, model.logit_scale(), gather=False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step, spent, samples = step + 1, spent + step_flops, samples + ad.batch_size
        bar.update(1)
        if (ad.eval_every and step % ad.eval_every == 0) or step == ad.steps:
            curve.append({"step": step, "flops": spent, "samples": samples, "top1": top1(), "loss": float(loss)})
    bar.close()
    if curve[-1]["step"] != step:
        curve.append({"step": step, "flops": spent, "samples": samples, "top1": top1(), "loss": float(loss)})
    _save_into_run(run_dir, meta, encoder, width, spec.weights, cond.detach())
    result = {"encoder": encoder, "width": width, "init": ad.init, "steps": step, "samples": samples,
              "flops": spent, "top1": curve[-1]["top1"], "curve": curve,
              "dataset": cfg.eval.datasets[0]}
    ledger = FlopsLedger(run_dir)
    ledger.add("autodecode", spent, steps=step, samples=samples, parts={"per_step": step_flops})
    if ad.finetune_steps > 0:
        params = model.source.generate(cond[None].detach(), scales)
        result["finetune"] = finetune(cfg, model, params, width, data, probe, encoder, run_dir)
        ledger.add("autodecode", result["finetune"]["flops"], steps=ad.finetune_steps,
                   samples=ad.finetune_steps * ad.batch_size)
    ledger.save()
    io.write_json(run_dir / "autodecode" / f"{io.slug(encoder)}.json", result)
    return result


def finetune(cfg: Config, model: StitchModel, params, width: int, data: FeatureBatches, probe: ZeroShotProbe,
             encoder: str, run_dir) -> dict:
    """Optionally fine-tune the decoded connector's weights directly (the hypernetwork is not involved);
    saved as a plain connector at RUN_DIR/autodecode/<encoder>.finetuned.safetensors."""
    ad = cfg.autodecode
    params = [(w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()) for w, b in params]
    optimizer = torch.optim.Adam([t for pair in params for t in pair], lr=ad.finetune_lr)
    for step in range(ad.finetune_steps):
        image, text = data.batch(10_000_000 + step, np.array([0]))  # batches after the decoding ones
        image = F.pad(image, (0, model.shape.image_width - width))
        a, b = project(model.shape, params, torch.tensor([width]), image, text)
        loss = clip_loss(a, b, model.logit_scale(), gather=False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    connector = Connector.from_params(model.shape, [(w.detach(), b.detach()) for w, b in params], width)
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
