"""(image encoder, text encoder) pairs: the unit a run trains, evaluates and ranks.

A run stitches N image encoders with M text encoders. Pair p joins image encoder `image[p]` with text encoder
`text[p]`; the full grid is image-major (p = i * M + j). With one text encoder a pair is named by its image
encoder alone, so single-text runs read exactly as before; with several it is `IMAGE + TEXT`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hnet.config import ConfigError

PAIR_SEP = " + "


def pair_label(image: str, text: str, multi_text: bool) -> str:
    return f"{image}{PAIR_SEP}{text}" if multi_text else image


def split_label(label: str, where: str) -> tuple[str, str]:
    """IMAGE + TEXT -> (IMAGE, TEXT); names hold no ' + '."""
    image, sep, text = label.partition(PAIR_SEP.strip())
    if not sep or not image.strip() or not text.strip():
        raise ConfigError(f"{where}: '{label}' is not a pair; write 'IMAGE{PAIR_SEP}TEXT'")
    return image.strip(), text.strip()


@dataclass(frozen=True)
class Pairs:
    image: tuple[int, ...]  # per pair: index into the run's image encoders
    text: tuple[int, ...]  # per pair: index into the run's text encoders

    @classmethod
    def grid(cls, n_images: int, n_texts: int, skip: set[tuple[int, int]] = frozenset()) -> "Pairs":
        cells = [(i, j) for i in range(n_images) for j in range(n_texts) if (i, j) not in skip]
        return cls(tuple(i for i, _ in cells), tuple(j for _, j in cells))

    @classmethod
    def from_list(cls, pairs: list[list[int]]) -> "Pairs":
        return cls(tuple(int(i) for i, _ in pairs), tuple(int(j) for _, j in pairs))

    def __len__(self) -> int:
        return len(self.image)

    def as_list(self) -> list[list[int]]:
        return [[i, j] for i, j in zip(self.image, self.text)]

    def labels(self, images: list[str], texts: list[str]) -> list[str]:
        return [pair_label(images[i], texts[j], len(texts) > 1) for i, j in zip(self.image, self.text)]

    def members(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """The image and text encoders the pairs `index` need (sorted, each once), and for every pair its slot in
        each list; a slot list is None when slots are 0..n-1 in order (nothing to gather)."""
        image, text = np.asarray(self.image)[index], np.asarray(self.text)[index]
        image_idx, text_idx = np.unique(image), np.unique(text)
        image_slot, text_slot = np.searchsorted(image_idx, image), np.searchsorted(text_idx, text)
        identity = lambda slots: None if np.array_equal(slots, np.arange(len(slots))) else slots
        return image_idx, text_idx, identity(image_slot), (None if len(text_idx) == 1 else text_slot)


def resolve_pairs(images: list[str], texts: list[str], held_out: list[str]) -> tuple[Pairs, list[int]]:
    """Every pair of the grid, and the positions of those trained (all but `held_out` labels)."""
    pairs = Pairs.grid(len(images), len(texts))
    labels = pairs.labels(images, texts)
    for i, label in enumerate(held_out):
        image, text = split_label(label, f"held_out_pairs[{i}]")
        if pair_label(image, text, True) not in {pair_label(images[a], texts[b], True)
                                                 for a, b in zip(pairs.image, pairs.text)}:
            raise ConfigError(f"held_out_pairs[{i}]: '{label}' is not a pair of the configured encoders")
    held = set(held_labels(held_out, len(texts) > 1))
    trained = [p for p, label in enumerate(labels) if label not in held]
    for side, names, of_pair in (("image", images, pairs.image), ("text", texts, pairs.text)):
        alone = sorted(set(range(len(names))) - {of_pair[p] for p in trained})
        if alone:  # its vector would never train: it stays at its random init
            raise ConfigError(f"held_out_pairs: every pair of {side} encoder '{names[alone[0]]}' is held out, so it "
                              f"never trains; keep one of its pairs (to leave out an image encoder, use held_out)")
    return pairs, trained


def held_labels(held_out: list[str], multi_text: bool) -> list[str]:
    """The run's names of `held_out_pairs` entries (`IMAGE + TEXT`; the image's name alone with one text encoder)."""
    return [pair_label(*split_label(label, f"held_out_pairs[{i}]"), multi_text) for i, label in enumerate(held_out)]
