"""Layer-for-layer reproductions of the write-ups' fully specified models (../shared/seeds/).

Each is named `ref` + its exact parameter count. Kernel sizes, padding, biases, the order of
ReLU / BatchNorm / Dropout, pooling and head are as the write-up gives them. Where a write-up states
no recipe value, ours is marked "(ours)" in the description. `# RF:` is the receptive field after
the layer (jump in brackets), for a 28x28 input.
"""

from __future__ import annotations  # annotations name nn.Module without importing torch

from models import nn, register


@register(
    "ref6712",
    "write-up 000's final model: BN + Dropout 0.1 + GAP; SGD lr 0.021 (momentum 0.9, batch 128: ours)",
    claim_check=(12, 15, 99.41),
    lr=0.021,
    dropout=0.1,
)
def ref6712(dropout: float = 0.1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(8), nn.Dropout(dropout),  # 26  RF: 3 (1)
        nn.Conv2d(8, 10, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(10), nn.Dropout(dropout),  # 24  RF: 5 (1)
        nn.Conv2d(10, 12, 1, bias=False),  # 24  RF: 5 (1)
        nn.MaxPool2d(2, 2),  # 12  RF: 6 (2)  (000's comment says 10)
        nn.Conv2d(12, 14, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(14), nn.Dropout(dropout),  # 10  RF: 10 (2)
        nn.Conv2d(14, 16, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(16), nn.Dropout(dropout),  # 8  RF: 14 (2)
        nn.Conv2d(16, 8, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(8), nn.Dropout(dropout),  # 6  RF: 18 (2)
        nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.ReLU(), nn.BatchNorm2d(12), nn.Dropout(dropout),  # 6  RF: 22
        nn.AvgPool2d(6),  # 1  RF: 32 (12)
        nn.Conv2d(12, 10, 1, bias=False),  # 1  RF: 32
        nn.Flatten(),
    )  # fmt: skip


@register(
    "ref7998",
    "write-up 002's model 1: conv+ReLU+BN with biases, a 7x7 conv head; Adam lr 1e-4 (dropout 0.1: ours)",
    claim_check=(15, 15, 98.75),  # "98.8" to 3 digits
    optimizer="adam",
    lr=1e-4,
    dropout=0.1,
)
def ref7998(dropout: float = 0.1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 10, 3), nn.ReLU(), nn.BatchNorm2d(10),  # 26  RF: 3 (1)
        nn.Conv2d(10, 8, 3), nn.ReLU(), nn.BatchNorm2d(8),  # 24  RF: 5 (1)
        nn.Conv2d(8, 10, 3), nn.ReLU(), nn.BatchNorm2d(10),  # 22  RF: 7 (1)
        nn.MaxPool2d(2), nn.Dropout(dropout),  # 11  RF: 8 (2)
        nn.Conv2d(10, 8, 3), nn.ReLU(), nn.BatchNorm2d(8),  # 9  RF: 12 (2)
        nn.Conv2d(8, 10, 3),  # 7  RF: 16 (2)
        nn.Conv2d(10, 10, 7),  # 1  RF: 28 (2)
        nn.Flatten(),
    )  # fmt: skip


@register(
    "ref7936",
    "write-up 002's model 2: dropout everywhere, AvgPool head; SGD lr 0.01 momentum 0.1 (dropout 0.1: ours)",
    claim_check=(15, 15, 98.85),  # "98.9" to 3 digits
    lr=0.01,
    momentum=0.1,
    dropout=0.1,
)
def ref7936(dropout: float = 0.1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 20, 3), nn.ReLU(), nn.BatchNorm2d(20), nn.Dropout(dropout),  # 26  RF: 3 (1)
        nn.Conv2d(20, 10, 3), nn.ReLU(), nn.BatchNorm2d(10), nn.Dropout(dropout),  # 24  RF: 5 (1)
        nn.Conv2d(10, 20, 3), nn.ReLU(), nn.BatchNorm2d(20),  # 22  RF: 7 (1)
        nn.MaxPool2d(2),  # 11  RF: 8 (2)
        nn.Conv2d(20, 10, 3), nn.ReLU(), nn.BatchNorm2d(10), nn.Dropout(dropout),  # 9  RF: 12 (2)
        nn.Conv2d(10, 10, 3), nn.ReLU(), nn.BatchNorm2d(10), nn.Dropout(dropout),  # 7  RF: 16 (2)
        nn.Conv2d(10, 12, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(12), nn.Dropout(dropout),  # 7  RF: 20 (2)
        nn.AvgPool2d(7),  # 1  RF: 32 (14)
        nn.Conv2d(12, 10, 1),  # 1  RF: 32
        nn.Flatten(),
    )  # fmt: skip


@register(
    "ref5178",
    "write-up 002's model 3: two max-pools, 2x2 conv head; OneCycle + augmentation (SGD, lr 0.05, light aug: ours)",
    claim_check=(13, 15, 99.35),  # "0.994" to 3 digits
    scheduler="onecycle",
    lr=0.05,
    augment="light",
)
def ref5178(dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(6),  # 26  RF: 3 (1)
        nn.Conv2d(6, 12, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(12),  # 24  RF: 5 (1)
        nn.MaxPool2d(2),  # 12  RF: 6 (2)
        nn.Conv2d(12, 12, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(12),  # 10  RF: 10 (2)
        nn.Conv2d(12, 12, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(12),  # 8  RF: 14 (2)
        nn.MaxPool2d(2),  # 4  RF: 16 (4)
        nn.Conv2d(12, 12, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(12),  # 2  RF: 24 (4)
        nn.Conv2d(12, 10, 2, bias=False),  # 1  RF: 28 (4)
        nn.AdaptiveAvgPool2d(1),  # 1  RF: 28
        nn.Flatten(),
    )  # fmt: skip


@register(
    "ref7944",
    "write-up 003's model 3: conv+BN+ReLU+Dropout, 1x1 transition, GAP; StepLR + augmentation "
    "(SGD lr 0.05, step 5 x0.2, dropout 0.05, standard aug: ours)",
    claim_check=(8, 15, 99.40),
    lr=0.05,
    scheduler="step",
    step_size=5,
    gamma=0.2,
    dropout=0.05,
    augment="standard",
)
def ref7944(dropout: float = 0.05) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 10, 3, bias=False), nn.BatchNorm2d(10), nn.ReLU(), nn.Dropout(dropout),  # 26  RF: 3 (1)
        nn.Conv2d(10, 15, 3, bias=False), nn.BatchNorm2d(15), nn.ReLU(), nn.Dropout(dropout),  # 24  RF: 5 (1)
        nn.Conv2d(15, 10, 1, bias=False),  # 24  RF: 5 (1)
        nn.MaxPool2d(2),  # 12  RF: 6 (2)
        nn.Conv2d(10, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(dropout),  # 10  RF: 10 (2)
        nn.Conv2d(16, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(dropout),  # 8  RF: 14 (2)
        nn.Conv2d(16, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(dropout),  # 6  RF: 18 (2)
        nn.AvgPool2d(6),  # 1  RF: 28 (12)
        nn.Conv2d(16, 10, 1, bias=False),  # 1  RF: 28
        nn.Flatten(),
    )  # fmt: skip
