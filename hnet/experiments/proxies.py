"""Training-free proxies for how well an image encoder will stitch to a text encoder, from paired features alone.

Each proxy scores one encoder from its image features X [n, d] and the caption features Y [n, t] of the same n
pairs; a higher score should mean a better connector. They are the cheap baselines a search must beat:
- `linear_cka`: linear centred kernel alignment between X and Y (Kornblith et al. 2019; freeze-align uses it).
- `mutual_knn`: mean overlap of each sample's k nearest neighbours in X and in Y (Huh et al. 2024).
- `ridge_retrieval`: a closed-form ridge map X -> Y fitted on half the pairs, scored by caption retrieval
  top-1 on the other half (no gradient steps; one d x d solve).
hnet.flops.proxy_flops gives what computing them costs, for the ledger.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hnet.data.cache import CachedFeatures, caption_offsets
from hnet.flops import proxy_flops
from hnet.models.encoders import text_key

PROXIES = ("linear_cka", "mutual_knn", "ridge_retrieval")


def _centered(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x - x.mean(dim=0, keepdim=True)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred features: 1 = same geometry up to rotation/scale."""
    x, y = _centered(x), _centered(y)
    cross = (y.T @ x).pow(2).sum()
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()))


def knn_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """[n, k] indices of each row's k nearest other rows by cosine similarity."""
    x = F.normalize(x.float(), dim=-1)
    sim = x @ x.T
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(k, dim=1).indices


def mutual_knn(x: torch.Tensor, y: torch.Tensor, k: int = 10) -> float:
    """Mean fraction of shared neighbours between the image-space and caption-space k-NN graphs."""
    k = min(k, len(x) - 1)
    nx, ny = knn_indices(x, k), knn_indices(y, k)
    shared = (nx.unsqueeze(2) == ny.unsqueeze(1)).any(dim=2).sum(dim=1)
    return float(shared.float().mean() / k)


def ridge_retrieval(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> float:
    """Caption retrieval top-1 (%) on the second half of the pairs, through W = argmin ||X W - Y||^2 + alpha ||W||^2
    fitted on the first half."""
    x, y = x.double(), F.normalize(y.double(), dim=-1)
    half = len(x) // 2
    fit_x, fit_y = x[:half], y[:half]
    mean = fit_x.mean(dim=0, keepdim=True)
    fit_x = fit_x - mean
    gram = fit_x.T @ fit_x + alpha * torch.eye(x.shape[1], dtype=x.dtype)
    weight = torch.linalg.solve(gram, fit_x.T @ fit_y)
    mapped = F.normalize((x[half:] - mean) @ weight, dim=-1)
    hits = (mapped @ y[half:].T).argmax(dim=1) == torch.arange(len(mapped))
    return float(hits.double().mean()) * 100


def score(name: str, x: torch.Tensor, y: torch.Tensor) -> float:
    if name not in PROXIES:
        raise ValueError(f"unknown proxy '{name}' (known: {', '.join(PROXIES)})")
    return {"linear_cka": linear_cka, "mutual_knn": mutual_knn, "ridge_retrieval": ridge_retrieval}[name](x, y)


def score_pairs(name: str, cache: CachedFeatures, images: list[str], texts: list[str]
                ) -> tuple[dict[tuple[str, str], float], float]:
    """Proxy `name` of every (image encoder, text encoder) pair on a cache's samples (each image's first caption),
    and the FLOPs of computing them all."""
    first = caption_offsets(cache.caption_counts())
    scores, flops = {}, 0.0
    for text in texts:
        y = torch.from_numpy(np.asarray(cache[text_key(text)][first], np.float32))
        for image in images:
            x = torch.from_numpy(np.asarray(cache[image][:], np.float32))
            scores[image, text] = score(name, x, y)
            flops += proxy_flops(name, len(x), x.shape[1], y.shape[1])
    return scores, flops
