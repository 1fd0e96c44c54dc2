"""Auto-decoding: connectors for an encoder the hypernetwork never saw, by optimising ONLY a new cond embedding.

Either side: a new image encoder (`--encoder`) is paired with the run's text encoders, a new text encoder
(`--text-encoder`, runs trained with several) with the run's image encoders; one new vector generates every one of
those pairs' connectors, and the loss is their mean. It trains through the run loop (hnet.train.loop.fit): the
model is the run's, with the new encoder's vector as one more row and its pairs added; what trains is a parameter
filter, that one row (every other tensor frozen, the other rows untouched), so the hypernetwork and logit scale stay
bit-identical. The budget is steps, samples or FLOPs, whichever runs out first; accuracy is logged against FLOPs
spent along the way. The vector is saved into the run, so `evaluate.py` and `connector_for()` treat the new
encoder's pairs like trained ones. Fine-tuning (optional) trains the decoded connectors' weights through the same
loop, as separate connectors started from the decoded ones.

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

from hnet import files, runs
from hnet.config import Config, ConfigError
from hnet.data.cache import CachedFeatures, CacheError, cached_name, open_training_cache
from hnet.data.features import FeatureBatches, PrefixFeatures, first_samples_cache
from hnet.data.sources import prepare_shards, shard_units
from hnet.distributed import default_accelerator
from hnet.eval.ranking import halves_top1, mean_halves
from hnet.eval.zeroshot import ZeroShotProbe
from hnet.flops import (
    FlopsLedger,
    autodecode_step_flops,
    caption_sample,
    charged_captions,
    finetune_step_flops,
    forward_flops,
    text_flops_per_caption,
)
from hnet.models.connectors import Connector
from hnet.models.encoders import parse_spec, text_key
from hnet.models.identity import image_identity, text_identity
from hnet.models.pairs import Pairs
from hnet.models.stitch import StitchModel
from hnet.runs import add_encoder, load_model
from hnet.train.loop import Plan, fit


@dataclass
class Side:
    """What is decoded: a new image (`text=False`) or text encoder, and the run's encoders it is paired with."""
    name: str
    text: bool
    width: int
    partners: list[str]  # the other side's encoders (present in the training cache), one pair each
    partner_index: list[int]  # their positions in the model's image (or text) encoders
    partner_widths: list[int]

    def keys(self) -> tuple[str, list[str]]:
        """Cache names of the new encoder's features and of its partners'."""
        if self.text:
            return text_key(self.name), list(self.partners)
        return self.name, [text_key(p) for p in self.partners]

    def pair_widths(self) -> list[tuple[int, int]]:
        """(image, text) widths of the side's pairs, in data order."""
        return [(w, self.width) if self.text else (self.width, w) for w in self.partner_widths]

    def encoders(self) -> tuple[list[str], list[str]]:
        """(image encoders, text encoders) of the side's pairs, in data order."""
        return (self.partners, [self.name]) if self.text else ([self.name], self.partners)


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
    device. Every rank embeds its share and trains (the batch split over ranks, as in a run); the main process
    writes the files and the ledger."""
    accelerator = accelerator or default_accelerator(cfg)
    run_dir = Path(run_dir)
    model, _ = load_model(run_dir)
    meta = files.read_json(run_dir / runs.MODEL)
    decoded = runs.decoded_encoders(meta)
    _check(model, decoded, encoder, text)
    ad = cfg.autodecode
    model = model.to(accelerator.device).requires_grad_(False)
    train_cache = open_training_cache(cfg, [])
    spec = None if text else parse_spec({"name": encoder, "weights": weights or cfg.image_weights})
    side = _side(model, train_cache, encoder, text, decoded)
    bound = autodecode_step_flops(model, ad.batch_size, len(side.partners), accelerator.num_processes)
    steps = planned_steps(ad, bound)  # at the padded widths: the new encoder's width is known once it is embedded
    features, embedded = decoding_features(cfg, spec or encoder, side, (steps + ad.finetune_steps) * ad.batch_size,
                                           train_cache, accelerator)
    _check_width(model, side)
    step_flops = autodecode_step_flops(model, ad.batch_size, len(side.partners), accelerator.num_processes,
                                       side.pair_widths())
    probe = (ZeroShotProbe(cfg, cfg.eval.datasets[0], side.partners, meta.get("weights", {}), accelerator,
                           texts=[encoder])
             if text else ZeroShotProbe(cfg, cfg.eval.datasets[0], [encoder], {encoder: spec.weights}, accelerator,
                                        texts=side.partners))
    ledger = FlopsLedger(run_dir)
    result = _decode(cfg, model, features, probe, side, steps, step_flops, ledger, tuple(decoded), accelerator)
    if ad.finetune_steps > 0:
        result["finetune"] = finetune(cfg, model, result.pop("params"), side, list(result["pairs_top1"]), features,
                                      probe, run_dir, ledger, accelerator, steps)
    result.pop("params", None)
    result["embed"] = embedded
    out = run_dir / runs.AUTODECODE / f"{files.slug(encoder)}.json"
    if accelerator.is_main_process:
        add_encoder(run_dir, meta, side.name, side.text, side.width, spec.weights if spec else "", result.pop("cond"))
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


def _curve_probe(probe: ZeroShotProbe, model: StitchModel, pairs: np.ndarray, key: str, step_flops: int,
                 batch: int, curve: list[dict]):
    """The loop's probe: each call appends a point (zero-shot top-1 of every pair of the side, and its mean) to
    `curve` and charges the scoring to the eval phase."""
    labels = model.labels()

    def point(step: int, loss: float, ledger: FlopsLedger) -> dict:
        probe.charge_heads(ledger, model, key, len(pairs))
        halves = [halves_top1(h) for h in probe.pair_hits(model, pairs)]
        scores = dict(zip([labels[p] for p in pairs], [h["all"] for h in halves]))
        mean = mean_halves(halves)
        extra = {"loss": float(loss)} if step else {}
        curve.append({"step": step, "flops": step * step_flops, "samples": step * batch,
                      "top1": sum(scores.values()) / len(scores), "top1_val": mean["val"], "top1_test": mean["test"],
                      "pairs_top1": scores, **extra})
        return {}
    return point


def _decode(cfg: Config, model: StitchModel, features: PrefixFeatures, probe: ZeroShotProbe, side: Side,
            steps: int, step_flops: int, ledger: FlopsLedger, decoded: tuple[str, ...], accelerator) -> dict:
    ad = cfg.autodecode
    start = initial_cond(model, side.width, ad.init, cfg.train.seed, side.text, decoded)
    decoding, pairs = model.with_encoder(side.name, side.width, side.text, start.to(model.log_scale.device),
                                         side.partner_index)
    decoding.requires_grad_(False)
    vectors = decoding.source.text_cond if side.text else decoding.source.cond
    vectors.requires_grad_(True)  # the parameter filter: only the new row is ever drawn (the others: untouched)
    images, texts = side.encoders()
    data = FeatureBatches(features, images, texts, ad.batch_size, cfg.train.seed, rank=accelerator.process_index,
                          world=accelerator.num_processes, pad_to=(model.shape.image_width, model.shape.text_width),
                          captions=cfg.data.captions)
    curve: list[dict] = []
    plan = Plan(decoding, data, steps, pairs, ad.lr, {"total": step_flops}, phase="autodecode",
                ledger_key=f"decode/{side.name}", seed=cfg.train.seed, slots=_slots(decoding, side),
                probe=_curve_probe(probe, decoding, pairs, f"autodecode_probe/{probe.key}/{side.name}", step_flops,
                                   ad.batch_size, curve),
                probe_every=ad.eval_every or steps, probe_at_start=True, desc=f"autodecode {side.name}")
    out = fit(plan, accelerator, ledger)
    row = decoding.encoder_row(side.name, side.text)
    with torch.no_grad():
        params = out["model"].source(torch.as_tensor(pairs, device=vectors.device))
    spent = steps * step_flops
    return {"encoder": side.name, "side": "text" if side.text else "image", "width": side.width, "init": ad.init,
            "steps": steps, "samples": steps * ad.batch_size, "flops": spent, "top1": curve[-1]["top1"],
            "pairs_top1": curve[-1]["pairs_top1"], "curve": curve, "dataset": cfg.eval.datasets[0],
            "device": str(vectors.device), "features_device": str(probe.labels.device),
            "world": accelerator.num_processes,
            "cond": vectors.detach()[row].cpu().clone(), "params": params}


def _slots(model: StitchModel, side: Side) -> tuple[np.ndarray, np.ndarray]:
    """Model encoder index -> position in the decoding data (the new encoder first on its side, then partners)."""
    image, text = np.full(len(model.image_names), -1), np.full(len(model.text_names), -1)
    mine, theirs = (text, image) if side.text else (image, text)
    mine[model.encoder_row(side.name, side.text)] = 0
    theirs[side.partner_index] = np.arange(len(side.partners))
    return image, text


def decoding_features(cfg: Config, spec, side: Side, budget: int, train_cache: CachedFeatures,
                      accelerator) -> tuple[PrefixFeatures, dict]:
    """The first `budget` training samples (all the decoding and fine-tuning steps use) of the side's encoders, and
    what embedding them with the new encoder costs: {samples, flops, cached}. Sets side.width."""
    count = min(max(budget, cfg.autodecode.batch_size), train_cache.count)
    key, partners = side.keys()
    entry = train_cache.manifest["encoders"].get(cached_name(train_cache.manifest, key) or key, {})
    identity = text_identity(side.name) if side.text else image_identity(spec)
    cached = bool(entry) and entry.get("identity") in (None, identity)  # this encoder's, not a namesake's
    new = train_cache if cached else first_samples_cache(cfg, spec, side.text, count, train_cache, accelerator)
    features = PrefixFeatures({key: new} | {p: train_cache for p in partners}, count)
    side.width = features.width(key)
    if side.text:
        per_caption = train_cache.manifest.get("flops_per_sample", {}).get(key) if cached else None
        if per_caption is None:
            per_caption = text_flops_per_caption(side.name, caption_sample(shard_units(prepare_shards(cfg))))
        captions = charged_captions(cfg, int(features.caption_counts().sum()), count)
        flops = per_caption * captions
    else:
        captions, flops = 0, forward_flops(side.name, count)
    return features, {"samples": count, "captions": captions, "flops": int(flops), "cached": cached}


def finetune(cfg: Config, model: StitchModel, params, side: Side, names: list[str], features: PrefixFeatures,
             probe: ZeroShotProbe, run_dir, ledger: FlopsLedger, accelerator, decoded_steps: int) -> dict:
    """Fine-tune the decoded connectors' weights directly (the hypernetwork is not involved), through the run loop
    as separate connectors started from the decoded ones (sharing the run's frozen logit scale); each pair's saved
    as a plain connector at RUN_DIR/autodecode/<pair>.finetuned.safetensors. `names`: the pairs' names."""
    ad, n = cfg.autodecode, len(side.partners)
    images, texts = side.encoders()
    if side.text:
        widths, text_widths, cells = side.partner_widths, [side.width], [[p, 0] for p in range(n)]
    else:
        widths, text_widths, cells = [side.width], side.partner_widths, [[0, p] for p in range(n)]
    connectors = model.separate_from(params, widths, text_widths, Pairs.from_list(cells), (images, texts))
    data = FeatureBatches(features, images, texts, ad.batch_size, cfg.train.seed, rank=accelerator.process_index,
                          world=accelerator.num_processes, pad_to=(model.shape.image_width, model.shape.text_width),
                          captions=cfg.data.captions)
    step_flops = finetune_step_flops(model.shape, n, ad.batch_size, accelerator.num_processes)
    plan = Plan(connectors, data, ad.finetune_steps, np.arange(n), ad.finetune_lr, {"total": step_flops},
                phase="autodecode", ledger_key=f"finetune/{side.name}", seed=cfg.train.seed,
                first_micro_step=decoded_steps, desc=f"finetune {side.name}")  # the batches decoding did not use
    tuned = fit(plan, accelerator, ledger)["model"]
    if accelerator.is_main_process:
        with torch.no_grad():
            params = tuned.source(torch.arange(n, device=tuned.widths.device))
        for p, name in enumerate(names):
            one = [(w[p:p + 1].detach().cpu(), b[p:p + 1].detach().cpu()) for w, b in params]
            connector = Connector.from_params(model.shape, one, int(tuned.widths[p]), int(tuned.text_widths[p]))
            files.write_safetensors(run_dir / runs.AUTODECODE / f"{files.slug(name)}.finetuned.safetensors",
                                    connector.state_dict())
    probe.charge_heads(ledger, model, f"autodecode_probe/{probe.key}/{side.name}", n)
    scores = dict(zip(names, probe.top1(tuned, np.arange(n))))
    return {"steps": ad.finetune_steps, "flops": int(step_flops * ad.finetune_steps),
            "top1": sum(scores.values()) / len(scores), "pairs_top1": scores}


def compare_to_separate(result: dict, separate_curve: list[dict]) -> dict:
    """Auto-decoding vs a separate connector trained from scratch on the same encoder, along both accuracy-vs-FLOPs
    curves (training FLOPs).

    `separate_curve`: [{"flops", "top1", "top1_val", "top1_test"}] along the baseline's training. The lead figures
    (`validated`) choose each curve's point on validation images (evaluation half A) and report it on test images
    (half B): the auto-decoding's point and the baseline's best stopping point, each one's test top-1 at the other's
    FLOPs, and the FLOPs the baseline needs to reach the auto-decoded accuracy (on validation). The figures against
    the baseline's whole (possibly overtrained) run stay as secondary ones.
    """
    flops, top1 = result["flops"], result["top1"]
    at_equal = [p["top1"] for p in separate_curve if p["flops"] <= flops]
    reached = [p["flops"] for p in separate_curve if p["top1"] >= top1]
    final = separate_curve[-1]
    out = {"autodecode_top1": top1, "autodecode_flops": flops,
           "separate_top1_at_equal_flops": at_equal[-1] if at_equal else None,
           "separate_flops_to_equal_top1": reached[0] if reached else None,
           "flops_ratio_to_equal_top1": (reached[0] / flops) if reached and flops else None,
           "separate_final_top1": final["top1"], "separate_total_flops": final["flops"],
           "fraction_of_separate_top1": top1 / final["top1"] if final["top1"] else None,
           "separate_total_flops_ratio": final["flops"] / flops if flops else None}
    if "top1_val" in final and "top1_val" in result["curve"][-1]:
        out["validated"] = validated_comparison(result["curve"], separate_curve)
    return out


def validated_comparison(decoding: list[dict], separate: list[dict]) -> dict:
    """Both curves' points chosen on validation top-1 (`top1_val`), reported on test top-1 (`top1_test`)."""
    chosen = lambda curve: max(curve, key=lambda p: (p["top1_val"], -p["flops"]))  # best, earliest of ties
    at_most = lambda curve, f: ([p for p in curve if p["flops"] <= f] or [None])[-1]
    test = lambda p: None if p is None else p["top1_test"]
    mine, best = chosen(decoding), chosen(separate)
    reach = next((p for p in separate if p["top1_val"] >= mine["top1_val"]), None)
    return {"autodecode": {k: mine[k] for k in ("step", "flops", "top1_val", "top1_test")},
            "separate_best": {k: best[k] for k in ("flops", "top1_val", "top1_test")},
            "separate_test_top1_at_autodecode_flops": test(at_most(separate, mine["flops"])),
            "autodecode_test_top1_at_separate_best_flops": test(at_most(decoding, best["flops"])),
            "separate_flops_to_autodecode_accuracy": None if reach is None else reach["flops"],
            "separate_test_top1_there": test(reach),
            "flops_ratio_at_equal_accuracy": None if reach is None or not mine["flops"] else
            reach["flops"] / mine["flops"]}
