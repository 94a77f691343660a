"""albumentations pipelines by name, and the sampler that makes every augmented sample reproducible.

A pipeline maps a uint8 (28, 28) image to a normalised float32 (28, 28) image. The test set always
gets `none` (normalisation only). `EpochSampler` hands each worker `(index, seed)` pairs: the sample's
augmentation is a function of (run seed, epoch, position) alone, whatever the worker count, so a run
resumed at epoch k sees exactly the images an uninterrupted run would.
"""

import albumentations as A
import torch

from trainer.data import MNIST_MEAN, MNIST_STD

# name -> the geometric transforms applied before normalisation (fill 0 = MNIST background).
AUGMENTS = {
    "none": [],
    "light": [A.Rotate(limit=7, border_mode=0, fill=0, p=1.0)],
    "standard": [
        A.Affine(rotate=(-10, 10), translate_percent=(-0.08, 0.08), scale=(0.9, 1.1), border_mode=0, fill=0, p=1.0)
    ],
}


def build_augment(name: str) -> A.Compose:
    if name not in AUGMENTS:
        raise ValueError(f"unknown augment {name!r}; choose from: {', '.join(AUGMENTS)}")
    normalize = A.Normalize(mean=(MNIST_MEAN,), std=(MNIST_STD,), max_pixel_value=255.0)
    return A.Compose([*AUGMENTS[name], normalize], seed=0)


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled `(index, sample_seed)` pairs; the order and seeds depend on (seed, epoch) only."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=g).tolist()
        return iter(zip(order, seeds, strict=True))
