"""Training batches from the memory-mapped embedding cache: shuffled images, image features padded to the widest
image encoder, caption embeddings to the widest text encoder. An image with several captions contributes one of them
per step, drawn afresh every step (an epoch is a pass over images, so no batch holds two captions of one image as
each other's negatives).

Memory stays flat with the data set size: only the rows of the current batch are read from the memmaps.
The batch order and the caption draws are pure functions of (seed, micro-step), so a resumed run sees exactly the
same batches.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from hnet import files
from hnet.config import Config, ConfigError
from hnet.data.cache import CachedFeatures, CacheError, caption_offsets
from hnet.data.embed import build_cache
from hnet.data.sources import first_samples_unit, prepare_shards, shard_units
from hnet.models.encoders import TEXT_PREFIX, text_key


class FeatureBatches:
    def __init__(self, cache: CachedFeatures, names: list[str], texts: list[str], batch_size: int, seed: int = 0,
                 shuffle_pairs: bool = False, overfit_batches: int = 0, rank: int = 0, world: int = 1,
                 pad_to: tuple[int, int] | None = None, captions: str = "all"):
        """`pad_to`: (D_max, T_max) of a model whose encoders are more than these (default: these' widest).
        `captions`: "all" (one of each image's captions per step) or "first" (always its first caption)."""
        self.images = [cache[n] for n in names]
        self.widths = [cache.width(n) for n in names]
        self.texts = [cache[text_key(t)] for t in texts]
        self.text_widths = [cache.width(text_key(t)) for t in texts]
        self.count = cache.count
        if batch_size > self.count:
            raise ConfigError(f"train.batch_size: {batch_size} is larger than the data ({self.count} samples)")
        if batch_size % world:
            raise ConfigError(f"train.batch_size: {batch_size} does not split over {world} processes")
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.overfit_batches = overfit_batches
        self.pad_to = pad_to or (max(self.widths), max(self.text_widths))
        # control run: every image keeps one fixed, wrong caption (a derangement-like permutation)
        self.text_rows = np.random.default_rng(seed + 7).permutation(self.count) if shuffle_pairs else None
        if captions not in ("all", "first"):
            raise ConfigError(f"data.captions: expected all or first, got {captions!r}")
        counts = cache.caption_counts()[: self.count]
        self.caption_counts = counts if captions == "all" else np.ones_like(counts)
        self.caption_offsets = caption_offsets(counts)
        self._perm_epoch, self._perm = -1, None

    @property
    def steps_per_epoch(self) -> int:
        return self.count // self.batch_size

    def indices(self, micro_step: int) -> np.ndarray:
        """Global sample indices of a micro-step (all ranks), in a per-epoch shuffled order."""
        if self.overfit_batches:
            micro_step %= self.overfit_batches
        epoch, pos = divmod(micro_step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.count)
            self._perm_epoch = epoch
        return self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]

    def caption_rows(self, micro_step: int, images: np.ndarray) -> np.ndarray:
        """The caption row drawn for each image of a micro-step's global batch (`images` in batch order): uniform
        over that image's captions, seeded by (seed, micro-step) and the position in the batch, so every rank
        draws the same captions whatever its share."""
        if self.overfit_batches:
            micro_step %= self.overfit_batches
        counts = self.caption_counts[images]
        if counts.max(initial=1) == 1:
            return self.caption_offsets[images]
        draws = np.random.default_rng([self.seed, micro_step, 1]).integers(0, 1 << 62, len(images), dtype=np.int64)
        return self.caption_offsets[images] + draws % counts

    def batch(self, micro_step: int, encoders: np.ndarray,
              texts: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share: image features [n_enc, B_local, D_max] of image encoders `encoders`, caption
        embeddings [n_text, B_local, T_max] of text encoders `texts` (default: the first), zero-padded."""
        local = self.batch_size // self.world
        share = slice(self.rank * local, (self.rank + 1) * local)
        batch_rows = self.indices(micro_step)
        partners = batch_rows if self.text_rows is None else self.text_rows[batch_rows]
        rows, text_rows = batch_rows[share], self.caption_rows(micro_step, partners)[share]
        d_max, t_max = self.pad_to
        image = np.zeros((len(encoders), local, d_max), np.float32)
        for slot, e in enumerate(encoders):
            image[slot, :, : self.widths[e]] = _gather(self.images[e], rows)
        texts = np.zeros(1, np.int64) if texts is None else texts
        text = np.zeros((len(texts), local, t_max), np.float32)
        for slot, t in enumerate(texts):
            text[slot, :, : self.text_widths[t]] = _gather(self.texts[t], text_rows)
        return torch.from_numpy(image), torch.from_numpy(text)


def _gather(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """array[rows], reading a memmap in file order, then restoring the order of `rows`."""
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), *array.shape[1:]), array.dtype)
    out[order] = array[rows[order]]
    return out


class Prefetcher:
    """Gathers the next micro-step's batch in a background thread while the current step computes
    (numpy's gather and torch's kernels both release the GIL)."""

    def __init__(self, data: FeatureBatches, encoders_for):
        self.data, self.encoders_for = data, encoders_for  # encoders_for(micro_step) -> (image, text) indices
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: tuple[int, Future] | None = None

    def get(self, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pending and self.pending[0] == micro_step:
            batch = self.pending[1].result()
        else:
            batch = self.data.batch(micro_step, *self.encoders_for(micro_step))
        nxt = micro_step + 1
        self.pending = (nxt, self.pool.submit(self.data.batch, nxt, *self.encoders_for(nxt)))
        return batch


class PrefixFeatures:
    """The first `count` samples of the training data, read the way FeatureBatches reads a cache: each name's
    features from the cache given for it (the new encoder's from a cache of only the samples the budget uses, or
    the training cache when it already holds the encoder)."""

    def __init__(self, sources: dict[str, CachedFeatures], count: int):
        self.count = count
        self.arrays = {name: cache[name] for name, cache in sources.items()}  # only rows < count are ever read
        self.widths = {name: cache.width(name) for name, cache in sources.items()}
        # the caption index comes with the caption rows: image-only caches (a new image encoder's) have none
        counts = {name: tuple(cache.caption_counts()[:count]) for name, cache in sources.items()
                  if name.startswith(TEXT_PREFIX)}
        if len(set(counts.values())) > 1:
            raise CacheError(f"{sorted(counts)}: these caches hold different captions for the same samples")
        self._caption_counts = np.array(next(iter(counts.values()), (1,) * count), np.int64)

    def caption_counts(self) -> np.ndarray:
        return self._caption_counts

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def width(self, name: str) -> int:
        return self.widths[name]


def first_samples_cache(cfg: Config, spec, text: bool, count: int, train_cache: CachedFeatures,
                        accelerator) -> CachedFeatures:
    """Embed a new encoder (image `spec`, or a text encoder's name) over exactly the first `count` training
    samples: one unit reading the shards in order and stopping there (later shards are never opened; small by
    construction, so not split over ranks)."""
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
