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
FOLDER = click.Path(file_okay=False, path_type=Path)


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
@click.option("--models", "names", callback=lambda c, p, v: check_models(c, p, v) if v else [],
              help="Comma-separated variants.")  # fmt: skip
@click.option("--seeds", default="1,2,3", show_default=True, callback=check_seeds, help="Comma-separated seeds.")
@click.option(
    "--samples",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Search: N sampled recipes per model and seed, ASHA early stopping on test_acc (0: no search).",
)
@click.option(
    "--cpus-per-run",
    type=POSITIVE_FLOAT,
    default=1.0,
    show_default=True,
    help="Ray CPUs per trial: its torch threads (fractions share a core).",
)
@click.option(
    "--gpus-per-run",
    type=NON_NEGATIVE_FLOAT,
    default=0.0,
    show_default=True,
    help="Ray GPUs per trial (0.25: four trials share a GPU).",
)
@click.option(
    "--address", envvar="RAY_ADDRESS", help="Ray cluster to join (env RAY_ADDRESS) [default: start Ray here]."
)
@click.option(
    "--max-failures",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Retries of a trial whose worker dies; each resumes from its last checkpoint.",
)
@click.option("--resume", metavar="SWEEP_RUN_ID", help="Finish a killed sweep: its finished trials are not re-run.")
@train_options
def sweep(names, seeds, samples, cpus_per_run, gpus_per_run, address, max_failures, resume, **options):
    """Train every model x seed (or search recipes) as Ray Tune trials, child runs of one parent run."""
    from trainer import tracking
    from trainer.sweep import new_spec
    from trainer.sweep import sweep as run_sweep

    tracking.check_store()
    ensure_mnist(options["data_dir"])
    if resume:
        failed = run_sweep(None, address, resume=resume, data_dir=options["data_dir"])
    elif not names:
        raise click.UsageError("give --models (or --resume SWEEP_RUN_ID)")
    else:
        configs = [config(name, seed, options) for name in names for seed in seeds]
        failed = run_sweep(new_spec(configs, samples, cpus_per_run, gpus_per_run, max_failures), address)
    if failed:
        raise click.ClickException(f"{failed} runs failed (see the sweep's parent run)")


@cli.command()
@click.option("--dir", "folder", default="mlflow-server", show_default=True, type=FOLDER,
              help="Folder of the PostgreSQL cluster and the artifacts.")  # fmt: skip
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--workers", type=POSITIVE_INT, default=2, show_default=True, help="mlflow server worker processes.")
@click.option("--allowed-hosts", help="Host headers to accept, e.g. 'tracking.lan:5000' [default: localhost only].")
def server(folder, host, port, workers, allowed_hosts):
    """A PostgreSQL-backed MLflow tracking server with basic auth; admin: MLFLOW_TRACKING_USERNAME/_PASSWORD."""
    from trainer.server import serve

    serve(folder, host, port, workers, allowed_hosts)


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


@cli.command("bench-sweep")
@click.option("--model", default="step5", show_default=True, callback=check_model)
@click.option("--runs", type=POSITIVE_INT, default=2, show_default=True, help="Runs (seeds 1..N) each way.")
@click.option("--epochs", type=POSITIVE_INT, default=1, show_default=True)
@click.option("--subset", type=POSITIVE_INT, help="Train/test on the first N images (a quick check).")
@data_dir_option
def bench_sweep(model, runs, epochs, subset, data_dir):
    """Runs/hour of N runs one after another vs one `trainer sweep` on a local Ray, and the ratio."""
    from trainer import sweep_bench

    ensure_mnist(data_dir)
    options = ["--epochs", str(epochs), "--data-dir", data_dir, *(["--subset", str(subset)] if subset else [])]
    click.echo(sweep_bench.table(sweep_bench.bench_sweep(model, runs, options)))


def main():
    cli(prog_name="trainer")


if __name__ == "__main__":
    main()
