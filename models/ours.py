"""Our progression step1 -> step5 (one change of method per step, like write-up 001), and `tiny`.

Shapes are for a 28x28 input; `# RF:` is the receptive field after the layer (jump in brackets).
"""

from torch import nn

from models import register


def block(cin: int, cout: int, bn: bool, dropout: float) -> list[nn.Module]:
    """3x3 conv -> ReLU [-> BatchNorm] [-> Dropout2d], the order of write-up 000's final model.

    Dropout2d drops whole channels: one random number per channel instead of per activation, which made
    step5's training compute on a CPU about 1.8x faster (README, Speed)."""
    layers = [nn.Conv2d(cin, cout, 3, bias=False), nn.ReLU()]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    if dropout:
        layers.append(nn.Dropout2d(dropout))
    return layers


@register(
    "step1",
    "Set-up: a plain working baseline (73k params, big 8x8 head), SGD, no BN, no augmentation",
    target="Get the set-up right: data, loaders, a working model, the train/test loop, tracking.",
    analysis="Far too many parameters (9x the budget), most of them in the 8x8 head. It learns, but "
    "the train/test gap shows over-fitting. Next: cut kernels, use 1x1 transitions and GAP.",
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
    target="Under 8,000 parameters: fewer kernels, a 1x1 transition after the first block, GAP + 1x1 head; "
    "batch 64 for twice the updates per epoch.",
    analysis="Under budget, but without normalisation this deep narrow net trains slowly at a fixed "
    "lr and stays well short of 99.4%. Next: BatchNorm after every 3x3 conv.",
    batch_size=64,
)
def step2(dropout: float = 0.0) -> nn.Module:
    return skeleton(bn=False, dropout=dropout)


@register(
    "step3",
    "step2 + BatchNorm after every 3x3 conv",
    target="Add BatchNorm to every 3x3 block, so the small net trains fast and stably.",
    analysis="BatchNorm lifts train and test accuracy a lot for 144 extra parameters, but at a fixed "
    "lr the test accuracy wobbles from epoch to epoch. Next: an LR schedule.",
    batch_size=64,
)
def step3(dropout: float = 0.0) -> nn.Module:
    return skeleton(bn=True, dropout=dropout)


@register(
    "step4",
    "step3 + OneCycle LR schedule (SGD, Nesterov, peak lr 0.1)",
    target="Add a OneCycle schedule: a warm-up to a high lr, then annealing, for steady last epochs.",
    analysis="The schedule settles the last epochs, but the train accuracy runs ahead of test: the "
    "model starts to over-fit. Next: regularise with dropout and augmentation.",
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
    batch_size=64,
    ema=0.999,
)


@register(
    "step5",
    "step4 + channel dropout (Dropout2d) 0.01 + albumentations affine augmentation + EMA of the weights: our "
    "answer (7,574 params)",
    target="Regularise: channel dropout after every 3x3 block and affine augmentation (rotate, shift, scale), "
    "and evaluate an EMA of the weights, to reach >= 99.4% in every one of epochs 11-15, on every seed.",
    hold_from=11,
    analysis="Train accuracy now sits below test accuracy (the task got harder, not the test). Without an "
    "EMA, seed 4 dipped to 99.39% at epoch 11; evaluating an exponential moving average of the weights (decay "
    "0.999, about the last epoch of steps) fixed that, and with element-wise dropout 0.03 every one of seeds 1-5 "
    "held 99.47% or more in epochs 11-15. But on a CPU element-wise dropout's random number per activation was "
    "a large share of the training step, so the dropout is now per channel (Dropout2d): the compute got about "
    "1.8x faster (README, Speed). At 0.03 it regularised too hard for seed 3 (99.38% in epoch 15); without "
    "any dropout seed 3 also missed (99.36-99.41%). Dropout2d 0.01 was screened on seed 3 alone (99.50-99.55%), "
    "then seeds 1, 2, 4 and 5 were trained with it: every seed holds 99.41% or more in each of epochs 11-15, "
    "and a run takes about 5 minutes instead of 8.",
    **STEP5_RECIPE,
)
def step5(dropout: float = 0.01) -> nn.Module:
    return skeleton(bn=True, dropout=dropout)


def sep_block(cin: int, cout: int, dropout: float) -> list[nn.Module]:
    """Depthwise-separable 3x3: a 3x3 per channel, then a 1x1 mix, ReLU, BatchNorm [, Dropout2d] (9*cin +
    cin*cout weights instead of a full 3x3's 9*cin*cout: more width for the same parameters)."""
    layers = [
        nn.Conv2d(cin, cin, 3, groups=cin, bias=False),
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.ReLU(),
        nn.BatchNorm2d(cout),
    ]
    if dropout:
        layers.append(nn.Dropout2d(dropout))
    return layers


def separable(channels: tuple[int, int, int, int, int], dropout: float) -> nn.Module:
    """tiny's layout: step5's skeleton (same sizes and RF), with one full 3x3 on the single input channel
    and depthwise-separable blocks after it, widening. The weights a full 3x3 would spend on its 9*cin*cout
    buy width instead."""
    c1, c2, c3, c4, c5 = channels
    return nn.Sequential(
        *block(1, c1, True, dropout),  # 26x26  RF: 3 (1)
        *sep_block(c1, c2, dropout),  # 24x24  RF: 5 (1)
        nn.MaxPool2d(2),  # 12x12  RF: 6 (2)
        *sep_block(c2, c3, dropout),  # 10x10  RF: 10 (2)
        *sep_block(c3, c4, dropout),  # 8x8  RF: 14 (2)
        *sep_block(c4, c5, dropout),  # 6x6  RF: 18 (2)
        nn.AdaptiveAvgPool2d(1),  # 1x1  RF: 28 (GAP sees the whole 6x6 map)
        nn.Conv2d(c5, 10, 1, bias=False),  # 1x1  RF: 28  the head: c5 x 10 params
        nn.Flatten(),
    )


@register(
    "tiny",
    "Smaller than the smallest write-up model (5,178): step5's skeleton with depthwise-separable blocks after "
    "the first conv, wider; step5's recipe",
    target="Under 5,000 parameters, >= 99.4% in each of epochs 13-15 on every seed.",
    hold_from=13,
    analysis="Reached: every one of seeds 1-5 holds 99.41% or more in each of epochs 13-15 (seed 1 is the "
    "lowest, 99.41-99.44%). The first tiny (4,992 params) kept two full 3x3 blocks, the second (12->16) costing "
    "1,760 params, and a second max-pool to a 4x4 map: it held on 4 of 5 seeds (seed 2: 99.35-99.38%). Changes "
    "around it did not lift its mean: padding the first two blocks and weight decay 3e-4 each fixed seed 2 but "
    "dropped seed 1 or 3 below 99.40% (3-seed means 99.41-99.42% against 99.43%); no second pool and stronger "
    "augmentation did not fix seed 2 (99.39-99.44% and 99.32-99.37%). Making the second block separable too "
    "(12*9 + 12*24 weights instead of 12*16*9) paid for width everywhere after it, and step5's skeleton (one "
    "pool, GAP over 6x6) replaced the second pool: seed 2 went from 99.35-99.38% to 99.48-99.52%, with 120 "
    "fewer parameters. Screened as a scratch variant on seeds 2, 1 and 3 first.",
    **STEP5_RECIPE,
)
def tiny(dropout: float = 0.01) -> nn.Module:
    return separable((12, 24, 32, 32, 36), dropout)


@register(
    "tiny4k",
    "The stretch: tiny's layout under 4,000 parameters (narrower)",
    target="Under 4,000 parameters, >= 99.4% in each of epochs 13-15 on every seed.",
    hold_from=13,
    analysis="Reached, on all five seeds: the same layout with every width cut (12-20|28-28-32 instead of "
    "12-24|32-32-36) holds 99.53-99.54%, 99.41-99.44%, 99.50-99.55%, 99.42-99.45% and 99.54-99.55% in epochs "
    "13-15 on seeds 1-5. It is not worse than tiny: it beats tiny on seeds 1, 3 and 5 and trails it on seed 2, "
    "so at this recipe the seed matters more than the last 900 parameters. The previous tiny4k (the first "
    "tiny's layout at 3,874 params) held on 0 of 3 seeds (99.33-99.42%).",
    **STEP5_RECIPE,
)
def tiny4k(dropout: float = 0.01) -> nn.Module:
    return separable((12, 20, 28, 28, 32), dropout)


@register(
    "tiny3k",
    "Below the stretch: tiny's layout under 3,000 parameters (narrower again)",
    target="Under 3,000 parameters, >= 99.4% in each of epochs 13-15 on every seed.",
    hold_from=13,
    analysis="Not reached: 1 of 3 seeds. tiny's layout at 10-16|24-24-26 (2,960 params) gives 99.41-99.43% on "
    "seed 1, 99.36-99.41% on seed 2 and 99.32-99.39% on seed 3 in epochs 13-15. So the smallest count that holds "
    "on seeds 1-3 is tiny4k's 3,940; somewhere between 2,960 and 3,940 the layout stops holding.",
    **STEP5_RECIPE,
)
def tiny3k(dropout: float = 0.01) -> nn.Module:
    return separable((10, 16, 24, 24, 26), dropout)
