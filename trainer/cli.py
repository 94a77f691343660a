"""The `trainer` command line (click). Every user error is one line on stderr and a non-zero exit."""

from pathlib import Path

import click
from mlflow.exceptions import MlflowException

import models
from trainer import engine
from trainer.augment import AUGMENTS
from trainer.data import DATA_DIR_ENV, DEFAULT_DATA_DIR, DataError, ensure_mnist

POSITIVE_INT = click.IntRange(min=1)
POSITIVE_FLOAT = click.FloatRange(min=0, min_open=True)
NON_NEGATIVE_FLOAT = click.FloatRange(min=0)


class RecipeOr(click.ParamType):
    """A value, or the word `recipe` (what MLproject passes by default): use the variant's recipe."""

    def __init__(self, inner: click.ParamType):
        self.inner = inner
        self.name = f"{inner.name}|recipe"

    def convert(self, value, param, ctx):
        if value is None or value == "recipe":
            return None
        return self.inner.convert(value, param, ctx)


class Group(click.Group):
    """Turns the errors a user can cause into one line and exit 1 (usage errors stay exit 2)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (DataError, ValueError, MlflowException, OSError, engine.NonFiniteLoss) as e:
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise click.ClickException(message) from None


class UsageLine(click.ClickException):
    """A one-line error with exit code 2 (no usage block): for unknown names."""

    exit_code = 2


def check_model(ctx, param, value):
    try:
        models.get_variant(value)
    except models.UnknownModel as e:
        raise UsageLine(str(e)) from None
    return value


def check_models(ctx, param, value):
    names = [n.strip() for n in value.split(",") if n.strip()]
    return [check_model(ctx, param, n) for n in names]


def check_seeds(ctx, param, value):
    try:
        return [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None


def choice(name: str, valid):
    def check(ctx, param, value):
        if value is not None and value != "recipe" and value not in valid:
            raise UsageLine(f"unknown {name} {value!r}; valid names: {', '.join(valid)}")
        return None if value == "recipe" else value

    return check


data_dir_option = click.option(
    "--data-dir",
    default=DEFAULT_DATA_DIR,
    envvar=DATA_DIR_ENV,
    show_default=True,
    help=f"MNIST folder (torchvision layout); env {DATA_DIR_ENV}.",
)

# The training options shared by `train` and `sweep`. Left out, each comes from the variant's recipe.
TRAIN_OPTIONS = [
    click.option("--epochs", type=RecipeOr(POSITIVE_INT)),
    click.option("--batch-size", type=RecipeOr(POSITIVE_INT)),
    click.option("--optimizer", callback=choice("optimizer", engine.OPTIMIZERS), help="sgd | adam | adamw"),
    click.option("--lr", type=RecipeOr(POSITIVE_FLOAT), help="Learning rate (the peak for onecycle)."),
    click.option("--momentum", type=RecipeOr(NON_NEGATIVE_FLOAT)),
    click.option("--nesterov/--no-nesterov", default=None),
    click.option("--weight-decay", type=RecipeOr(NON_NEGATIVE_FLOAT)),
    click.option("--scheduler", callback=choice("scheduler", engine.SCHEDULERS), help="none|step|onecycle|cosine"),
    click.option("--step-size", type=RecipeOr(POSITIVE_INT), help="step: epochs between lr decays."),
    click.option("--gamma", type=RecipeOr(POSITIVE_FLOAT), help="step: lr decay factor."),
    click.option("--pct-start", type=RecipeOr(click.FloatRange(0, 1, min_open=True, max_open=True))),
    click.option("--augment", callback=choice("augment", list(AUGMENTS)), help="none | light | standard"),
    click.option("--dropout", type=RecipeOr(click.FloatRange(0, 1, max_open=True))),
    click.option(
        "--ema",
        type=RecipeOr(click.FloatRange(0, 1, max_open=True)),
        help="Decay of a moving average of the weights, evaluated and saved instead (0 = off).",
    ),
    click.option("--device", default="auto", show_default=True, callback=choice("device", engine.DEVICES)),
    click.option("--amp", is_flag=True, default=None, help="bf16 autocast (CUDA; CPUs with native bf16)."),
    click.option("--compile", "compile", is_flag=True, default=None, help="torch.compile the model (needs g++)."),
    click.option(
        "--channels-last/--no-channels-last", default=None, help="NHWC memory layout [default: on, faster here]."
    ),
    click.option("--subset", type=RecipeOr(POSITIVE_INT), help="Train/test on the first N images (smoke tests)."),
    click.option("--workers", type=click.IntRange(min=0), help="DataLoader workers [default: CPU count - 1]."),
    data_dir_option,
]


def train_options(f):
    for option in reversed(TRAIN_OPTIONS):
        f = option(f)
    return f


def config(model: str, seed: int, options: dict) -> engine.Config:
    return engine.Config.from_recipe(model, models.get_variant(model).recipe, seed=seed, **options)


@click.group(cls=Group)
def cli():
    """mnist8k: train tiny CNNs to 99.4% on MNIST, tracked in MLflow."""


@cli.command()
@data_dir_option
def data(data_dir):
    """Make the four MNIST IDX files present and md5-verified."""
    ensure_mnist(data_dir)


@cli.command("models")
@click.option("--markdown", is_flag=True, help="As a Markdown table (the README's variant table).")
def list_models_cmd(markdown):
    """List the variants: params, receptive field, target met by the latest tracked run."""
    from models.receptive import receptive_fields
    from trainer.results import latest_target_met, markdown_table, text_table

    met = latest_target_met()
    rows = []
    for name in models.list_models():
        variant = models.get_variant(name)
        model = variant.build()
        rf = receptive_fields(model)[-1][2]
        rows.append([name, f"{models.num_params(model):,}", str(rf), met.get(name, "-"), variant.description])
    header = ["model", "params", "RF", "target met (latest run)", "description"]
    click.echo(markdown_table(header, rows) if markdown else text_table(header, rows))


@cli.command()
@click.argument("name", callback=check_model)
def summary(name):
    """Layer table (torchinfo) with the receptive field after each layer."""
    import torchinfo

    from models.receptive import receptive_fields

    model = models.get_model(name)
    info = torchinfo.summary(model, input_size=(1, 1, 28, 28), verbose=0, device="cpu")
    rf = {id(layer): (r, jump) for _, layer, r, jump in receptive_fields(model)}
    click.echo(f"{name}: {models.get_variant(name).description}\n")
    click.echo(f"{'layer':34s} {'output shape':>18s} {'params':>8s} {'RF':>4s} {'jump':>5s}")
    for layer in info.summary_list[1:]:
        r, jump = rf.get(id(layer.module), ("", ""))
        shape = "x".join(map(str, layer.output_size[1:]))
        click.echo(
            f"{layer.class_name + '-' + layer.var_name:34s} {shape:>18s} {layer.num_params:>8,d} {r:>4} {jump:>5}"
        )
    total = info.total_params
    verdict = "under" if total < 8000 else "OVER"
    click.echo(f"\ntotal params: {total:,} ({verdict} the 8,000 limit by {abs(8000 - total):,})")
    click.echo(f"receptive field at the output: {receptive_fields(model)[-1][2]} px (input 28 px)")


@cli.command()
@click.option("--model", default="step5", show_default=True, callback=check_model, help="Variant (`trainer models`).")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--resume", "resume", metavar="RUN_ID", help="Continue a killed run from its last checkpoint.")
@train_options
def train(model, seed, resume, **options):
    """Train one variant; options left out come from the variant's recipe (`trainer models`)."""
    from trainer import tracking

    tracking.check_store()
    if resume:
        cfg = tracking.config_of_run(resume)
        cfg.data_dir = options["data_dir"]  # where the data lives is not part of the recipe
    else:
        cfg = config(model, seed, options)
    ensure_mnist(cfg.data_dir)
    tracking.train(cfg, resume_run_id=resume)


@cli.command()
@click.option("--models", "names", required=True, callback=check_models, help="Comma-separated variants.")
@click.option("--seeds", default="1,2,3", show_default=True, callback=check_seeds, help="Comma-separated seeds.")
@train_options
def sweep(names, seeds, **options):
    """Train every model x seed as child runs of one parent run, which logs mean/std per model."""
    from trainer import tracking

    tracking.check_store()
    ensure_mnist(options["data_dir"])
    failed = tracking.sweep([config(name, seed, options) for name in names for seed in seeds])
    if failed:
        raise click.ClickException(f"{failed} of {len(names) * len(seeds)} runs failed (see the parent run)")


@cli.command()
@click.option("--experiment", help="Experiment name [default: MLFLOW_EXPERIMENT_NAME or mnist8k].")
@click.option("--filter", "filter_string", default="", help="MLflow search filter, e.g. \"params.model = 'step5'\".")
@click.option("--all", "include_subset", is_flag=True, help="Include --subset smoke runs.")
def compare(experiment, filter_string, include_subset):
    """Table of finished runs: the columns the MLflow UI's compare view shows."""
    from trainer.results import COMPARE_COLUMNS, compare_rows, search, text_table

    runs = search(experiment, filter_string, full_only=not include_subset)
    if not runs:
        click.echo("no finished runs match")
        return
    click.echo(text_table(COMPARE_COLUMNS, compare_rows(runs)))


@cli.command()
@click.option("--experiment", help="Experiment name [default: MLFLOW_EXPERIMENT_NAME or mnist8k].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write to FILE (atomically).")
def report(experiment, out):
    """The Markdown results section, generated from the tracked runs."""
    from trainer.data import atomic_write
    from trainer.results import report as make_report

    text = make_report(experiment)
    if out:
        atomic_write(out, text.encode())
        click.echo(f"wrote {out}")
    else:
        click.echo(text)


@cli.command()
@click.option("--experiment", help="Experiment name [default: MLFLOW_EXPERIMENT_NAME or mnist8k].")
def register(experiment):
    """Register each variant's best full run as the model version models:/mnist8k-<variant>@best."""
    from trainer.registry import ALIAS, register_best
    from trainer.results import text_table

    rows = [
        [f"models:/{name}@{ALIAS}", version, run.info.run_name, run.info.run_id, f"{run.data.metrics['test_acc']:.2f}"]
        for name, version, run in register_best(experiment)
    ]
    if not rows:
        click.echo("no finished full-data runs to register")
        return
    click.echo(text_table(["model", "version", "run", "run id", "test acc"], rows))


@cli.command()
@click.argument("model")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="A JSON list: file, class, confidence, probabilities.")
def predict(model, files, as_json):
    """Classify the digits in image files (PNG, JPEG, ...: any size, dark on light or light on dark) and
    IDX files. MODEL: a run id, runs:/RUN_ID/model or models:/NAME@ALIAS (models:/mnist8k-step5@best)."""
    import json
    import os

    import mlflow
    import numpy as np

    from trainer import serving
    from trainer.predict import read_digits
    from trainer.tracking import DEFAULT_TRACKING_URI

    digits = [digit for path in files for digit in read_digits(path)]  # a bad file fails before the model loads
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
    pyfunc = mlflow.pyfunc.load_model(serving.model_uri(model))
    probabilities = serving.probabilities(pyfunc, np.stack([image for _, image in digits]))
    rows = [
        {"file": name, "class": int(p.argmax()), "confidence": float(p.max()), "probabilities": p.tolist()}
        for (name, _), p in zip(digits, probabilities, strict=True)
    ]
    if as_json:
        click.echo(json.dumps(rows))
        return
    width = max(len(row["file"]) for row in rows)
    for row in rows:
        click.echo(f"{row['file']:<{width}}  {row['class']}  ({100 * row['confidence']:.1f}%)")


@cli.command()
@click.option("--model", default="step5", show_default=True, callback=check_model)
@click.option("--batch-size", type=POSITIVE_INT, help="[default: the model's recipe]")
@click.option("--batches", type=POSITIVE_INT, default=200, show_default=True, help="Batches timed for floor and plain.")
@click.option("--repeats", type=POSITIVE_INT, default=3, show_default=True)
@click.option("--subset", type=POSITIVE_INT, help="Our epoch on the first N images only (a quick check).")
@click.option("--workers", type=click.IntRange(min=0), help="DataLoader workers [default: CPU count - 1].")
@click.option("--device", default="auto", show_default=True, callback=choice("device", engine.DEVICES))
@click.option("--amp", is_flag=True, default=None)
@click.option("--compile", "compile", is_flag=True, default=None)
@click.option("--channels-last/--no-channels-last", default=None, help="[default: on]")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the result.")
@data_dir_option
def bench(model, batches, repeats, json_path, **options):
    """Images/s of the compute floor, the write-ups' plain loop and our pipeline, side by side."""
    from trainer import bench as benchmark

    ensure_mnist(options["data_dir"])
    cfg = config(model, 1, options)
    result = benchmark.bench(cfg, batches, repeats)
    click.echo(benchmark.table(result))
    if json_path:
        benchmark.write_json(result, json_path)


def main():
    cli(prog_name="trainer")


if __name__ == "__main__":
    main()
