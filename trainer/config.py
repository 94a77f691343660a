"""The training configuration, declared once.

`Config` is the one place where a training setting is declared: its type, default, range or choices
and help. Everything else is derived from it: the click options of `train`, `sweep` and `bench`
(trainer/cli.py), the check of MLproject's parameters (tests), the check of every variant's recipe
at registration (models/__init__.py), the params and `config.json` a run logs, and the config stored
in every checkpoint, which `--resume` reads back typed.

Fields marked `recipe` are a variant's hyperparameters: a variant's recipe overrides their defaults,
and any of them can be overridden again from the command line. The others describe the run, not the
method (seed, device, data).

No heavy imports here: the CLI reads this module to answer `--help` at once.
"""

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import get_args, get_origin

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "step", "onecycle", "cosine")
AUGMENTS = ("none", "light", "standard")  # the pipelines themselves: trainer/augment.py
DEVICES = ("auto", "cpu", "cuda", "mps")
DATA_DIR_ENV = "MNIST8K_DATA_DIR"


def setting(default, help: str, *, recipe=False, choices=None, low=None, high=None, low_open=False, high_open=False,
            env=None, legacy=MISSING):  # fmt: skip
    """A field with its CLI help, its valid values, the environment variable that sets it (`env`), and
    (`legacy`) the value that runs logged before the field existed had (used when reading them back)."""
    meta = dict(help=help, recipe=recipe, choices=choices, low=low, high=high, low_open=low_open, high_open=high_open,
                env=env)  # fmt: skip
    return field(default=default, metadata={**meta, "legacy": default if legacy is MISSING else legacy})


@dataclass
class Config:
    """The whole resolved configuration of one training run."""

    model: str = setting("step5", "Variant to train (`trainer models`).")
    # -- the recipe: a variant's hyperparameters --
    epochs: int = setting(15, "Training epochs.", recipe=True, low=1)
    batch_size: int = setting(128, "Images per training step.", recipe=True, low=1)
    optimizer: str = setting("sgd", "Optimizer.", recipe=True, choices=OPTIMIZERS)
    lr: float = setting(0.01, "Learning rate (the peak for onecycle).", recipe=True, low=0, low_open=True)
    momentum: float = setting(0.9, "SGD momentum.", recipe=True, low=0, high=1, high_open=True)
    nesterov: bool = setting(False, "SGD with Nesterov momentum.", recipe=True)
    betas: tuple[float, float] = setting((0.9, 0.999), "adam/adamw: decays of the moment estimates (B1,B2).",
                                         recipe=True, low=0, high=1, high_open=True)  # fmt: skip
    weight_decay: float = setting(0.0, "L2 penalty (decoupled for adamw).", recipe=True, low=0)
    scheduler: str = setting("none", "Learning-rate schedule, stepped every batch.", recipe=True, choices=SCHEDULERS)
    step_size: int = setting(5, "step: epochs between lr decays.", recipe=True, low=1)
    gamma: float = setting(0.1, "step: lr decay factor.", recipe=True, low=0, low_open=True)
    pct_start: float = setting(0.3, "onecycle: share of steps spent warming up.", recipe=True, low=0, high=1,
                               low_open=True, high_open=True)  # fmt: skip
    div_factor: float = setting(25.0, "onecycle: initial lr = lr / div_factor.", recipe=True, low=1)
    final_div_factor: float = setting(1e4, "onecycle: final lr = initial lr / final_div_factor.", recipe=True, low=1)
    augment: str = setting("none", "Augmentation pipeline (albumentations).", recipe=True, choices=AUGMENTS)
    clean_epochs: int = setting(0, "Last epochs trained on the images as they are, without augmentation.",
                                recipe=True, low=0)  # fmt: skip
    dropout: float = setting(0.0, "Dropout probability.", recipe=True, low=0, high=1, high_open=True)
    ema: float = setting(0.0, "Decay of a moving average of the weights, evaluated and saved instead (0 = off).",
                         recipe=True, low=0, high=1, high_open=True)  # fmt: skip
    # -- the run --
    seed: int = setting(1, "Seed: the same seed on the same machine gives the same per-epoch metrics.")
    device: str = setting("auto", "Where to train.", choices=DEVICES)
    amp: bool | None = setting(None, "bf16 autocast [default: on where the device has native bf16: CUDA GPUs, "
                               "CPUs with AMX or AVX512-BF16].", legacy=False)  # fmt: skip
    compile: bool = setting(False, "torch.compile the model (needs a C++ compiler).")
    channels_last: bool = setting(True, "NHWC memory layout (faster on CPUs).", legacy=False)
    subset: int | None = setting(None, "Train and test on the first N images only (a smoke run) [default: all].", low=1,
                                 high=60_000, high_open=True)  # fmt: skip
    workers: int | None = setting(None, "DataLoader workers [default: CPU count - 1, at most 8].", low=0)
    data_dir: str = setting("./data", "MNIST folder (torchvision layout).", env=DATA_DIR_ENV)

    def __post_init__(self):
        check(self)

    @classmethod
    def for_variant(cls, recipe: dict, **overrides) -> "Config":
        """A variant's recipe, with every override that is not None on top."""
        return cls(**{**recipe, **{k: v for k, v in overrides.items() if v is not None}})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """Typed back from `asdict` (a checkpoint, config.json); fields it lacks take their legacy value."""
        return cls(**{f.name: parse(f, values[f.name]) if f.name in values else legacy(f) for f in fields(cls)})

    @classmethod
    def from_params(cls, params: dict[str, str]) -> "Config":
        """Typed back from a run's logged params (strings); fields it lacks take their legacy value."""
        if "model" not in params or "epochs" not in params:
            raise ValueError("not a trainer run: its params have no model and epochs")
        return cls(**{f.name: parse(f, params[f.name]) if f.name in params else legacy(f) for f in fields(cls)})


def value_type(f) -> type:
    """int for `int | None`, tuple for `tuple[float, float]`, etc."""
    if get_origin(f.type) is tuple:
        return tuple
    return next((t for t in get_args(f.type) if t is not type(None)), f.type)


def legacy(f):
    return f.metadata["legacy"]


def parse(f, raw):
    """A field's value from what a store holds: the typed value itself, or the string MLflow logged."""
    if not isinstance(raw, str) or value_type(f) is str:
        return tuple(raw) if isinstance(raw, list) else raw
    if raw == "None":
        return None
    kind = value_type(f)
    if kind is bool:
        return raw == "True"
    if kind is tuple:
        return tuple(float(x) for x in raw.strip("()[] ").split(","))
    return kind(raw)


def problem(f, value) -> str | None:
    """Why `value` is not valid for field `f`, or None."""
    meta = f.metadata
    if value is None:
        return None if f.default is None else "must be set"
    if meta["choices"] and value not in meta["choices"]:
        return f"must be one of {', '.join(meta['choices'])}"
    for v in value if isinstance(value, tuple) else [value]:
        if isinstance(v, float) and not math.isfinite(v):
            return "must be a finite number"
        if meta["low"] is not None and (v < meta["low"] or (meta["low_open"] and v == meta["low"])):
            return f"must be {'>' if meta['low_open'] else '>='} {meta['low']}"
        if meta["high"] is not None and (v > meta["high"] or (meta["high_open"] and v == meta["high"])):
            return f"must be {'<' if meta['high_open'] else '<='} {meta['high']}"
    return None


def check(cfg: Config) -> None:
    for f in fields(cfg):
        why = problem(f, getattr(cfg, f.name))
        if why:
            raise ValueError(f"{f.name} = {getattr(cfg, f.name)!r}: {why}")


RECIPE_FIELDS = [f for f in fields(Config) if f.metadata["recipe"]]


def recipe(**overrides) -> dict:
    """A variant's full recipe: the recipe fields' defaults with `overrides` on top, each checked."""
    by_name = {f.name: f for f in RECIPE_FIELDS}
    unknown = set(overrides) - set(by_name)
    if unknown:
        raise TypeError(f"unknown recipe keys {sorted(unknown)}; valid: {', '.join(by_name)}")
    values = {f.name: f.default for f in RECIPE_FIELDS} | overrides
    for name, value in overrides.items():
        why = problem(by_name[name], value)
        if why:
            raise ValueError(f"recipe {name} = {value!r}: {why}")
    return values
