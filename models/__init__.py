"""A timm-style registry: `@register(...)` a builder, `get_model(name)`, `list_models()`.

Every variant carries a one-line description, its training recipe (overrides of `DEFAULT_RECIPE`,
each overridable again from the CLI) and its Target / Analysis text in the write-ups' style.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

# Every hyperparameter a recipe can set, in one place. A variant's recipe overrides some of these.
DEFAULT_RECIPE = {
    "epochs": 15,
    "batch_size": 128,
    "optimizer": "sgd",  # sgd | adam | adamw
    "lr": 0.01,  # the peak lr for onecycle
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 0.0,
    "scheduler": "none",  # none | step | onecycle | cosine
    "step_size": 5,  # step: epochs between decays
    "gamma": 0.1,  # step: decay factor
    "pct_start": 0.3,  # onecycle: share of steps spent warming up
    "div_factor": 25.0,  # onecycle: initial lr = lr / div_factor
    "final_div_factor": 1e4,  # onecycle: final lr = initial lr / final_div_factor
    "augment": "none",  # none | light | standard
    "dropout": 0.0,
    "ema": 0.0,  # decay of an exponential moving average of the weights, evaluated and saved (0 = off)
}


@dataclass(frozen=True)
class Variant:
    name: str
    builder: Callable[..., nn.Module]
    description: str
    recipe: dict = field(default_factory=dict)
    target: str = ""
    analysis: str = ""
    claim: str = ""  # reproductions: what the write-up reports ...
    claim_check: tuple[int, int, float] | None = None  # ... as (first epoch, last epoch, min test acc %)
    hold_from: int | None = None  # our targets: every epoch from this one on reaches 99.4%

    def build(self, dropout: float | None = None) -> nn.Module:
        return self.builder(dropout=self.recipe["dropout"] if dropout is None else dropout)


_REGISTRY: dict[str, Variant] = {}


def register(
    name: str,
    description: str,
    target: str = "",
    analysis: str = "",
    claim: str = "",
    claim_check=None,
    hold_from: int | None = None,
    **recipe,
):
    """Register `builder(dropout=...) -> nn.Module` under `name` with its recipe overrides."""
    unknown = set(recipe) - set(DEFAULT_RECIPE)
    if unknown:
        raise TypeError(f"{name}: unknown recipe keys {sorted(unknown)}")

    def deco(builder):
        recipe_ = {**DEFAULT_RECIPE, **recipe}
        _REGISTRY[name] = Variant(name, builder, description, recipe_, target, analysis, claim, claim_check, hold_from)
        return builder

    return deco


class UnknownModel(KeyError):
    def __str__(self):
        return f"unknown model {self.args[0]!r}; valid names: {', '.join(list_models())}"


def get_variant(name: str) -> Variant:
    if name not in _REGISTRY:
        raise UnknownModel(name)
    return _REGISTRY[name]


def get_model(name: str, dropout: float | None = None) -> nn.Module:
    return get_variant(name).build(dropout)


def list_models() -> list[str]:
    return list(_REGISTRY)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


from models import ours, refs  # noqa: E402,F401  (registers the variants)
