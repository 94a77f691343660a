"""Reading results back from the tracking store: `trainer compare`, `trainer report`, `trainer models`.

Only finished full-data runs count as results; `--subset` smoke runs are tagged and left out.
"""

import json
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import models
from trainer import store, target
from trainer.config import Config

COMPARE_COLUMNS = ["run", "model", "params", "epochs", "best test acc (epoch)", "min last 3", "target met", "duration"]


@dataclass
class Result:
    """One finished run, with its per-epoch accuracies."""

    run_id: str
    name: str
    model: str
    seed: int
    params: int
    epochs: int
    train_acc: list[float]
    test_acc: list[float]
    summary: dict
    minutes: float
    cpu: str = "unknown"
    gpu: str = "none"


def search(experiment: str | None = None, filter_string: str = "", full_only: bool = True) -> list:
    """Finished training runs of the experiment (default: the configured one), newest first."""
    mlflow.set_tracking_uri(store.tracking_uri())
    client = MlflowClient()
    name = experiment or store.experiment_name()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise ValueError(f"no experiment named {name!r} in {mlflow.get_tracking_uri()}")
    clauses = ["attributes.status = 'FINISHED'", "params.num_params != ''"]
    if full_only:
        clauses.append("tags.subset = 'full'")
    if filter_string:
        clauses.append(filter_string)
    return client.search_runs([exp.experiment_id], " and ".join(clauses), order_by=["attributes.start_time DESC"])


def load(run) -> Result:
    client = MlflowClient()

    def history(key):
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]

    p = run.data.params
    return Result(
        run_id=run.info.run_id,
        name=run.info.run_name,
        model=p["model"],
        seed=int(p["seed"]),
        params=int(p["num_params"]),
        epochs=int(p["epochs"]),
        train_acc=history("train_acc"),
        test_acc=history("test_acc"),
        summary=run.data.metrics,
        minutes=((run.info.end_time or run.info.start_time) - run.info.start_time) / 60000,
        cpu=run.data.tags.get("cpu", "unknown"),
        gpu=run.data.tags.get("gpu", "none"),
    )


def hardware(cpu: str, gpu: str) -> str:
    return cpu if gpu == "none" else f"{gpu} ({cpu})"


def mean_last(runs: list[Result]) -> float:
    """The mean over runs of each run's mean test accuracy in its last epochs."""
    return float(np.mean([np.mean(r.test_acc[-target.LAST_EPOCHS :]) for r in runs]))


def follows_recipe(run) -> bool:
    """Trained as its variant now stands: the current parameter count and the recipe's values (the
    epoch count aside, which the report shows). Runs with overrides stay in `trainer compare`."""
    p = run.data.params
    if p["model"] not in models.list_models():
        return False
    cfg = Config.from_params(p)
    variant = models.get_variant(cfg.model)
    recipe = [f.name for f in fields(Config) if f.metadata["recipe"] and f.name != "epochs"]
    same = all(getattr(cfg, name) == variant.recipe[name] for name in recipe)
    return same and p.get("num_params") == str(current_params(cfg.model))


@cache
def current_params(name: str) -> int:
    return models.num_params(models.get_variant(name).build())


def tracked(experiment: str | None = None) -> dict[str, dict[int, Result]]:
    """{model: {seed: newest finished full-data run with the variant's own recipe}}: what the report shows."""
    return latest_per_seed([load(run) for run in search(experiment) if follows_recipe(run)])


def latest_per_seed(results: list[Result]) -> dict[str, dict[int, Result]]:
    """{model: {seed: newest result}} (results come newest first)."""
    table: dict[str, dict[int, Result]] = {}
    for r in results:
        table.setdefault(r.model, {}).setdefault(r.seed, r)
    return table


def compare_rows(runs) -> list[list[str]]:
    rows = []
    for run in runs:
        m, p = run.data.metrics, run.data.params
        seconds = ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000
        rows.append(
            [
                run.info.run_name,
                p.get("model", "?"),
                p.get("num_params", "?"),
                p.get("epochs", "?"),
                f"{m.get('best_test_acc', float('nan')):.2f} ({int(m.get('best_epoch', 0))})",
                f"{m.get('last3_min_test_acc', float('nan')):.2f}",
                "yes" if m.get("target_met") == 1 else "no",
                f"{seconds / 60:.1f} min",
            ]
        )
    return rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(x) for x in row) + " |" for row in lines)


def target_met(r: Result) -> bool:
    return target.met(r.test_acc, r.params, r.epochs)


def variant_section(name: str, seeds: dict[int, Result]) -> str:
    variant = models.get_variant(name)
    n_params = current_params(name)
    head, analysis = notes_parts(name)
    lines = [f"### {name}", "", head, ""] if head else [f"### {name}", ""]
    if not seeds:
        lines += ["**Result:** no full tracked run yet.", ""]
    else:
        met = [s for s, r in sorted(seeds.items()) if target_met(r)]
        best_train = max(max(r.train_acc) for r in seeds.values())
        best_test = max(max(r.test_acc) for r in seeds.values())
        lines += [
            "**Result:**",
            f"- Parameters: {n_params:,}",
            f"- Best train accuracy: {best_train:.2f}%; best test accuracy: {best_test:.2f}%",
            f"- Seeds that met the target (>= {target.TARGET_ACC}% in each of the last {target.LAST_EPOCHS} epochs, "
            f"< {target.PARAM_LIMIT:,} params): "
            f"{len(met)}/{len(seeds)} {met if met else ''}".rstrip(),
        ]
        first = variant.hold_from or max(1, min(r.epochs for r in seeds.values()) - target.LAST_EPOCHS + 1)
        if variant.hold_from:
            held = [s for s, r in sorted(seeds.items()) if target.holds(r.test_acc, first)]
            lines.append(
                f"- Seeds with >= {target.TARGET_ACC}% in every epoch from epoch {first} on: "
                f"{len(held)}/{len(seeds)} {held if held else ''}".rstrip()
            )
        if variant.mean_target:
            mean = mean_last(list(seeds.values()))
            verdict = "met" if mean >= variant.mean_target else "**not met**"
            lines.append(
                f"- Mean over seeds of the last-{target.LAST_EPOCHS} means: {mean:.2f}% "
                f"(target >= {variant.mean_target:.2f}%: {verdict})"
            )
        for seed, r in sorted(seeds.items()):
            start = first_epoch(name, len(r.test_acc))
            shown = r.test_acc[start - 1 :]
            lines.append(
                f"- seed {seed} (run `{r.run_id[:8]}`, {hardware(r.cpu, r.gpu)}), test accuracy in epochs "
                f"{start}-{len(r.test_acc)}: {', '.join(f'{a:.2f}' for a in shown)}; worst {min(shown):.2f}"
            )
        lines.append("")
    if variant.claim_check and seeds:
        lines += [claim_verdict(variant.claim_check, seeds), ""]
    if analysis:
        lines += [analysis, ""]
    return "\n".join(lines)


def first_epoch(name: str, epochs: int) -> int:
    """The first epoch a variant's target covers in a run of `epochs`: its `hold_from`, else the last 3."""
    hold = models.get_variant(name).hold_from
    return hold if hold and epochs >= hold else max(1, epochs - target.LAST_EPOCHS + 1)


def notes_parts(name: str) -> tuple[str, str]:
    """The variant's notes split around its analysis: (Target and claim, Analysis), without the title."""
    body = "\n".join(line for line in models.notes(name).splitlines() if not line.startswith("# ")).strip()
    head, marker, analysis = body.partition("**Analysis:**")
    return head.strip(), (marker + analysis).strip()


def claim_verdict(check: tuple[int, int, float], seeds: dict[int, Result]) -> str:
    """Our runs against the write-up's claim: the minimum test accuracy over the same epochs."""
    first, last, claimed = check
    ours = {seed: min(r.test_acc[first - 1 : last]) for seed, r in sorted(seeds.items())}
    held = all(acc >= claimed for acc in ours.values())
    numbers = ", ".join(f"seed {seed}: {acc:.2f}%" for seed, acc in ours.items())
    verdict = "reproduced" if held else f"**not reproduced**: short by up to {claimed - min(ours.values()):.2f} points"
    return (
        f"**Against the claim:** minimum test accuracy in epochs {first}-{last} ({numbers}) "
        f"vs claimed {claimed:.2f}%: {verdict}."
    )


def frontier_figure(table: dict[str, dict[int, Result]], path) -> None:
    """The zoo's accuracy-vs-parameters picture (PNG), from the same runs as the report."""
    from trainer import plots

    points = []
    for name, seeds in table.items():
        last = [np.mean(r.test_acc[-target.LAST_EPOCHS :]) for r in seeds.values()]
        points.append((name, current_params(name), float(np.mean(last)), min(last), max(last)))
    checks = {name: models.get_variant(name).claim_check for name in models.list_models()}
    claims = [(name, current_params(name), check[2]) for name, check in checks.items() if check]
    fig = plots.frontier(points, claims)
    fig.savefig(path, dpi=120)
    plots.plt.close(fig)


def report(experiment: str | None = None, figure=None, link: str | None = None, records: list[dict] = ()) -> str:
    """The Markdown results section, every number pulled from the tracked runs; with `figure` (a PNG
    path) also the accuracy-vs-parameters frontier, linked from the text as `link` (default: the path);
    with `records` (`per_epoch`'s, every machine's) also each seed's worst epoch per hardware."""
    table = tracked(experiment)
    names = models.list_models()
    summary_rows = []
    for name in names:
        seeds = table.get(name, {})
        if not seeds:
            continue
        runs = list(seeds.values())
        summary_rows.append(
            [
                name,
                f"{np.mean([max(r.train_acc) for r in runs]):.2f}",
                f"{np.mean([max(r.test_acc) for r in runs]):.2f}",
                f"{mean_last(runs):.2f}",
                f"{runs[0].params:,}",
                str(runs[0].epochs),
                f"{sum(target_met(r) for r in runs)}/{len(runs)}",
            ]
        )
    header = ["Model", "Best train acc", "Best test acc", "Mean of last 3", "Params", "Epochs", "Seeds met target"]
    parts = [
        "## Results",
        "",
        "Generated by `trainer report` from the finished full-data runs in the tracking store "
        "(newest run per model and seed trained with the variant's own recipe; accuracies in %, means over seeds).",
        "",
        markdown_table(header, summary_rows),
        "",
    ]
    if figure:
        frontier_figure(table, figure)
        parts += [
            f"![accuracy vs parameters]({link or figure})",
            "",
            f"Each variant: mean (dot) and range (bar) over seeds of the mean test accuracy of its last "
            f"{target.LAST_EPOCHS} epochs; crosses: the write-ups' claims (their minimum over the claimed epochs).",
            "",
        ]
    if records:
        parts += [
            f"Worst test accuracy (%) per seed in the epochs each target covers, per hardware the runs were made "
            f"on (bold: below {target.TARGET_ACC}%):",
            "",
            worst_epochs(records),
            "",
        ]
    parts += [variant_section(name, table.get(name, {})) for name in names]
    return "\n".join(parts)


def per_epoch(experiment: str | None = None, recorded: list[dict] = ()) -> list[dict]:
    """The report's runs as records: model, seed, hardware, the recipe and every epoch's test accuracy
    (for `trainer report --json`, which `make check-results` compares a new machine's runs with). The
    `recorded` records of hardware this store has no run on are kept while their variant's recipe is
    unchanged: one file, every machine, no stale numbers."""
    table = tracked(experiment)
    ours = [record(r) for seeds in table.values() for _, r in sorted(seeds.items())]
    here = {(r["cpu"], r["gpu"]) for r in ours}
    return [r for r in recorded if (r["cpu"], r["gpu"]) not in here and current(r)] + ours


RECORD_KEYS = {"model", "seed", "cpu", "gpu", "run_id", "recipe", "test_acc"}


def record(r: Result) -> dict:
    recipe = recipe_record(r.model)
    return dict(model=r.model, seed=r.seed, cpu=r.cpu, gpu=r.gpu, run_id=r.run_id, recipe=recipe, test_acc=r.test_acc)


def recipe_record(name: str) -> dict:
    """A variant's recipe as a results file holds it (JSON values: a tuple becomes a list)."""
    return json.loads(json.dumps(models.get_variant(name).recipe))


def current(r: dict) -> bool:
    """Whether a record was trained with its variant's recipe as it stands now."""
    return r["model"] in models.list_models() and r["recipe"] == recipe_record(r["model"])


def read_records(path: Path) -> list[dict]:
    """The records a `trainer report --json` file holds ([] when there is no such file yet)."""
    try:
        records = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} as a results file: {e}") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and RECORD_KEYS <= set(r) for r in records):
        raise ValueError(f"{path} is not a results file: expected a list of {{{', '.join(sorted(RECORD_KEYS))}}}")
    return records


def worst_epochs(records: list[dict]) -> str:
    """Per variant and hardware, each seed's worst test accuracy in the epochs its target covers (misses
    in bold): how much margin the targets keep from one machine to the next."""
    names = models.list_models()
    seeds = sorted({r["seed"] for r in records})
    cells: dict[tuple[str, str, str], dict[int, str]] = {}
    for r in sorted(records, key=lambda r: (names.index(r["model"]), r["gpu"], r["cpu"])):
        n = len(r["test_acc"])
        first = first_epoch(r["model"], n)
        worst = min(r["test_acc"][first - 1 :])
        text = f"{worst:.2f}" if worst >= target.TARGET_ACC else f"**{worst:.2f}**"
        cells.setdefault((r["model"], f"{first}-{n}", hardware(r["cpu"], r["gpu"])), {})[r["seed"]] = text
    rows = [[*key, *(row.get(s, "-") for s in seeds)] for key, row in cells.items()]
    return markdown_table(["Model", "Epochs", "Hardware", *(f"seed {s}" for s in seeds)], rows)


def latest_target_met() -> dict[str, str]:
    """{model: 'yes'/'no'} from its newest finished full-data run with its recipe; {} without a store."""
    if not store.exists():  # reading a missing sqlite store would create it
        return {}
    try:
        runs = search()
    except (ValueError, MlflowException):
        return {}
    met: dict[str, str] = {}
    for run in filter(follows_recipe, runs):
        met.setdefault(run.data.params["model"], "yes" if run.data.metrics.get("target_met") == 1 else "no")
    return met
