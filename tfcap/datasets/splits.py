"""Train/val/test splits: fixed by the data, or by a seeded hash of each image's id."""

from __future__ import annotations

import dataclasses
import hashlib

from tfcap.datasets.source import Source
from tfcap.errors import TfcapError

SPLITS = ("train", "val", "test")
VAL_OR_TEST = "val|test"  # a fixed split value: val or test, by hash (COCO's val file without Karpathy's splits)


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """How images are split when the data does not fix it."""

    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0


def _hash_rank(image_id: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}:{image_id}".encode("utf-8")).digest()


def _by_hash(image_ids: list[str], fractions: dict[str, float], rest: str, seed: int) -> dict[str, str]:
    """`fractions` of the images, ranked by a seeded hash of their id, in each split; the rest in `rest`."""
    ranked = sorted(image_ids, key=lambda i: _hash_rank(i, seed))
    assigned, start = {}, 0
    for split, fraction in fractions.items():
        count = round(len(ranked) * fraction)
        assigned.update({i: split for i in ranked[start:start + count]})
        start += count
    assigned.update({i: rest for i in ranked[start:]})
    return assigned


def assign_splits(image_ids: list[str], source: Source, config: SplitConfig) -> tuple[dict[str, str], list[str]]:
    """Split images into train/val/test.

    Returns (image id -> split, ids in no split). With fixed splits (official files, a CSV
    column, Karpathy's JSON, COCO's files) images the data leaves out stay out; COCO's val-file
    images are split into val and test by hash, `test_fraction` of them in test. Otherwise
    images are ranked by a seeded hash of their id, so the split is deterministic, by image, and
    stable when images are added.
    """
    if not (0 <= config.val_fraction < 1 and 0 <= config.test_fraction < 1
            and config.val_fraction + config.test_fraction < 1):
        raise TfcapError("--val-fraction and --test-fraction must be in [0, 1) and sum to less than 1")
    if source.split_source == "hash":
        return _by_hash(image_ids, {"test": config.test_fraction, "val": config.val_fraction}, "train",
                        config.seed), []
    assigned = {i: source.splits[i] for i in image_ids if i in source.splits}
    pooled = [i for i, split in assigned.items() if split == VAL_OR_TEST]
    if pooled:
        assigned.update(_by_hash(pooled, {"test": config.test_fraction}, "val", config.seed))
    return assigned, [i for i in image_ids if i not in source.splits]
