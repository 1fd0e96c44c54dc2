"""Typed run configuration: dataclasses <- YAML file <- `key.sub=value` overrides.

Every error names the offending field (and suggests the nearest valid one), so a mistyped flag fails in one
clear line before anything is written.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hnet.text_folders import register_text_folders, text_entry_name
from hnet.typed_yaml import ConfigError as ConfigError  # raised by the binding; every module imports it from here
from hnet.typed_yaml import build, merge, parse_overrides, suggest

NAMED_DATASETS = ("demo", "cifar10", "cifar100", "imagenet")
RECALL_KS = (1, 5, 10)  # retrieval reports R@K at these K
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def dataset_name(spec: str) -> str:
    """The name results are stored under (eval.json) for an eval.datasets entry: NAME of NAME=PATH, or the name."""
    return spec.partition("=")[0].strip()


def parse_dataset_spec(spec: str, where: str) -> tuple[str, str]:
    """(name, path) of a zero-shot data set spec: `NAME=PATH`, or a known name with path "" (from eval.<name>)."""
    name, sep, path = spec.partition("=")
    name, path = name.strip(), path.strip()
    if not sep:
        if name not in NAMED_DATASETS:
            raise ConfigError(f"{where}: unknown dataset '{name}'{suggest(name, NAMED_DATASETS)}; give NAME=PATH "
                              f"for a data set folder (known names: {', '.join(NAMED_DATASETS)})")
        return name, ""
    if not DATASET_NAME.fullmatch(name) or name == "demo":
        raise ConfigError(f"{where}: '{spec}': NAME in NAME=PATH must be letters, digits, '_', '.', '-' (not demo)")
    if not path:
        raise ConfigError(f"{where}: '{spec}': empty PATH in NAME=PATH")
    return name, path


@dataclass
class DataConfig:
    source: str = "demo"  # demo | cc595k
    metadata: str = ""  # 595k metadata.json (or chat.json); used to build shards when `shards` does not exist yet
    images: str = ""  # 595k images folder
    shards: str = ""  # brace pattern, e.g. data/shards/{000000..000599}.tar
    shard_size: int = 1000
    cache_dir: str = ""  # embedding cache; default <out_root>/cache/<name>
    demo_samples: int = 2000  # built-in data: training pairs
    demo_eval_samples: int = 400  # built-in data: held-out zero-shot images
    demo_image_size: int = 64
    embed_batch_size: int = 64
    num_workers: int = 0
    shuffle_pairs: bool = False  # control run: captions shuffled against images
    captions: str = "all"  # images with several captions: all (one drawn per step) | first (only the first)
    samples_per_encoder: int = 0  # >0: embed and train on only the first N pairs (a search budget)


@dataclass
class ConnectorConfig:
    kind: str = "linear"  # linear | mlp | moe
    depth: int = 2  # mlp only: number of layers
    hidden: int = 1024  # mlp only: hidden width
    direction: str = "image_to_text"  # image_to_text | text_to_image
    experts: int = 4  # moe: E experts of kind expert_kind (linear | mlp), top_k of them per sample
    top_k: int = 2
    expert_kind: str = "mlp"
    balance_alpha: float = 0.01  # moe: Switch balance loss coefficient
    z_loss: float = 0.0  # moe: router z-loss coefficient


@dataclass
class HypernetConfig:
    cond_dim: int = 32  # per image encoder
    text_cond_dim: int = 16  # per text encoder (runs with several text encoders)
    hidden: int = 256
    chunk_size: int = 4096
    layer_emb_dim: int = 16
    chunk_emb_dim: int = 16


@dataclass
class TrainConfig:
    batch_size: int = 512
    encoders_per_step: int = 0  # 0 = all encoders every step, else k of N sampled per step
    local_loss: bool = False  # multi-process: each rank computes only its B_local x B_global logits (open_clip)
    epochs: float = 20
    max_steps: int = 0  # >0 caps the step count
    lr: float = 1e-2
    weight_decay: float = 0.0
    warmup_steps: int = 500
    grad_clip: float = 1.0
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16 (GPU)
    logit_scale: str = "learnable"  # learnable | fixed
    logit_scale_init: float = 14.285714  # CLIP init 1/0.07; use 100 with `fixed` to match the research code
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 200
    eval_every: int = 0  # >0: zero-shot top-1 on eval.datasets[0] every N steps, logged against FLOPs spent
    resume: str = ""  # "" | latest | path to a checkpoint folder
    overfit_batches: int = 0  # >0: train on this many fixed batches (diagnostic)
    tracker: str = ""  # "" | tensorboard | wandb
    nonfinite: str = "stop"  # stop | skip


@dataclass
class AutodecodeConfig:
    steps: int = 100  # budget in optimizer steps (the first of steps/samples/flops to run out ends it)
    samples: int = 0  # >0: budget in training samples
    flops: float = 0  # >0: budget in FLOPs (forward + backward, the ledger's convention)
    lr: float = 1e-2
    batch_size: int = 256
    init: str = "mean"  # mean | same_width | random
    eval_every: int = 10  # zero-shot top-1 every N steps (0 = only at the end)
    finetune_steps: int = 0  # >0: then fine-tune the decoded connector's weights directly for N steps
    finetune_lr: float = 1e-3


@dataclass
class SearchConfig:
    """The hypernetwork's search budget (scripts/search.py); `train` keeps the full settings that a grid search of
    separate connectors (APE) would use, from which the grid search's cost is estimated."""
    steps: int = 0  # hypernetwork optimizer steps (0 = train's full schedule)
    encoders_per_step: int = 0  # k of N encoders per step (0 = all)
    samples_per_encoder: int = 0  # training pairs embedded and used per encoder (0 = all)
    lr: float = 0  # the hypernetwork's learning rate at search (0 = train.lr)
    dataset: str = ""  # zero-shot set the ranking is scored on ("" = eval.datasets[0])
    grid_batch_size: int = 0  # the batch the grid search's separate runs use (0 = train.batch_size)
    truth_seeds: int = 3  # rankings are scored against this many grid searches from seeds no method uses
    # --method: hypernet (one run at the budget above) | halving (successive halving of separate connectors) |
    # hypernet-halving (one hypernetwork per rung over the survivors) | proxy (a training-free score)
    method: str = "hypernet"
    eta: int = 3  # halving: each rung keeps the best 1/eta of the pairs and grows samples and steps by eta
    rung_samples: int = 256  # halving: training samples of rung 0 (every encoder embeds them)
    rung_steps: int = 20  # halving: optimizer steps of rung 0
    val_samples: int = 500  # halving: held-out SEARCH samples (the first ones) that rung decisions are scored on
    captions: str = "first"  # halving / proxy: captions embedded per image (first: one; all: every caption)
    weight_decay: float = -1.0  # the searcher's weight decay (< 0: train.weight_decay)
    # halving: learning rates each rung's learner tries; the one with the best mean retrieval on the held-out search
    # samples (never evaluation images) decides the rung, and every try is charged ([]: search.lr / train.lr)
    lrs: list[float] = field(default_factory=list)
    # halving: a training-free proxy (linear_cka | mutual_knn | ridge_retrieval) on the held-out search samples keeps
    # the best 1/eta of the pairs before rung 0 ("": none); charged its own FLOPs (those samples are embedded anyway)
    prefilter: str = ""
    proxy: str = "ridge_retrieval"  # --method proxy: linear_cka | mutual_knn | ridge_retrieval
    proxy_samples: int = 1000  # --method proxy: training samples each encoder embeds


@dataclass
class EvalConfig:
    # names (demo, cifar10, cifar100, imagenet: folder in eval.<name>) or NAME=PATH specs, layout detected
    datasets: list[str] = field(default_factory=lambda: ["demo"])
    templates: str = "auto"  # auto (the data set's own, else cifar/imagenet/one by data set) | one | cifar | imagenet
    cifar10: str = ""  # ImageFolder root or torchvision's cifar-10-batches-py folder
    cifar100: str = ""
    imagenet: str = ""  # ImageFolder val root with wnid folders (all 1000 or a subset)
    # shard pattern of a captioned set (one caption per image), or a captions JSON (COCO captions_*.json or a
    # Karpathy split) with eval.retrieval_images: image<->text R@1/5/10
    retrieval: str = ""
    retrieval_images: str = ""  # images folder of a captions JSON
    retrieval_split: str = "test"  # Karpathy split JSON: which split's images
    max_images: int = 0  # >0: evaluate on the first N images only
    batch_size: int = 256
    longtail: bool = True  # per-class accuracy by training-caption count: > many | few..many | < few (docs)
    longtail_many: int = 100
    longtail_few: int = 20
    linear_probe: list[str] = field(default_factory=list)  # NAME=PATH folders with train/ and test/ (--linear-probe)
    probe_l2: list[float] = field(default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1])  # L2 grid
    probe_val_fraction: float = 0.2  # of each class's train images, held out to choose the L2 weight
    probe_steps: int = 100  # full-batch L-BFGS iterations per fit


@dataclass
class Config:
    name: str = "run"
    out_root: str = "runs"
    encoders: Any = field(default_factory=list)  # list of names/dicts, or a path to configs/encoders/*.yaml
    image_weights: str = "pretrained"  # pretrained | random; per-encoder `weights:` overrides
    text_encoder: str = "all-MiniLM-L6-v2"  # the one-element case of `text_encoders`
    # several: every (image, text) pair is stitched; an entry is a name (hub name, options after @) or
    # {name: NAME, path: DIR}, a local sentence-transformers folder known by NAME (a hub name and its copy are one)
    text_encoders: list[Any] = field(default_factory=list)
    held_out: str = ""  # pipeline: an encoder of `encoders` left out of the hypernetwork and auto-decoded after
    held_out_pairs: list[str] = field(default_factory=list)  # "IMAGE + TEXT" pairs the hypernetwork never trains
    method: str = "hypernet"  # hypernet | separate (set by the script)
    device: str = ""  # "" = accelerate's choice
    data: DataConfig = field(default_factory=DataConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    hypernet: HypernetConfig = field(default_factory=HypernetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    autodecode: AutodecodeConfig = field(default_factory=AutodecodeConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_root) / f"{self.name}_{self.method}"

    @property
    def texts(self) -> list[str]:
        """The run's text encoders' names: `text_encoders`, else the one `text_encoder`."""
        return [text_entry_name(t) for t in self.text_encoders] or [self.text_encoder]

    @property
    def cache_root(self) -> Path:
        """The data's caches: training features of all samples, and `eval/` for zero-shot and retrieval sets."""
        return Path(self.data.cache_dir) if self.data.cache_dir else Path(self.out_root) / "cache" / self.data.source

    @property
    def cache_path(self) -> Path:
        """This run's training features: all samples, or only the first `data.samples_per_encoder`."""
        m = self.data.samples_per_encoder
        return self.cache_root / f"first_{m}" if m > 0 else self.cache_root


CHOICES = {
    "data.source": ("demo", "cc595k"),
    "data.captions": ("all", "first"),
    "search.method": ("hypernet", "halving", "hypernet-halving", "proxy"),
    "search.captions": ("all", "first"),
    "search.proxy": ("linear_cka", "mutual_knn", "ridge_retrieval"),
    "search.prefilter": ("", "linear_cka", "mutual_knn", "ridge_retrieval"),
    "connector.kind": ("linear", "mlp", "moe"),
    "connector.expert_kind": ("linear", "mlp"),
    "connector.direction": ("image_to_text", "text_to_image"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "train.logit_scale": ("learnable", "fixed"),
    "train.tracker": ("", "tensorboard", "wandb"),
    "train.nonfinite": ("stop", "skip"),
    "eval.templates": ("auto", "one", "cifar", "imagenet"),
    "autodecode.init": ("mean", "same_width", "random"),
    "image_weights": ("pretrained", "random"),
    "method": ("hypernet", "separate"),
}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **fixed) -> Config:
    """Load YAML (if given), apply `key=value` overrides, then `fixed` top-level values (e.g. method=...)."""
    tree: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {path}: not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"--config {path}: expected a mapping at top level")
    tree = merge(tree, parse_overrides(overrides or []))
    tree.update({k: v for k, v in fixed.items() if v is not None})
    cfg = build(Config, tree, CHOICES)
    _validate(cfg)
    return cfg


def _validate(cfg: Config) -> None:
    for where, value in (("data.samples_per_encoder", cfg.data.samples_per_encoder),
                         ("search.samples_per_encoder", cfg.search.samples_per_encoder),
                         ("search.steps", cfg.search.steps), ("search.encoders_per_step", cfg.search.encoders_per_step),
                         ("search.grid_batch_size", cfg.search.grid_batch_size),
                         ("search.val_samples", cfg.search.val_samples),
                         ("train.encoders_per_step", cfg.train.encoders_per_step)):
        if value < 0:
            raise ConfigError(f"{where}: must be >= 0, got {value}")
    positive = {"train.batch_size": cfg.train.batch_size, "train.grad_accum": cfg.train.grad_accum,
                "hypernet.cond_dim": cfg.hypernet.cond_dim,
                "hypernet.text_cond_dim": cfg.hypernet.text_cond_dim, "hypernet.chunk_size": cfg.hypernet.chunk_size,
                "connector.hidden": cfg.connector.hidden, "data.shard_size": cfg.data.shard_size,
                "search.truth_seeds": cfg.search.truth_seeds, "search.rung_samples": cfg.search.rung_samples,
                "search.rung_steps": cfg.search.rung_steps, "search.proxy_samples": cfg.search.proxy_samples}
    for where, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{where}: must be > 0, got {value}")
    if any(lr <= 0 for lr in cfg.search.lrs):
        raise ConfigError(f"search.lrs: every learning rate must be > 0, got {cfg.search.lrs}")
    if twice := [lr for i, lr in enumerate(cfg.search.lrs) if lr in cfg.search.lrs[:i]]:
        raise ConfigError(f"search.lrs: {twice[0]:g} is listed twice (each try is one run)")
    if cfg.search.eta < 2:
        raise ConfigError(f"search.eta: successive halving keeps 1/eta of the pairs per rung, needs eta >= 2, got "
                          f"{cfg.search.eta}")
    c = cfg.connector
    if "mlp" in (c.kind, c.expert_kind if c.kind == "moe" else "") and c.depth < 2:
        raise ConfigError(f"connector.depth: an mlp connector needs depth >= 2, got {c.depth}")
    if c.kind == "moe" and not 1 <= c.top_k <= c.experts:
        raise ConfigError(f"connector.top_k: needs 1 <= top_k <= experts ({c.experts}), got {c.top_k}")
    if cfg.train.lr <= 0:
        raise ConfigError(f"train.lr: must be > 0, got {cfg.train.lr}")
    _validate_texts(cfg)
    _validate_eval(cfg.eval)


def _validate_texts(cfg: Config) -> None:
    names = cfg.texts if cfg.text_encoders else []
    twice = sorted({t for t in names if names.count(t) > 1})
    if twice:
        raise ConfigError(f"text_encoders: listed twice: {twice}")
    default = Config.text_encoder
    if names and cfg.text_encoder not in (default, *names):
        raise ConfigError(f"text_encoder: '{cfg.text_encoder}' is not one of text_encoders {names}; set "
                          f"one of the two (text_encoders wins)")
    for i, name in enumerate(names):
        if "=" in name and "@" not in name:
            raise ConfigError(f"text_encoders[{i}]: '{name}' is an option without its encoder: a list split it off "
                              f"at a comma; quote specs with several options, e.g. [\"A@layers=3,pool=cls\"]")
    register_text_folders(cfg.text_encoders)


def _validate_eval(ev: EvalConfig) -> None:
    # bare names are checked when a data set is loaded (other tools keep their own lists in eval.datasets)
    names = [parse_dataset_spec(spec, f"eval.datasets[{i}]")[0] if "=" in spec else spec
             for i, spec in enumerate(ev.datasets)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"eval.datasets: dataset name(s) {twice} given twice")
    if ev.retrieval.endswith(".json") and not ev.retrieval_images:
        raise ConfigError("eval.retrieval_images: required with a captions file in eval.retrieval (the images folder)")
    _validate_probes(ev)
    if ev.max_images < 0 or ev.batch_size <= 0:
        raise ConfigError(f"eval.max_images / eval.batch_size: must be >= 0 / > 0, got {ev.max_images} / "
                          f"{ev.batch_size}")


def _validate_probes(ev: EvalConfig) -> None:
    for i, spec in enumerate(ev.linear_probe):  # a labelled folder with train/ and test/: always NAME=PATH
        parse_dataset_spec(spec if "=" in spec else f"{spec}=", f"eval.linear_probe[{i}]")
    for where, value, ok, need in (
            ("eval.longtail_few", ev.longtail_few, 0 <= ev.longtail_few <= ev.longtail_many, ">= 0, <= longtail_many"),
            ("eval.probe_l2", ev.probe_l2, ev.probe_l2 and min(ev.probe_l2) >= 0, "a non-empty list of values >= 0"),
            ("eval.probe_val_fraction", ev.probe_val_fraction, 0 < ev.probe_val_fraction < 1, "in (0, 1)"),
            ("eval.probe_steps", ev.probe_steps, ev.probe_steps > 0, "> 0")):
        if not ok:
            raise ConfigError(f"{where}: must be {need}, got {value}")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
