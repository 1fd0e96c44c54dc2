"""Auto-decoding: connectors for an encoder the hypernetwork never saw, by optimising ONLY a new cond embedding.

Either side: a new image encoder (`--encoder`) is paired with the run's text encoders, a new text encoder
(`--text-encoder`, runs trained with several) with the run's image encoders; one new vector generates every one of
those pairs' connectors, and the loss is their mean. The hypernetwork (and logit scale) are frozen:
`requires_grad_(False)` and the optimiser holds nothing but the new embedding, so its weights stay bit-identical
(tests/test_autodecode.py checks). The budget is steps, samples or FLOPs, whichever runs out first; accuracy is
logged against FLOPs spent along the way. The embedding is saved into the run, so `evaluate.py` and
`connector_for()` treat the new encoder's pairs like trained ones.

Only the samples the budget uses are embedded with the new encoder (the first (steps + finetune_steps) x batch
training samples; the training cache's features when it already holds the encoder). Ledger of the run: the
decoding (and fine-tuning) steps in `autodecode`; the new encoder's forwards over those samples as an `embed` part
named after it; the zero-shot probes along the curve (connectors + logits over the eval set each call) and the
eval set's embedding for a new image encoder in `eval`, like every other evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from hnet import files
from hnet.config import Config, ConfigError
from hnet.data.cache import CachedFeatures, CacheError, cached_name, open_training_cache
from hnet.data.embed import build_cache
from hnet.data.features import FeatureBatches
from hnet.data.sources import first_samples_unit, prepare_shards, shard_units
from hnet.distributed import default_accelerator
from hnet.eval.zeroshot import ZeroShotProbe
from hnet.flops import (
    FlopsLedger,
    autodecode_step_flops,
    caption_sample,
    finetune_step_flops,
    forward_flops,
    text_flops_per_caption,
)
from hnet.models.connectors import Connector
from hnet.models.encoders import parse_spec, text_key
from hnet.models.losses import clip_loss
from hnet.models.pairs import pair_label
from hnet.models.stitch import StitchModel, project
from hnet.runs import add_encoder, load_model


@dataclass
class Side:
    """What is decoded: a new image (`text=False`) or text encoder, and the run's encoders it is paired with."""
    name: str
    text: bool
    width: int
    partners: list[str]  # the other side's encoders (present in the training cache), one pair each
    partner_index: list[int]  # their positions in the model's image (or text) encoders
    partner_widths: list[int]

    def pairs(self) -> list[tuple[str, str]]:
        return [(p, self.name) if self.text else (self.name, p) for p in self.partners]

    def widths(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(image widths, text widths) of the pairs."""
        mine = torch.full((len(self.partners),), self.width, device=device)
        theirs = torch.tensor(self.partner_widths, device=device)
        return (theirs, mine) if self.text else (mine, theirs)


def initial_cond(model: StitchModel, width: int, how: str, seed: int, text: bool = False,
                 decoded: tuple[str, ...] = ()) -> torch.Tensor:
    """The new vector's start: the mean of the trained ones (image or text side; `decoded` ones left out), of those
    of the same width, or random at their scale."""
    names = model.text_names if text else model.image_names
    keep = torch.tensor([n not in decoded for n in names])
    conds = (model.source.text_cond if text else model.source.cond).detach()[keep.to(model.source.cond.device)]
    widths = torch.tensor(model.text_encoder_widths if text else model.encoder_widths)[keep].to(conds.device)
    if how == "same_width":
        same = widths == width
        if same.any():
            return conds[same].mean(dim=0)
    if how == "random":
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(conds.shape[1], generator=gen).to(conds.device) * conds.std()
    return conds.mean(dim=0)


def pair_params(model: StitchModel, side: Side, cond: torch.Tensor):
    """The connectors of every pair of `side`, generated from the new vector `cond` and the partners' vectors."""
    source, n = model.source, len(side.partners)
    index = torch.tensor(side.partner_index, device=cond.device)
    if side.text:
        conds = source.combine(source.cond[index], cond.expand(n, -1))
    else:
        text = None if source.text_cond is None else source.text_cond[index]
        conds = source.combine(cond.expand(n, -1), text)
    widths, text_widths = side.widths(cond.device)
    scales = torch.cat([source.scales_for(int(w), int(t)) for w, t in zip(widths, text_widths)])
    return source.generate(conds, scales)


def _check(model: StitchModel, decoded: list[str], encoder: str, text: bool) -> None:
    """A hypernetwork run, a side it is conditioned on, and an encoder it did not train with (one decoded before
    may be decoded again)."""
    if model.method != "hypernet":
        raise ConfigError("--run: auto-decoding needs a hypernetwork run (learn_multi_mapper.py), not 'separate'")
    if text and model.source.text_cond is None:
        raise ConfigError("--text-encoder: this run was trained with one text encoder, so its hypernetwork is not "
                          "conditioned on the text side; train with several `text_encoders` to decode a new one")
    known = model.text_names if text else model.image_names
    if encoder in known and encoder not in decoded:
        flag = "--text-encoder" if text else "--encoder"
        raise ConfigError(f"{flag}: '{encoder}' was trained in this run; auto-decoding is for unseen encoders")


def _check_width(model: StitchModel, side: Side) -> None:
    shape = model.shape
    if side.text and side.width > shape.text_width:
        raise ConfigError(f"--text-encoder: '{side.name}' is {side.width} wide; this run's connectors take text of at "
                          f"most {shape.text_width}")
    if not side.text and side.width > shape.image_width:
        raise ConfigError(f"--encoder: '{side.name}' is {side.width} wide; this run's connectors take at most "
                          f"{shape.image_width}")


def autodecode(cfg: Config, run_dir, encoder: str, weights: str | None = None, accelerator=None,
               text: bool = False) -> dict:
    """Decode a cond embedding for image encoder `encoder` (or text encoder, `text=True`) on the accelerator's
    device. Every rank takes part in embedding; the main process decodes, writes the files and the ledger; the
    others wait and read its result."""
    accelerator = accelerator or default_accelerator(cfg)
    run_dir = Path(run_dir)
    model, names = load_model(run_dir)
    meta = files.read_json(run_dir / "model.json")
    # runs from before `autodecoded` was recorded: the names that did not train
    decoded = meta.get("autodecoded") or [n for n in meta["names"] if n not in meta.get("trained", meta["names"])]
    _check(model, decoded, encoder, text)
    ad = cfg.autodecode
    model = model.to(accelerator.device).requires_grad_(False)
    train_cache = open_training_cache(cfg, [])
    spec = None if text else parse_spec({"name": encoder, "weights": weights or cfg.image_weights})
    side = _side(model, train_cache, encoder, text, decoded)
    step_flops = autodecode_step_flops(model, ad.batch_size, len(side.partners))
    steps = planned_steps(ad, step_flops)
    data, embedded = decoding_data(cfg, spec or encoder, side, (steps + ad.finetune_steps) * ad.batch_size,
                                   train_cache, accelerator)
    _check_width(model, side)
    run_weights = meta.get("weights", {})
    probe = (ZeroShotProbe(cfg, cfg.eval.datasets[0], side.partners, run_weights, accelerator, texts=[encoder])
             if text else ZeroShotProbe(cfg, cfg.eval.datasets[0], [encoder], {encoder: spec.weights}, accelerator,
                                        texts=side.partners))
    out = run_dir / "autodecode" / f"{files.slug(encoder)}.json"
    if accelerator.is_main_process:
        ledger = FlopsLedger(run_dir)
        result = _decode(cfg, model, data, probe, side, steps, step_flops, run_dir, meta,
                         spec.weights if spec else "", ledger, tuple(decoded))
        result["embed"] = embedded
        ledger.charge("embed", text_key(encoder) if text else encoder, embedded["flops"], images=embedded["samples"],
                      cached=embedded["cached"])
        if not text:
            probe.charge_embedding(ledger)
        ledger.save()
        files.write_json(out, result)
    accelerator.wait_for_everyone()
    return files.read_json(out)


def _side(model: StitchModel, train_cache: CachedFeatures, encoder: str, text: bool, decoded: list[str]) -> Side:
    """The new encoder's partners: the other side's trained encoders (not `decoded` ones) whose training features the
    cache holds (width of the new encoder: filled in once its features are there)."""
    others = model.image_names if text else model.text_names
    widths = model.encoder_widths if text else model.text_encoder_widths
    has = lambda n: cached_name(train_cache.manifest, n if text else text_key(n)) is not None
    index = [i for i, n in enumerate(others) if has(n) and n not in decoded]
    if not index:
        raise CacheError(f"{train_cache.root}: holds none of the run's {'image' if text else 'text'} encoders")
    return Side(encoder, text, 0, [others[i] for i in index], index, [widths[i] for i in index])


def planned_steps(ad, step_flops: int) -> int:
    """Steps the budget allows: autodecode.steps, capped by .samples and .flops when they are set."""
    caps = [ad.steps]
    if ad.samples:
        caps.append(ad.samples // ad.batch_size)
    if ad.flops:
        caps.append(int(ad.flops // step_flops))
    return max(0, min(caps))


def _top1(model: StitchModel, probe: ZeroShotProbe, side: Side, params) -> dict[str, float]:
    """Zero-shot top-1 of each of the side's pairs, by pair name."""
    multi = side.text or len(model.text_names) > 1
    return {pair_label(image, text, multi): probe.top1_of_params(model, [(w[p:p + 1], b[p:p + 1]) for w, b in params],
                                                                  image, text)
            for p, (image, text) in enumerate(side.pairs())}


def _decode(cfg: Config, model: StitchModel, data: FeatureBatches, probe: ZeroShotProbe, side: Side, steps: int,
            step_flops: int, run_dir: Path, meta: dict, weights: str, ledger: FlopsLedger,
            decoded: tuple[str, ...] = ()) -> dict:
    ad, device = cfg.autodecode, probe.device
    start = initial_cond(model, side.width, ad.init, cfg.train.seed, side.text, decoded)
    cond = torch.nn.Parameter(start.clone().to(device))
    optimizer = torch.optim.Adam([cond], lr=ad.lr)
    probe_key = f"autodecode_probe/{probe.key}/{side.name}"

    def top1() -> dict[str, float]:
        probe.charge_heads(ledger, model, probe_key, len(side.partners))
        return _top1(model, probe, side, pair_params(model, side, cond.detach()))

    def point(step: int, scores: dict, **extra) -> dict:
        return {"step": step, "flops": step * step_flops, "samples": step * ad.batch_size,
                "top1": sum(scores.values()) / len(scores), "pairs_top1": scores, **extra}

    curve = [point(0, top1())]
    loss = torch.tensor(float("nan"))
    for step in tqdm(range(1, steps + 1), desc=f"autodecode {side.name}"):
        loss = _clip_step(model, pair_params(model, side, cond), data, step - 1, side, optimizer)
        if (ad.eval_every and step % ad.eval_every == 0) or step == steps:
            curve.append(point(step, top1(), loss=float(loss)))
    add_encoder(run_dir, meta, side.name, side.text, side.width, weights, cond.detach())
    spent = steps * step_flops
    ledger.charge("autodecode", f"decode/{side.name}", spent, steps=steps, samples=steps * ad.batch_size,
                  per_step=step_flops)
    result = {"encoder": side.name, "side": "text" if side.text else "image", "width": side.width, "init": ad.init,
              "steps": steps, "samples": steps * ad.batch_size, "flops": spent, "top1": curve[-1]["top1"],
              "pairs_top1": curve[-1]["pairs_top1"], "curve": curve, "dataset": cfg.eval.datasets[0],
              "device": str(cond.device), "features_device": str(probe.labels.device)}
    if ad.finetune_steps > 0:
        params = pair_params(model, side, cond.detach())
        result["finetune"] = finetune(cfg, model, params, side, data, probe, run_dir)
        probe.charge_heads(ledger, model, probe_key, len(side.partners))
        ledger.charge("autodecode", f"finetune/{side.name}", result["finetune"]["flops"], steps=ad.finetune_steps,
                      samples=ad.finetune_steps * ad.batch_size)
    return result


def _clip_step(model: StitchModel, params, data: FeatureBatches, micro_step: int, side: Side, optimizer):
    """One contrastive step over the side's pairs (loss: their mean) on the frozen model's device."""
    device = model.log_scale.device
    n = len(side.partners)
    if side.text:  # the run's image encoders, the new text encoder's captions
        image, text = data.batch(micro_step, np.arange(n), np.array([0]))
    else:  # the new image encoder, the run's text encoders' captions
        image, text = data.batch(micro_step, np.array([0]), np.arange(n))
        image = image.expand(n, -1, -1)
    text = text[0] if text.shape[0] == 1 else text
    # the batch is padded to its own widest encoder; the connectors take the run's D_max and T_max
    image = F.pad(image.to(device), (0, model.shape.image_width - image.shape[-1]))
    text = F.pad(text.to(device), (0, model.shape.text_width - text.shape[-1]))
    widths, text_widths = side.widths(device)
    a, b = project(model.shape, params, widths, text_widths, image, text)
    loss = clip_loss(a, b, model.logit_scale(), gather=False)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


class PrefixFeatures:
    """The first `count` samples of the training data, read the way FeatureBatches reads a cache: each name's
    features from the cache given for it (the new encoder's from a cache of only the samples the budget uses, or
    the training cache when it already holds the encoder)."""

    def __init__(self, sources: dict[str, CachedFeatures], count: int):
        self.count = count
        self.arrays = {name: cache[name] for name, cache in sources.items()}  # only rows < count are ever read
        self.widths = {name: cache.width(name) for name, cache in sources.items()}

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def width(self, name: str) -> int:
        return self.widths[name]


def decoding_data(cfg: Config, spec, side: Side, budget: int, train_cache: CachedFeatures,
                  accelerator) -> tuple[FeatureBatches, dict]:
    """Batches over the first `budget` training samples (all the decoding and fine-tuning steps use) for the side's
    pairs, and what embedding them with the new encoder costs: {samples, flops, cached}. Sets side.width."""
    count = min(max(budget, cfg.autodecode.batch_size), train_cache.count)
    key = text_key(side.name) if side.text else side.name
    cached = cached_name(train_cache.manifest, key) is not None
    new = train_cache if cached else _prefix_cache(cfg, spec, side.text, count, train_cache, accelerator)
    partners = [text_key(p) if not side.text else p for p in side.partners]
    features = PrefixFeatures({key: new} | {p: train_cache for p in partners}, count)
    images, texts = (side.partners, [side.name]) if side.text else ([side.name], side.partners)
    data = FeatureBatches(features, images, texts, cfg.autodecode.batch_size, cfg.train.seed)
    side.width = features.width(key)
    if side.text:
        per_caption = train_cache.manifest.get("flops_per_sample", {}).get(key) if cached else None
        if per_caption is None:
            per_caption = text_flops_per_caption(side.name, caption_sample(shard_units(prepare_shards(cfg))))
        flops = per_caption * count
    else:
        flops = forward_flops(side.name, count)
    return data, {"samples": count, "flops": int(flops), "cached": cached}


def _prefix_cache(cfg: Config, spec, text: bool, count: int, train_cache: CachedFeatures,
                  accelerator) -> CachedFeatures:
    """Embed the new encoder over exactly the first `count` training samples: one unit reading the shards in
    order and stopping there (later shards are never opened; small by construction, so not split over ranks)."""
    with accelerator.main_process_first():
        pattern = prepare_shards(cfg)
    unit = first_samples_unit(shard_units(pattern), count)
    name = spec if text else spec.name
    root = cfg.cache_path / "autodecode" / f"{files.slug(text_key(name) if text else name)}_first{count}"
    build_cache(root, [unit], [] if text else [spec], [name] if text else None,
                batch_size=cfg.data.embed_batch_size, num_workers=0, accelerator=accelerator)
    cache = CachedFeatures(root, [text_key(name) if text else name])
    if cache.keys() != train_cache.keys()[:count]:
        raise CacheError(f"{root}: its samples are not the first {count} of the training cache {cfg.cache_path}")
    return cache


def finetune(cfg: Config, model: StitchModel, params, side: Side, data: FeatureBatches, probe: ZeroShotProbe,
             run_dir) -> dict:
    """Optionally fine-tune the decoded connectors' weights directly (the hypernetwork is not involved); each
    pair's saved as a plain connector at RUN_DIR/autodecode/<pair>.finetuned.safetensors."""
    ad = cfg.autodecode
    params = [(w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()) for w, b in params]
    optimizer = torch.optim.Adam([t for pair in params for t in pair], lr=ad.finetune_lr)
    for step in range(ad.finetune_steps):
        _clip_step(model, params, data, 10_000_000 + step, side, optimizer)  # batches after the decoding ones
    widths, text_widths = side.widths("cpu")
    multi = side.text or len(model.text_names) > 1
    for p, (image, text) in enumerate(side.pairs()):
        one = [(w[p:p + 1].detach().cpu(), b[p:p + 1].detach().cpu()) for w, b in params]
        connector = Connector.from_params(model.shape, one, int(widths[p]), int(text_widths[p]))
        path = run_dir / "autodecode" / f"{files.slug(pair_label(image, text, multi))}.finetuned.safetensors"
        files.write_safetensors(path, connector.state_dict())
    n = len(side.partners)
    step_flops = finetune_step_flops(model.shape, n, ad.batch_size)
    scores = _top1(model, probe, side, [(w.detach(), b.detach()) for w, b in params])
    return {"steps": ad.finetune_steps, "flops": int(step_flops * ad.finetune_steps),
            "top1": sum(scores.values()) / len(scores), "pairs_top1": scores}


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
