"""The `trainer` command line (click). Every user error is one line on stderr and a non-zero exit."""

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
            raise click.ClickException(str(e).strip().splitlines()[0] if str(e).strip() else repr(e)) from None


class UsageLine(click.ClickException):
    """A one-line error with exit code 2 (no usage block): for unknown names."""

    exit_code = 2


def check_model(ctx, param, value):
    try:
        models.get_variant(value)
    except models.UnknownModel as e:
        raise UsageLine(str(e)) from None
    return value


def choice(name: str, valid):
    def check(ctx, param, value):
        if value is not None and value != "recipe" and value not in valid:
            raise UsageLine(f"unknown {name} {value!r}; valid names: {', '.join(valid)}")
        return None if value == "recipe" else value

    return check


def data_dir_option(f):
    return click.option(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        envvar=DATA_DIR_ENV,
        show_default=True,
        help=f"MNIST folder (torchvision layout); env {DATA_DIR_ENV}.",
    )(f)


@click.group(cls=Group)
def cli():
    """mnist8k: train tiny CNNs to 99.4% on MNIST, tracked in MLflow."""


@cli.command()
@data_dir_option
def data(data_dir):
    """Make the four MNIST IDX files present and md5-verified."""
    ensure_mnist(data_dir)


@cli.command("models")
def list_models_cmd():
    """List the variants: name, parameters, description."""
    for name in models.list_models():
        variant = models.get_variant(name)
        click.echo(f"{name:10s} {models.num_params(variant.build()):>7,d}  {variant.description}")


@cli.command()
@click.option(
    "--model", default="step5", show_default=True, callback=check_model, help="Variant name (`trainer models`)."
)
@click.option("--epochs", type=RecipeOr(POSITIVE_INT))
@click.option("--batch-size", type=RecipeOr(POSITIVE_INT))
@click.option("--optimizer", callback=choice("optimizer", engine.OPTIMIZERS), help="sgd | adam | adamw")
@click.option("--lr", type=RecipeOr(POSITIVE_FLOAT), help="Learning rate (the peak for onecycle).")
@click.option("--momentum", type=RecipeOr(NON_NEGATIVE_FLOAT))
@click.option("--nesterov/--no-nesterov", default=None)
@click.option("--weight-decay", type=RecipeOr(NON_NEGATIVE_FLOAT))
@click.option("--scheduler", callback=choice("scheduler", engine.SCHEDULERS), help="none | step | onecycle | cosine")
@click.option("--step-size", type=RecipeOr(POSITIVE_INT), help="step: epochs between lr decays.")
@click.option("--gamma", type=RecipeOr(POSITIVE_FLOAT), help="step: lr decay factor.")
@click.option(
    "--pct-start", type=RecipeOr(click.FloatRange(0, 1, min_open=True, max_open=True)), help="onecycle warm-up share."
)
@click.option("--augment", callback=choice("augment", list(AUGMENTS)), help="none | light | standard")
@click.option("--dropout", type=RecipeOr(click.FloatRange(0, 1, max_open=True)))
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--device", default="auto", show_default=True, callback=choice("device", engine.DEVICES))
@click.option("--amp", is_flag=True, help="bf16 autocast (CUDA).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@click.option("--subset", type=RecipeOr(POSITIVE_INT), help="Train/test on the first N images (smoke tests only).")
@click.option("--workers", type=click.IntRange(min=0), help="DataLoader workers [default: CPU count - 1].")
@data_dir_option
def train(model, compile_, data_dir, **options):
    """Train one variant; options left out come from the variant's recipe (`trainer models`)."""
    from trainer import tracking

    recipe = models.get_variant(model).recipe
    cfg = engine.Config.from_recipe(model, recipe, compile=compile_, data_dir=data_dir, **options)
    ensure_mnist(data_dir)
    tracking.train(cfg)


def main():
    cli(prog_name="trainer")


if __name__ == "__main__":
    main()
