"""A timm-style registry: `@register(...)` a builder, `get_model(name)`, `list_models()`.

Every variant carries a one-line description and its training recipe: overrides of the recipe
fields of `trainer.config.Config`, checked against that schema here, at registration. Its Target /
Analysis prose, in the write-ups' style, lives in `models/notes/<name>.md` (`notes(name)`).

Listing the variants imports no torch: `nn` below is torch.nn, imported the first time a builder
runs, so `trainer --help` and shell completion of model names answer at once.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trainer.config import recipe as full_recipe

NOTES = Path(__file__).parent / "notes"


class LazyModule:
    """A module imported on first attribute access."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self.name), attr)


nn = LazyModule("torch.nn")


@dataclass(frozen=True)
class Variant:
    name: str
    builder: Callable
    description: str
    recipe: dict  # every recipe field, resolved
    claim_check: tuple[int, int, float] | None = (
        None  # reproductions: the write-up's claim as (first, last epoch, min %)
    )
    hold_from: int | None = None  # our targets: every epoch from this one on reaches 99.4%
    mean_target: float | None = None  # and the mean over seeds of the last-3 means reaches this (%)

    def build(self, dropout: float | None = None):
        return self.builder(dropout=self.recipe["dropout"] if dropout is None else dropout)


_REGISTRY: dict[str, Variant] = {}


def register(
    name: str,
    description: str,
    claim_check=None,
    hold_from: int | None = None,
    mean_target: float | None = None,
    **recipe,
):
    """Register `builder(dropout=...) -> nn.Module` under `name` with its recipe overrides."""
    try:
        resolved = full_recipe(**recipe)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: {e}") from None

    def deco(builder):
        _REGISTRY[name] = Variant(name, builder, description, resolved, claim_check, hold_from, mean_target)
        return builder

    return deco


class UnknownModel(KeyError):
    def __str__(self):
        return f"unknown model {self.args[0]!r}; valid names: {', '.join(list_models())}"


def get_variant(name: str) -> Variant:
    if name not in _REGISTRY:
        raise UnknownModel(name)
    return _REGISTRY[name]


def get_model(name: str, dropout: float | None = None):
    return get_variant(name).build(dropout)


def list_models() -> list[str]:
    return list(_REGISTRY)


def notes(name: str) -> str:
    """The variant's Target / Analysis text (Markdown), or '' if it has none."""
    path = NOTES / f"{name}.md"
    return path.read_text() if path.is_file() else ""


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


from models import ours, refs  # noqa: E402,F401  (registers the variants)
