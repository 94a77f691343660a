"""The `trainer` command line (click).

Options come from the config schema (`trainer.config.Config`): one option per field, with its type,
range, choices (which shell completion offers) and help. Torch and MLflow are imported only inside
the commands that use them, so `--help` and completion answer at once. Every user error is one line
on stderr and a non-zero exit (`--debug` shows the traceback); Ctrl-C exits 130, SIGTERM 143.
"""

import json
import logging
import math
import os
import sys
from dataclasses import fields
from pathlib import Path

import click
from click.core import ParameterSource

import models
from trainer.config import Config, value_type

log = logging.getLogger("trainer")
EXPLICIT = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
RESUME_OVERRIDES = ("data_dir", "workers")  # where the data lives and how it is loaded: not the method


class UsageLine(click.ClickException):
    """A one-line error with exit code 2 (no usage block): for unknown names."""

    exit_code = 2


class Names(click.Choice):
    """A choice whose error is one line listing the valid names."""

    def __init__(self, kind: str, names):
        super().__init__(list(names))
        self.kind = kind

    def convert(self, value, param, ctx):
        if value not in self.choices:
            raise UsageLine(f"unknown {self.kind} {value!r}; valid names: {', '.join(self.choices)}")
        return value


class Finite(click.FloatRange):
    """A float in range that is a number (nan and inf are not)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class Pair(click.ParamType):
    """Two comma-separated floats, each in range: `0.9,0.999`."""

    name = "B1,B2"

    def __init__(self, each: click.ParamType):
        self.each = each

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = str(value).split(",")
        if len(parts) != 2:
            self.fail(f"{value!r} is not two comma-separated numbers", param, ctx)
        return tuple(self.each.convert(p, param, ctx) for p in parts)


class RecipeOr(click.ParamType):
    """A value, or the word `recipe` (what MLproject passes by default): use the variant's recipe."""

    def __init__(self, inner: click.ParamType):
        self.inner = inner
        self.name = inner.name

    def convert(self, value, param, ctx):
        return None if value is None or value == "recipe" else self.inner.convert(value, param, ctx)

    def shell_complete(self, ctx, param, incomplete):
        return self.inner.shell_complete(ctx, param, incomplete)

    def get_metavar(self, param, ctx):
        return self.inner.get_metavar(param, ctx) or self.inner.name.upper()


def param_type(f) -> click.ParamType:
    meta, kind = f.metadata, value_type(f)
    if f.name == "model":
        return Names("model", models.list_models())
    if meta["choices"]:
        return Names(f.name, meta["choices"])
    bounds = dict(min=meta["low"], max=meta["high"], min_open=meta["low_open"], max_open=meta["high_open"])
    if kind is int:
        return click.IntRange(**bounds)
    if kind is float:
        return Finite(**bounds)
    if kind is tuple:
        return Pair(Finite(**bounds))
    return click.STRING


def config_option(f):
    """The click option of one Config field. Left out, a recipe field takes the variant's recipe value and
    any other field its schema default (`None` here means exactly that)."""
    flag = "--" + f.name.replace("_", "-")
    if f.metadata["recipe"]:
        shown = f"[default: the variant's recipe; else {f.default}]"
    elif f.default is None:
        shown = ""
    else:
        shown = f"[default: {f.default}{'; env ' + f.metadata['env'] if f.metadata['env'] else ''}]"
    help_text = f"{f.metadata['help']} {shown}".strip()
    if value_type(f) is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_text)
    return click.option(flag, f.name, type=RecipeOr(param_type(f)), envvar=f.metadata["env"], help=help_text)


def config_options(*names: str):
    """Decorator: the options of the named Config fields (all of them when none are named)."""
    chosen = [f for f in fields(Config) if not names or f.name in names]

    def decorate(command):
        for f in reversed(chosen):
            command = config_option(f)(command)
        return command

    return decorate


def resolve(options: dict) -> Config:
    """The variant's recipe with the options given on top."""
    name = options.get("model") or Config.model
    return Config.for_variant(models.get_variant(name).recipe, **{**options, "model": name})


class Group(click.Group):
    """One line for every error a user can cause, exit 130/143 on Ctrl-C/SIGTERM, and `--debug`."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", 2)
            click.echo(f"interrupted ({'SIGTERM' if signum == 15 else 'Ctrl-C'})", err=True)
            sys.exit(128 + signum)
        except Exception as e:
            if ctx.meta.get("debug"):
                raise
            message = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if not isinstance(e, ValueError | OSError) and not type(e).__module__.startswith(("mlflow", "trainer")):
                message = f"{type(e).__name__}: {message} (--debug shows the traceback)"
            raise click.ClickException(message) from None


class Echo(logging.Handler):
    """Log lines through tqdm, so they don't break a progress bar."""

    def emit(self, record):
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr if record.levelno >= logging.WARNING else sys.stdout)


@click.group(cls=Group)
@click.version_option(package_name="mnist8k", prog_name="trainer")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors (no per-epoch lines, no bars).")
@click.option("--debug", is_flag=True, help="Show the traceback behind an error.")
@click.pass_context
def cli(ctx, quiet, debug):
    """mnist8k: train tiny CNNs to 99.4% on MNIST, tracked in MLflow."""
    ctx.meta["debug"] = debug
    log.handlers[:] = [Echo()]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"


@cli.command()
@config_options("data_dir")
def data(data_dir):
    """Make the four MNIST IDX files present and md5-verified."""
    from trainer.data import default_data_dir, ensure_mnist

    ensure_mnist(data_dir or default_data_dir(), log=log.info)


@cli.command("models")
@click.argument("name", required=False, type=Names("model", models.list_models()))
@click.option("--markdown", is_flag=True, help="As a Markdown table (the README's variant table).")
def list_models_cmd(name, markdown):
    """The variants (params, receptive field, target met by the latest tracked run); with NAME, one
    variant's full recipe and notes."""
    from trainer.results import markdown_table, text_table
    from trainer.zoo import describe, variant_rows

    if name:
        click.echo(describe(name))
        return
    header, rows = variant_rows()
    click.echo(markdown_table(header, rows) if markdown else text_table(header, rows))


@cli.command()
@click.argument("name", type=Names("model", models.list_models()))
def summary(name):
    """Layer table (torchinfo) with the receptive field after each layer."""
    from trainer.zoo import layer_table

    click.echo(layer_table(name))


@cli.command()
@config_options()
@click.option("--resume", metavar="RUN_ID", help="Continue a killed run from its last good checkpoint.")
@click.pass_context
def train(ctx, resume, **options):
    """Train one variant; options left out come from its recipe (`trainer models NAME`)."""
    from trainer import store, tracking

    if resume is not None:
        if not resume.strip():
            raise click.BadParameter("needs a run id", param_hint="--resume")
        given = [n for n in options if ctx.get_parameter_source(n) in EXPLICIT and n not in RESUME_OVERRIDES]
        if given:
            flags = ", ".join("--" + n.replace("_", "-") for n in given)
            raise click.UsageError(f"--resume continues the run with its own config: drop {flags}")
    store.setup()
    if resume:
        tracking.train(resume_run_id=resume, overrides={n: options[n] for n in RESUME_OVERRIDES})
    else:
        tracking.train(resolve(options))


@cli.command()
@click.option("--models", "names", help="Comma-separated variants.")
@click.option("--seeds", default="1,2,3", show_default=True, help="Comma-separated seeds.")
@click.option(
    "--samples",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Search: N sampled recipes per model and seed, ASHA early stopping on test_acc (0: no search).",
)
@click.option(
    "--cpus-per-run",
    type=Finite(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Ray CPUs per trial: its torch threads (fractions share a core).",
)
@click.option(
    "--gpus-per-run",
    type=Finite(min=0),
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
@config_options(*[f.name for f in fields(Config) if f.name not in ("model", "seed")])
def sweep(names, seeds, samples, cpus_per_run, gpus_per_run, address, max_failures, resume, **options):
    """Train every model x seed (or search recipes) as Ray Tune trials, child runs of one parent run."""
    from trainer import store
    from trainer.data import default_data_dir, ensure_mnist
    from trainer.sweep import new_spec
    from trainer.sweep import sweep as run_sweep

    chosen = [n.strip() for n in (names or "").split(",") if n.strip()]
    for name in chosen:
        Names("model", models.list_models()).convert(name, None, None)
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"{seeds!r} is not a comma-separated list of integers", param_hint="--seeds") from None
    store.setup()
    ensure_mnist(options["data_dir"] or default_data_dir(), log=log.info)
    if resume:
        failed = run_sweep(None, address, resume=resume, data_dir=options["data_dir"])
    elif not chosen:
        raise click.UsageError("give --models (or --resume SWEEP_RUN_ID)")
    else:
        configs = [resolve({**options, "model": name, "seed": seed}) for name in chosen for seed in seed_list]
        failed = run_sweep(new_spec(configs, samples, cpus_per_run, gpus_per_run, max_failures), address)
    if failed:
        raise click.ClickException(f"{failed} of the sweep's trials failed or are unfinished (see above)")


@cli.command()
@click.option("--dir", "folder", default="mlflow-server", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Folder of the PostgreSQL cluster and the artifacts.")  # fmt: skip
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="mlflow server workers.")
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
@click.option(
    "--figure",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw the accuracy-vs-parameters frontier to this PNG [default with --out: frontier.png beside it].",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write every epoch's test accuracy of the same runs, with their hardware, to this JSON file "
    "(keeping the runs it holds from other hardware), and show each seed's worst epoch per hardware.",
)
def report(experiment, out, figure, json_out):
    """The Markdown results section, generated from the tracked runs."""
    from trainer.files import atomic_write
    from trainer.results import per_epoch, read_records
    from trainer.results import report as make_report

    records = []
    if json_out:
        records = per_epoch(experiment, read_records(json_out))
        atomic_write(json_out, (json.dumps(records, indent=1) + "\n").encode())
        click.echo(f"wrote {json_out}")
    figure = figure or (out.parent / "frontier.png" if out else None)
    link = os.path.relpath(figure, out.parent) if figure and out else figure
    text = make_report(experiment, figure, link, records)
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

    from trainer import serving, store
    from trainer.predict import read_digits

    digits = [digit for path in files for digit in read_digits(path)]  # a bad file fails before the model loads
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(store.tracking_uri())
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
@config_options("model", "batch_size", "device", "amp", "compile", "channels_last", "subset", "workers", "data_dir")
@click.option("--batches", type=click.IntRange(min=1), default=200, show_default=True, help="Batches for floor/plain.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the result.")
def bench(batches, repeats, json_path, **options):
    """Images/s of the compute floor, the write-ups' plain loop and our pipeline, side by side."""
    from trainer import bench as benchmark
    from trainer.data import ensure_mnist

    cfg = resolve(options)
    ensure_mnist(cfg.data_dir)
    result = benchmark.bench(cfg, batches, repeats)
    click.echo(benchmark.table(result))
    if json_path:
        benchmark.write_json(result, json_path)


@cli.command("bench-sweep")
@config_options("model", "subset", "data_dir")
@click.option("--runs", type=click.IntRange(min=1), default=2, show_default=True, help="Runs (seeds 1..N) each way.")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True)
def bench_sweep(model, subset, data_dir, runs, epochs):
    """Runs/hour of N runs one after another vs one `trainer sweep` on a local Ray, and the ratio."""
    from trainer import sweep_bench
    from trainer.data import default_data_dir, ensure_mnist

    data_dir = data_dir or default_data_dir()
    ensure_mnist(data_dir, log=log.info)
    options = ["--epochs", str(epochs), "--data-dir", data_dir, *(["--subset", str(subset)] if subset else [])]
    click.echo(sweep_bench.table(sweep_bench.bench_sweep(model or Config.model, runs, options)))


def main():
    cli(prog_name="trainer")


if __name__ == "__main__":
    main()
