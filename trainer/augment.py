"""albumentations pipelines by name, and the sampler that makes every augmented sample reproducible.

A pipeline maps a uint8 (28, 28) image to an augmented uint8 (28, 28) image; the batch is then
normalised by the MNIST mean and std. The test set is never augmented (normalisation only).
`EpochBatches` hands each worker whole batches as `(seed, indices)`: the augmentation is a function
of (run seed, epoch, batch) alone, whatever the worker count, so a run resumed at epoch k sees
exactly the images an uninterrupted run would.
"""

import os

import torch

from trainer.config import AUGMENTS

ROTATE, SHIFT, SCALE = 8, 0.06, 0.06  # `standard`: +-degrees, +-fraction of the size, +-scale


def transforms(name: str, A) -> list:
    """The geometric transforms of the pipeline `name` (fill 0 = MNIST background)."""
    return {
        "none": [],
        "light": [A.Rotate(limit=7, border_mode=0, fill=0, p=1.0)],
        "standard": [
            A.Affine(
                rotate=(-ROTATE, ROTATE),
                translate_percent=(-SHIFT, SHIFT),
                scale=(1 - SCALE, 1 + SCALE),
                border_mode=0,
                fill=0,
                p=1.0,
            )
        ],
    }[name]


def build_augment(name: str):
    """The named pipeline: uint8 (28, 28) in, uint8 (28, 28) out. Normalisation by the MNIST mean and
    std follows on the whole batch (`trainer.data.normalize`): per image, A.Normalize doubles the cost."""
    if name not in AUGMENTS:
        raise ValueError(f"unknown augment {name!r}; choose from: {', '.join(AUGMENTS)}")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks PyPI at import: never unasked
    import albumentations as A

    return A.Compose(transforms(name, A), seed=0, strict=False)


class EpochBatches(torch.utils.data.Sampler):
    """Shuffled batches as `(seed, indices)`; order and seeds depend on (run seed, epoch) only. After
    epoch `augmented` the seed is None: the batch is not augmented (`--clean-epochs`)."""

    def __init__(self, n: int, batch_size: int, seed: int, augmented: int | None = None):
        self.n, self.batch_size, self.seed, self.augmented, self.epoch = n, batch_size, seed, augmented, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return -(-self.n // self.batch_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).split(self.batch_size)
        seeds = torch.randint(0, 2**31 - 1, (len(order),), generator=g).tolist()
        if self.augmented is not None and self.epoch > self.augmented:
            seeds = [None] * len(order)
        return iter(zip(seeds, [batch.tolist() for batch in order], strict=True))
