"""Training batches from the memory-mapped embedding cache: shuffled indices, image features padded to the widest
image encoder, caption embeddings to the widest text encoder.

Memory stays flat with the data set size: only the rows of the current batch are read from the memmaps.
The batch order is a pure function of (seed, micro-step), so a resumed run sees exactly the same batches.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from hnet.config import ConfigError
from hnet.data.cache import CachedFeatures
from hnet.models.encoders import text_key


class FeatureBatches:
    def __init__(self, cache: CachedFeatures, names: list[str], texts: list[str], batch_size: int, seed: int = 0,
                 shuffle_pairs: bool = False, overfit_batches: int = 0, rank: int = 0, world: int = 1):
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
        # control run: every image keeps one fixed, wrong caption (a derangement-like permutation)
        self.text_rows = np.random.default_rng(seed + 7).permutation(self.count) if shuffle_pairs else None
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

    def batch(self, micro_step: int, encoders: np.ndarray,
              texts: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share: image features [n_enc, B_local, D_max] of image encoders `encoders`, caption
        embeddings [n_text, B_local, T_max] of text encoders `texts` (default: the first), zero-padded."""
        local = self.batch_size // self.world
        rows = self.indices(micro_step)[self.rank * local:(self.rank + 1) * local]
        order = np.argsort(rows)  # read memmaps in file order, then restore the batch order
        sorted_rows = rows[order]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        d_max = max(self.widths)
        image = np.zeros((len(encoders), local, d_max), np.float32)
        for slot, e in enumerate(encoders):
            image[slot, :, : self.widths[e]] = self.images[e][sorted_rows][inverse]
        text_rows = sorted_rows if self.text_rows is None else self.text_rows[sorted_rows]
        texts = np.zeros(1, np.int64) if texts is None else texts
        t_max = max(self.text_widths)
        text = np.zeros((len(texts), local, t_max), np.float32)
        for slot, t in enumerate(texts):
            text[slot, :, : self.text_widths[t]] = self.texts[t][text_rows][inverse]
        return torch.from_numpy(image), torch.from_numpy(text)


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
