"""The variants as a user browses them: `trainer models` (the table), `trainer models NAME` (one
variant's full recipe and notes) and `trainer summary NAME` (its layers and receptive field)."""

from dataclasses import fields

import models
from models.receptive import receptive_fields
from trainer import target
from trainer.config import Config
from trainer.results import latest_target_met


def variant_rows() -> tuple[list[str], list[list[str]]]:
    """Name, params, receptive field, target met (only where a store exists), description."""
    met = latest_target_met()
    rows = []
    for name in models.list_models():
        variant = models.get_variant(name)
        model = variant.build()
        rf = receptive_fields(model)[-1][2]
        rows.append([name, f"{models.num_params(model):,}", str(rf), met.get(name, "-"), variant.description])
    return ["model", "params", "RF", "target met (latest run)", "description"], rows


def describe(name: str) -> str:
    """One variant: description, params, its whole recipe (what `trainer train --model NAME` uses), notes."""
    variant = models.get_variant(name)
    n_params = models.num_params(variant.build())
    lines = [f"{name}: {variant.description}", "", f"params: {n_params:,} (limit: < {target.PARAM_LIMIT:,})"]
    if variant.hold_from:
        lines.append(f"target: >= {target.TARGET_ACC}% in every epoch from epoch {variant.hold_from} on")
    if variant.mean_target:
        lines.append(f"target: mean over seeds of the last-{target.LAST_EPOCHS} means >= {variant.mean_target:.2f}%")
    lines += ["", "recipe (each overridable: trainer train --model NAME --OPTION VALUE):"]
    for f in fields(Config):
        if f.metadata["recipe"]:
            value = variant.recipe[f.name]
            mark = "" if value == f.default else "   (default " + str(f.default) + ")"
            lines.append(f"  --{f.name.replace('_', '-'):18s} {value}{mark}")
    notes = models.notes(name)
    return "\n".join(lines + (["", notes.strip()] if notes else []))


def layer_table(name: str) -> str:
    """torchinfo's layer table with the receptive field after each layer."""
    import torchinfo

    model = models.get_model(name)
    info = torchinfo.summary(model, input_size=(1, 1, 28, 28), verbose=0, device="cpu")
    rf = {id(layer): (r, jump) for _, layer, r, jump in receptive_fields(model)}
    lines = [f"{name}: {models.get_variant(name).description}", ""]
    lines.append(f"{'layer':34s} {'output shape':>18s} {'params':>8s} {'RF':>4s} {'jump':>5s}")
    for layer in info.summary_list[1:]:
        r, jump = rf.get(id(layer.module), ("", ""))
        shape = "x".join(map(str, layer.output_size[1:]))
        lines.append(
            f"{layer.class_name + '-' + layer.var_name:34s} {shape:>18s} {layer.num_params:>8,d} {r:>4} {jump:>5}"
        )
    total, limit = info.total_params, target.PARAM_LIMIT
    verdict = "under" if total < limit else "OVER"
    lines.append(f"\ntotal params: {total:,} ({verdict} the {limit:,} limit by {abs(limit - total):,})")
    lines.append(f"receptive field at the output: {receptive_fields(model)[-1][2]} px (input 28 px)")
    return "\n".join(lines)
