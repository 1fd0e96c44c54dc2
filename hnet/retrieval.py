"""Image <-> text retrieval R@1/5/10 through each encoder's connector, on any captioned shard set."""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from hnet.cache import TEXT, CachedFeatures, build_cache
from hnet.config import Config
from hnet.data.sources import shard_units
from hnet.model import StitchModel, project
from hnet.zoo import specs_for

KS = (1, 5, 10)


def recall_at_k(similarity: torch.Tensor, ks=KS) -> dict:
    """similarity[i, j] between query i and item j, the right item of query i being j = i."""
    target = similarity.diagonal().unsqueeze(1)
    rank = (similarity > target).sum(dim=1)  # 0 = the right item ranked first
    return {f"R@{k}": float((rank < k).float().mean()) * 100 for k in ks}


@torch.no_grad()
def retrieval_metrics(model: StitchModel, index: int, image: torch.Tensor, text: torch.Tensor) -> dict:
    width = int(model.widths[index])
    padded = F.pad(image.float(), (0, model.shape.image_width - width)).unsqueeze(0)
    params = model.source(torch.tensor([index], device=model.widths.device))
    a, b = project(model.shape, params, model.widths[index:index + 1], padded, text.float())
    b = b[0] if b.dim() == 3 else b
    sim = a[0] @ b.T
    return {"image_to_text": recall_at_k(sim), "text_to_image": recall_at_k(sim.T), "n": int(sim.shape[0])}


def evaluate_retrieval(cfg: Config, model: StitchModel, names: list[str], weights: dict[str, str]) -> dict:
    pattern = cfg.eval.retrieval
    root = cfg.cache_path / "eval" / f"retrieval_{hashlib.sha256(pattern.encode()).hexdigest()[:12]}"
    specs = specs_for(names, weights, cfg.image_weights)
    build_cache(root, shard_units(pattern), specs, cfg.text_encoder, batch_size=cfg.eval.batch_size,
                num_workers=cfg.data.num_workers)
    cache = CachedFeatures(root, names + [TEXT])
    text = torch.from_numpy(np.asarray(cache[TEXT], np.float32))
    return {n: retrieval_metrics(model, i, torch.from_numpy(np.asarray(cache[n], np.float32)), text)
            for i, n in enumerate(names)}
