"""Augmentation: named pipelines, uint8 batches normalised by `to_device`, reproducible by seed, test set
untouched."""

import numpy as np
import pytest
import torch

import models
from trainer.augment import AUGMENTS, EpochBatches, build_augment
from trainer.config import Config
from trainer.data import MNIST_MEAN, MNIST_STD, MNISTDataset, load_mnist, to_device
from trainer.engine import make_loaders


@pytest.fixture(scope="module")
def images(data_dir):
    return load_mnist(data_dir, train=True, subset=64)


@pytest.mark.parametrize("name", list(AUGMENTS))
def test_pipeline_maps_uint8_images_to_uint8_images(images, name):
    out = build_augment(name)(image=images[0][0].numpy())["image"]
    assert out.shape == (28, 28) and out.dtype == np.uint8


def batch(dataset, seed, indices):
    """A batch as the training loop gets it."""
    return to_device(dataset.__getitems__((seed, indices)), torch.device("cpu"))


@pytest.mark.parametrize("name", list(AUGMENTS))
def test_batches_leave_the_worker_as_uint8_arrays_and_train_normalised(images, name):
    dataset = MNISTDataset(*images, build_augment(name))
    raw, labels = dataset.__getitems__((7, [0, 1, 2]))  # what a worker pickles: numpy, no shared memory
    assert isinstance(raw, np.ndarray) and raw.shape == (3, 28, 28) and raw.dtype == np.uint8
    assert isinstance(labels, np.ndarray) and labels.tolist() == images[1][:3].tolist()
    x, y = batch(dataset, 7, [0, 1, 2])
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32 and y.tolist() == images[1][:3].tolist()
    assert x.min().item() == pytest.approx(-MNIST_MEAN / MNIST_STD, abs=1e-4)  # background stays background


def test_none_is_normalisation_only(images):
    raw = images[0][0].numpy()
    assert np.array_equal(build_augment("none")(image=raw)["image"], raw)
    x, _ = batch(MNISTDataset(*images, build_augment("none")), None, [0])
    np.testing.assert_allclose(x[0, 0].numpy(), (raw / 255.0 - MNIST_MEAN) / MNIST_STD, atol=1e-5)


def test_unknown_pipeline_names_the_valid_ones():
    with pytest.raises(ValueError, match="none, light, standard"):
        build_augment("heavy")


def test_augmentation_changes_the_image_and_is_reproducible_by_seed(images):
    dataset = MNISTDataset(*images, build_augment("standard"))
    a, labels = batch(dataset, 1234, [3, 5])
    b, _ = batch(dataset, 1234, [3, 5])
    c, _ = batch(dataset, 999, [3, 5])
    plain, _ = batch(MNISTDataset(*images, build_augment("none")), None, [3])
    assert a.shape == (2, 1, 28, 28) and a.dtype == torch.float32
    assert labels.tolist() == images[1][[3, 5]].tolist()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[:1], plain)


def test_sampler_order_depends_on_seed_and_epoch_only():
    def pairs(seed, epoch):
        sampler = EpochBatches(100, 32, seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert pairs(1, 3) == pairs(1, 3)
    assert pairs(1, 3) != pairs(1, 4)
    assert pairs(1, 3) != pairs(2, 3)
    assert [len(indices) for _, indices in pairs(1, 3)] == [32, 32, 32, 4]
    assert sorted(i for _, indices in pairs(1, 3) for i in indices) == list(range(100))


def test_clean_epochs_train_on_the_images_as_they_are(images, data_dir):
    """`--clean-epochs 2` of 5: epochs 4-5 see the images unchanged, in the order a fully augmented run
    would see them, and epochs 1-3 are augmented exactly as that run's."""

    def epoch(sampler, n):
        sampler.set_epoch(n)
        return list(sampler)

    augmented, clean = EpochBatches(100, 32, seed=1), EpochBatches(100, 32, seed=1, augmented=3)
    assert epoch(clean, 3) == epoch(augmented, 3)
    assert [indices for _, indices in epoch(clean, 4)] == [indices for _, indices in epoch(augmented, 4)]
    assert all(seed is None for seed, _ in epoch(clean, 4) + epoch(clean, 5))
    raw, labels = MNISTDataset(*images, build_augment("standard")).__getitems__((None, [3, 5]))
    assert np.array_equal(raw, images[0][[3, 5]].numpy()) and labels.tolist() == images[1][[3, 5]].tolist()
    recipe = models.get_variant("step5").recipe
    cfg = Config.for_variant(recipe, clean_epochs=2, subset=64, workers=0, data_dir=data_dir)
    assert make_loaders(cfg, torch.device("cpu"))[2].augmented == cfg.epochs - 2


def test_test_set_is_never_augmented(data_dir):
    recipe = models.get_variant("step5").recipe  # augment: standard
    cfg = Config.for_variant(recipe, model="step5", subset=200, workers=0, data_dir=data_dir)
    _, test_loader, _ = make_loaders(cfg, torch.device("cpu"))
    raw, labels = load_mnist(data_dir, train=False, subset=200)
    expected = (raw.float().unsqueeze(1) / 255.0 - MNIST_MEAN) / MNIST_STD
    x, y = next(iter(test_loader))
    torch.testing.assert_close(x, expected)
    assert torch.equal(y, labels)
