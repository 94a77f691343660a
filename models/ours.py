"""Our progression step1 -> step5 (one change of method per step, like write-up 001), and `tiny`.

Shapes are for a 28x28 input; `# RF:` is the receptive field after the layer (jump in brackets).
"""

from __future__ import annotations  # annotations name nn.Module without importing torch

from models import nn, register


def relu_bn(cout: int, bn: bool = True, bn_first: bool = False) -> list[nn.Module]:
    """ReLU [-> BatchNorm], the order of write-up 000's final model, or with `bn_first` BatchNorm -> ReLU,
    the usual order (tiny3k: it lifted every one of its tuning seeds; models/notes/tiny3k.md)."""
    if not bn:
        return [nn.ReLU()]
    return [nn.BatchNorm2d(cout), nn.ReLU()] if bn_first else [nn.ReLU(), nn.BatchNorm2d(cout)]


def block(cin: int, cout: int, bn: bool, dropout: float, bn_first: bool = False) -> list[nn.Module]:
    """3x3 conv -> ReLU [-> BatchNorm] (or conv -> BatchNorm -> ReLU, `bn_first`) [-> Dropout2d].

    Dropout2d drops whole channels: one random number per channel instead of per activation, which made
    step5's training compute on a CPU about 1.8x faster (README, Speed)."""
    layers = [nn.Conv2d(cin, cout, 3, bias=False), *relu_bn(cout, bn, bn_first)]
    if dropout:
        layers.append(nn.Dropout2d(dropout))
    return layers


@register(
    "step1",
    "Set-up: a plain working baseline (73k params, big 8x8 head), SGD, no BN, no augmentation",
)
def step1(dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.ReLU(),  # 26x26  RF: 3 (1)
        nn.Conv2d(16, 32, 3), nn.ReLU(),  # 24x24  RF: 5 (1)
        nn.MaxPool2d(2),  # 12x12  RF: 6 (2)
        nn.Conv2d(32, 32, 3), nn.ReLU(),  # 10x10  RF: 10 (2)
        nn.Conv2d(32, 64, 3), nn.ReLU(),  # 8x8  RF: 14 (2)
        nn.Conv2d(64, 10, 8),  # 1x1  RF: 28 (2)
        nn.Flatten(),
    )  # fmt: skip


def skeleton(bn: bool, dropout: float) -> nn.Module:
    """The light skeleton shared by step2..step5: only BN and dropout are switched on along the way."""
    return nn.Sequential(
        *block(1, 10, bn, dropout),  # 26x26  RF: 3 (1)
        *block(10, 16, bn, dropout),  # 24x24  RF: 5 (1)
        nn.Conv2d(16, 10, 1, bias=False),  # 24x24  RF: 5 (1)  1x1 transition: mix, then squeeze
        nn.MaxPool2d(2),  # 12x12  RF: 6 (2)
        *block(10, 14, bn, dropout),  # 10x10  RF: 10 (2)
        *block(14, 16, bn, dropout),  # 8x8  RF: 14 (2)
        *block(16, 16, bn, dropout),  # 6x6  RF: 18 (2)
        nn.AdaptiveAvgPool2d(1),  # 1x1  RF: 28 (GAP sees the whole 6x6 map)
        nn.Conv2d(16, 10, 1, bias=False),  # 1x1  RF: 28  the head: 160 params
        nn.Flatten(),
    )


@register(
    "step2",
    "Lighter: fewer kernels, a 1x1 transition, GAP instead of the big head; no BN yet",
    batch_size=64,
)
def step2(dropout: float = 0.0) -> nn.Module:
    return skeleton(bn=False, dropout=dropout)


@register(
    "step3",
    "step2 + BatchNorm after every 3x3 conv",
    batch_size=64,
)
def step3(dropout: float = 0.0) -> nn.Module:
    return skeleton(bn=True, dropout=dropout)


@register(
    "step4",
    "step3 + OneCycle LR schedule (SGD, Nesterov, peak lr 0.1)",
    scheduler="onecycle",
    lr=0.1,
    nesterov=True,
    pct_start=0.2,
    batch_size=64,
)
def step4(dropout: float = 0.0) -> nn.Module:
    return skeleton(bn=True, dropout=dropout)


STEP5_RECIPE = dict(
    scheduler="onecycle",
    lr=0.1,
    nesterov=True,
    pct_start=0.2,
    dropout=0.01,
    augment="standard",
    clean_epochs=5,  # epochs 11-15, the ones the targets cover, on the images as they are
    batch_size=64,
    ema=0.999,
)


@register(
    "step5",
    "step4 + channel dropout (Dropout2d) 0.01 + albumentations affine augmentation (clean images in the last 5 "
    "epochs) + EMA of the weights: our answer (7,574 params)",
    hold_from=11,
    mean_target=99.50,
    **STEP5_RECIPE,
)
def step5(dropout: float = 0.01) -> nn.Module:
    return skeleton(bn=True, dropout=dropout)


def sep_block(cin: int, cout: int, dropout: float, bn_first: bool = False) -> list[nn.Module]:
    """Depthwise-separable 3x3: a 3x3 per channel, then a 1x1 mix, ReLU and BatchNorm (in `relu_bn`'s order)
    [, Dropout2d] (9*cin + cin*cout weights instead of a full 3x3's 9*cin*cout: more width for the same
    parameters)."""
    layers = [
        nn.Conv2d(cin, cin, 3, groups=cin, bias=False),
        nn.Conv2d(cin, cout, 1, bias=False),
        *relu_bn(cout, True, bn_first),
    ]
    if dropout:
        layers.append(nn.Dropout2d(dropout))
    return layers


def separable(channels: tuple[int, int, int, int, int], dropout: float, bn_first: bool = False) -> nn.Module:
    """tiny's layout: step5's skeleton (same sizes and RF), with one full 3x3 on the single input channel
    and depthwise-separable blocks after it, widening. The weights a full 3x3 would spend on its 9*cin*cout
    buy width instead. `bn_first`: BatchNorm before ReLU in every block (`relu_bn`)."""
    c1, c2, c3, c4, c5 = channels
    return nn.Sequential(
        *block(1, c1, True, dropout, bn_first),  # 26x26  RF: 3 (1)
        *sep_block(c1, c2, dropout, bn_first),  # 24x24  RF: 5 (1)
        nn.MaxPool2d(2),  # 12x12  RF: 6 (2)
        *sep_block(c2, c3, dropout, bn_first),  # 10x10  RF: 10 (2)
        *sep_block(c3, c4, dropout, bn_first),  # 8x8  RF: 14 (2)
        *sep_block(c4, c5, dropout, bn_first),  # 6x6  RF: 18 (2)
        nn.AdaptiveAvgPool2d(1),  # 1x1  RF: 28 (GAP sees the whole 6x6 map)
        nn.Conv2d(c5, 10, 1, bias=False),  # 1x1  RF: 28  the head: c5 x 10 params
        nn.Flatten(),
    )


@register(
    "tiny",
    "Smaller than the smallest write-up model (5,178): step5's skeleton with depthwise-separable blocks after "
    "the first conv, wider; step5's recipe",
    hold_from=13,
    **STEP5_RECIPE,
)
def tiny(dropout: float = 0.01) -> nn.Module:
    return separable((12, 24, 32, 32, 36), dropout)


@register(
    "tiny4k",
    "The stretch: tiny's layout under 4,000 parameters (narrower)",
    hold_from=13,
    **STEP5_RECIPE,
)
def tiny4k(dropout: float = 0.01) -> nn.Module:
    return separable((12, 20, 28, 28, 32), dropout)


@register(
    "tiny3k",
    "Below the stretch: tiny's layout under 3,000 parameters (narrower again), BatchNorm before ReLU, without dropout",
    hold_from=13,
    **{**STEP5_RECIPE, "dropout": 0.0},
)
def tiny3k(dropout: float = 0.0) -> nn.Module:
    return separable((10, 16, 24, 24, 26), dropout, bn_first=True)
