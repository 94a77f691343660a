"""The figures logged with each run: augmentation preview, curves, confusion matrix, misclassified."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from trainer.target import TARGET_ACC  # noqa: E402


def augment_preview(images: np.ndarray, augment, n: int = 8, copies: int = 5, seed: int = 0):
    """Each row: one original uint8 image, then `copies` augmented versions of it."""
    fig, axes = plt.subplots(n, copies + 1, figsize=(1.2 * (copies + 1), 1.2 * n), squeeze=False)
    for row in range(n):
        axes[row, 0].imshow(images[row], cmap="gray")
        for col in range(1, copies + 1):
            augment.set_random_seed(seed + row * copies + col)
            axes[row, col].imshow(augment(image=images[row])["image"], cmap="gray")
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].set_title("original", fontsize=8)
    axes[0, 1].set_title("augmented", fontsize=8)
    fig.tight_layout()
    return fig


def curves(history: list[dict]):
    """Loss and accuracy per epoch, train and test, with the target line."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "test"):
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], marker="o", label=split)
        ax_acc.plot(epochs, [h[f"{split}_acc"] for h in history], marker="o", label=split)
    ax_acc.axhline(TARGET_ACC, color="gray", linestyle="--", linewidth=1, label=f"{TARGET_ACC}%")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def confusion_matrix(targets: np.ndarray, preds: np.ndarray):
    fig, ax = plt.subplots(figsize=(7, 6))
    ConfusionMatrixDisplay.from_predictions(targets, preds, ax=ax, colorbar=False)
    ax.set_title(f"test set: {int((targets != preds).sum())} errors")
    fig.tight_layout()
    return fig


def misclassified(images: np.ndarray, targets: np.ndarray, preds: np.ndarray, n: int = 40):
    """A grid of the first `n` wrong test predictions, titled 'true -> predicted'."""
    wrong = np.flatnonzero(targets != preds)[:n]
    cols = 10
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong, strict=False):
        ax.imshow(images[i], cmap="gray")
        ax.set_title(f"{targets[i]}->{preds[i]}", fontsize=8, color="red")
    fig.suptitle("misclassified: true -> predicted", fontsize=10)
    fig.tight_layout()
    return fig


def frontier(points: list[tuple], claims: list[tuple]):
    """Accuracy against parameters: each variant's mean (marker) and range (bar) over seeds of its
    last-epochs test accuracy, the target line, and the write-ups' claims as separate markers.
    points: (name, params, mean, low, high); claims: (name, params, claimed accuracy)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, params, mean, low, high in points:
        ax.errorbar(params, mean, yerr=[[mean - low], [high - mean]], fmt="o", color="C0", capsize=3)
        ax.annotate(name, (params, mean), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if claims:
        ax.scatter([c[1] for c in claims], [c[2] for c in claims], marker="x", color="C3", label="write-ups' claims")
    ax.axhline(TARGET_ACC, color="gray", linestyle="--", linewidth=1, label=f"{TARGET_ACC}%")
    ax.set_xscale("log")
    ax.set(xlabel="parameters (log scale)", ylabel="test accuracy, last epochs (%)", title="accuracy vs parameters")
    ax.legend(loc="best")  # where it hides the fewest markers
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig
