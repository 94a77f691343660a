"""`make check-results`: the README's Results, retrained on this machine with the command the README
gives, and every target checked (slow: a full 20-run sweep; `pytest -m results` selects it, plain
`make test` leaves it out).

- Each variant of the sweep holds its target on every seed: >= 99.40% in each epoch from its
  `hold_from` on, and step5's mean over seeds of the last-3 means.
- Where this machine's CPU model is one the README's runs were made on (`docs/results.json`, written
  by `trainer report --json`), every epoch's test accuracy equals the recorded one, to the last digit.

MNIST8K_RESULTS_STORE=URI checks the finished runs of an existing store instead of training."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import models
from trainer import target
from trainer.engine import cpu_model

pytestmark = pytest.mark.results

ROOT = Path(__file__).resolve().parent.parent
RECORDED = ROOT / "docs" / "results.json"
EXPERIMENT = "mnist8k"


def readme_results_commands() -> list[str]:
    """The commands of the README's Results section (its first bash block)."""
    section = (ROOT / "README.md").read_text().split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)[1]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def sweep_command() -> list[str]:
    (command,) = [c for c in readme_results_commands() if " sweep " in c]
    return shlex.split(command)


def swept_models() -> list[str]:
    argv = sweep_command()
    return argv[argv.index("--models") + 1].split(",")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{model: {seed: Result}}: the README's sweep run here (or the runs of MNIST8K_RESULTS_STORE)."""
    uri = os.environ.get("MNIST8K_RESULTS_STORE")
    if not uri:
        uri = f"sqlite:///{tmp_path_factory.mktemp('results')}/mlflow.db"
        argv = sweep_command()
        argv[0] = str(Path(sys.executable).parent / Path(argv[0]).name)  # this checkout's .venv
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": EXPERIMENT}
        done = subprocess.run(argv, env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        print(done.stdout)
        assert done.returncode == 0, done.stdout[-3000:]
    os.environ["MLFLOW_TRACKING_URI"] = uri
    from trainer.results import tracked

    return tracked(EXPERIMENT)


def seeds_of() -> list[int]:
    argv = sweep_command()
    return [int(s) for s in argv[argv.index("--seeds") + 1].split(",")]


def test_every_seed_holds_its_variants_target(runs):
    missed = []
    for name in swept_models():
        variant = models.get_variant(name)
        seeds = runs.get(name, {})
        assert sorted(seeds) == seeds_of(), f"{name}: runs for seeds {sorted(seeds)}"
        first = variant.hold_from or target.EPOCH_LIMIT - target.LAST_EPOCHS + 1
        worst = {seed: min(r.test_acc[first - 1 :]) for seed, r in sorted(seeds.items())}
        print(f"{name}: worst test accuracy in epochs {first}-{target.EPOCH_LIMIT} per seed: {worst}")
        missed += [f"{name} seed {seed}: {acc:.2f}%" for seed, acc in worst.items() if acc < target.TARGET_ACC]
        if variant.mean_target:
            from trainer.results import mean_last

            mean = mean_last(list(seeds.values()))
            if mean < variant.mean_target:
                missed.append(f"{name}: mean of the last-{target.LAST_EPOCHS} means {mean:.2f}%")
    assert not missed, f"below target: {'; '.join(missed)}"


def test_the_recorded_per_epoch_numbers_reproduce_on_the_same_cpu(runs):
    from trainer.results import current, read_records

    here, records = cpu_model(), [r for r in read_records(RECORDED) if current(r)]
    recorded = [r for r in records if r["cpu"] == here and r["gpu"] == "none"]
    if not recorded:
        cpus = sorted({r["cpu"] for r in records})
        pytest.skip(f"no runs recorded on this CPU ({here}) with today's recipes; recorded: {', '.join(cpus)}")
    for record in recorded:
        if record["model"] in swept_models():
            ours = runs[record["model"]][record["seed"]]
            assert ours.cpu == here
            assert ours.test_acc == record["test_acc"], f"{record['model']} seed {record['seed']}"
