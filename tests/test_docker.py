"""The image, built and run as a user would: the commands of the README's Docker section.

`make test-docker` (pytest -m docker); plain `make test` leaves these out. A Docker engine that answers
is used; otherwise, as root, the suite starts `dockerd` (Debian package docker.io) and stops it at the
end; with neither, every test skips with one line. No image registry is reachable here, so the image
is built on a stand-in for the nvidia/cuda base: a Debian root filesystem made by
tests/docker/standin-base.sh (needs mmdebstrap), built once and kept, like the docker build cache.

The README's commands run as written except for what this machine lacks, the same for every command
(`here`): no `--gpus all` (no GPU), `--build-arg BASE_IMAGE=<stand-in>` on the build, trainings on a
data subset for a few epochs, and a free port instead of 5000. They run in a fresh folder as a non-root
host user (uid 1000, and uid 1234 for the `--user` recipe), as a new user would."""

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

import models

pytestmark = pytest.mark.docker


def engine_reachable_or_startable() -> bool:
    """Path checks only (this runs whenever pytest collects): a client and a socket, or root and dockerd."""
    reachable = shutil.which("docker") and (os.environ.get("DOCKER_HOST") or Path("/var/run/docker.sock").exists())
    return bool(reachable) or (os.geteuid() == 0 and shutil.which("dockerd") is not None)


# Without an engine and without the means to start one, the module skips in one line (a skip from a
# fixture would print one line per test).
if not engine_reachable_or_startable():
    reason = "no Docker engine, and starting one needs root and dockerd (apt-get install docker.io mmdebstrap)"
    pytest.skip(reason, allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
STANDIN = "mnist8k-standin:bookworm"
IMAGE = "mnist8k"  # the README's tag
SUBSET = "--subset 2048 --epochs 2"

# Every command of the README's Docker section is one of these (the first pattern that matches names it).
RECIPES = {
    "build": r"^docker build ",
    "mkdir": r"^mkdir -p mlruns$",
    "bridge": r"^BRIDGE=",
    "server": r"mlflow server ",
    "ray_token": r"^export RAY_AUTH_TOKEN=",
    "ray_head": r"--name ray-head ",
    "ray_head_ip": r"^HEAD=",
    "ray_worker": r"--name ray-worker ",
    "ray_sweep": r" sweep --address ",
    "ray_stop": r"^docker stop ray-",
    "stop": r"^docker stop ",
    "ui": r"--entrypoint mlflow .* ui ",
    "models": r" models$",
    "remote": r"MLFLOW_TRACKING_URI=http",
    "resume": r" --resume ",
    "detached": r"^docker run -d ",
    "as_user": r" --user ",
    "amp": r" --amp$",
    "train": r"^docker run .*-v \"\$PWD/mlruns:/mlruns\" mnist8k$",
}


def readme_commands() -> list[str]:
    """The shell commands of the README's Docker section: continuation lines joined, comments dropped."""
    section = (ROOT / "README.md").read_text().split("\n## Docker + GPU\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            line = re.sub(r"(^|\s+)#\s.*$", "", line).strip()
            if line:
                commands.append(line)
    return commands


def recipe_of(command: str) -> str | None:
    return next((name for name, pattern in RECIPES.items() if re.search(pattern, command)), None)


def readme(name: str) -> str:
    (command,) = [c for c in readme_commands() if recipe_of(c) == name]
    return command


def here(command: str, port: int | None = None) -> str:
    """What this machine lacks: a GPU, and (in tests) the README's fixed port."""
    command = command.replace("--gpus all ", "")
    return re.sub(r"\b5000\b", str(port), command) if port else command


def shortened(command: str) -> str:
    """A README training on a data subset for a few epochs (the image's default command spelled out)."""
    if command.endswith(f" {IMAGE}"):
        command += " train --model step5"
    return f"{command} {SUBSET}"


def docker(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def warning_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if re.search(r"warn|traceback", line, re.I)]


# The engine, the stand-in base and the image


def engine_answers() -> bool:
    return shutil.which("docker") is not None and docker("info", timeout=30).returncode == 0


@pytest.fixture(scope="module")
def engine():
    """A Docker engine: the one that answers, or a `dockerd` started here (as root) and stopped at the end."""
    if engine_answers():
        yield
        return
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        pytest.skip("the Docker engine does not answer, and starting one needs root and dockerd")
    log = tempfile.NamedTemporaryFile("w", prefix="dockerd-", suffix=".log", delete=False)  # noqa: SIM115
    daemon = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not engine_answers():
            if daemon.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dockerd did not start: see {log.name}")
            time.sleep(1)
        yield
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
        log.close()


@pytest.fixture(scope="module")
def image(engine):
    """The README's `docker build`, on the stand-in base (built first when missing)."""
    if docker("image", "inspect", STANDIN).returncode != 0 and shutil.which("mmdebstrap") is None:
        pytest.skip(f"no stand-in base image {STANDIN}, and building it needs mmdebstrap (apt-get install mmdebstrap)")
    base = subprocess.run([ROOT / "tests/docker/standin-base.sh", STANDIN], capture_output=True, text=True)
    assert base.returncode == 0, f"stand-in base:\n{base.stdout[-3000:]}{base.stderr[-3000:]}"
    build = readme("build").replace("docker build ", f"docker build --build-arg BASE_IMAGE={STANDIN} ", 1)
    done = subprocess.run(["bash", "-c", build], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, f"{build}:\n{done.stdout[-5000:]}{done.stderr[-5000:]}"
    return IMAGE


class HostUser:
    """A non-root user of this machine in a fresh folder of its own (with the checkout's .venv, which
    the README's server command uses); runs shell commands there, with access to the Docker socket."""

    def __init__(self, uid: int):
        if os.geteuid() != 0 and os.getuid() != uid:
            pytest.skip(f"acting as host uid {uid} needs root")
        self.uid = uid
        self.home = Path(tempfile.mkdtemp(prefix=f"mnist8k-docker-{uid}-"))
        os.chown(self.home, uid, uid)
        (self.home / ".venv").symlink_to(sys.prefix)

    def argv(self, command: str) -> list[str]:
        if os.getuid() == self.uid:
            return ["bash", "-c", command]
        docker_gid = os.stat("/var/run/docker.sock").st_gid
        ids = [f"--reuid={self.uid}", f"--regid={self.uid}", f"--groups={docker_gid}"]
        return ["setpriv", *ids, "bash", "-c", command]

    def env(self) -> dict:
        return {"PATH": os.environ["PATH"], "HOME": str(self.home), "LANG": "C.UTF-8"}

    def sh(self, command: str, timeout=900) -> subprocess.CompletedProcess:
        done = subprocess.run(
            self.argv(command), cwd=self.home, env=self.env(), capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
        return done

    def start(self, command: str, log: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            return subprocess.Popen(
                self.argv(command), cwd=self.home, env=self.env(), stdout=out, stderr=subprocess.STDOUT
            )


@pytest.fixture
def user1000():
    user = HostUser(1000)
    yield user
    shutil.rmtree(user.home)


@pytest.fixture
def user1234():
    user = HostUser(1234)
    yield user
    shutil.rmtree(user.home)


# What a run left in a sqlite store on the host (read-only: the store belongs to the container's user)


class Store:
    def __init__(self, db: Path):
        self.db = db
        self.conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)

    def runs(self) -> list[tuple[str, str]]:
        return self.conn.execute("SELECT run_uuid, status FROM runs ORDER BY start_time").fetchall()

    def tags(self, run_id: str) -> dict:
        return dict(self.conn.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,)))

    def params(self, run_id: str) -> dict:
        return dict(self.conn.execute("SELECT key, value FROM params WHERE run_uuid = ?", (run_id,)))

    def steps(self, run_id: str, key: str) -> list[int]:
        query = "SELECT step FROM metrics WHERE run_uuid = ? AND key = ? ORDER BY step"
        return [step for (step,) in self.conn.execute(query, (run_id, key))]

    def local(self, uri: str) -> Path:
        """A file:// artifact location inside the container (under /mlruns) as a path on the host."""
        return self.db.parent / uri.removeprefix("file://").removeprefix("/mlruns/")

    def checkpoints(self, run_id: str) -> list[str]:
        (uri,) = self.conn.execute("SELECT artifact_uri FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
        return sorted(p.name for p in (self.local(uri) / "checkpoints").glob("*.pt"))

    def model_files(self, run_id: str) -> list[str]:
        query = "SELECT artifact_location FROM logged_models WHERE source_run_id = ?"
        return [p.name for (uri,) in self.conn.execute(query, (run_id,)) for p in self.local(uri).iterdir()]


def assert_finished_training(store: Store, epochs: int = 2) -> str:
    """One FINISHED run with every epoch's metrics once, a checkpoint per epoch and the logged model."""
    ((run_id, status),) = store.runs()
    assert status == "FINISHED"
    assert store.steps(run_id, "test_acc") == list(range(1, epochs + 1))
    assert store.checkpoints(run_id) == [f"epoch_{e:03d}.pt" for e in range(1, epochs + 1)]
    assert "MLmodel" in store.model_files(run_id)
    return run_id


def assert_owned_by(folder: Path, uid: int) -> None:
    others = [p for p in [folder, *folder.rglob("*")] if p.lstat().st_uid != uid]
    assert not others, f"not owned by uid {uid}: {others[:5]}"


def assert_source_tags(tags: dict) -> None:
    assert tags["mlflow.user"] == "mnist8k"
    assert tags["mlflow.source.name"] == "/opt/venv/bin/trainer"
    assert tags["mlflow.source.type"] == "LOCAL"


# The tests


def test_every_readme_docker_command_is_one_these_tests_run():
    names = [recipe_of(c) for c in readme_commands()]
    assert None not in names, f"a README command no test runs: {readme_commands()[names.index(None)]}"
    assert sorted(names) == sorted(RECIPES), "each recipe once in the README's Docker section"


def test_models_prints_the_zoo_and_the_container_user_is_not_root(image, user1000):
    out = user1000.sh(here(readme("models"))).stdout
    assert all(name in out for name in models.list_models())
    assert docker("run", "--rm", "--entrypoint", "id", image, "-u").stdout.strip() == "1000"


def test_image_carries_no_cache_or_machine_state_and_its_python_is_allowed(image):
    listing = "find /tmp /root /home /opt/mnist8k/data -mindepth 1 -not -path '/opt/mnist8k/data/MNIST*'"
    found = docker("run", "--rm", "--user", "0", "--entrypoint", "sh", image, "-c", listing).stdout.split()
    skeleton = {"/home/mnist8k", "/root/.bashrc", "/root/.profile"} | {
        f"/home/mnist8k/{f}" for f in (".bashrc", ".profile", ".bash_logout")
    }
    assert set(found) <= skeleton, f"state baked into the image: {sorted(set(found) - skeleton)}"
    version = docker("run", "--rm", "--entrypoint", "python", image, "-c", "import sys; print(sys.version[:4])")
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires).contains(version.stdout.strip())


@pytest.fixture(scope="module")
def trained(image):
    """The README's training (the image's default command, on a subset) as uid 1000: (user, output)."""
    user = HostUser(1000)
    user.sh(readme("mkdir"))
    done = user.sh(shortened(here(readme("train"))))
    yield user, done.stdout + done.stderr
    shutil.rmtree(user.home)


def test_training_lands_in_the_hosts_mlruns_owned_by_the_user_without_warnings(trained):
    user, output = trained
    assert warning_lines(output) == []
    store = Store(user.home / "mlruns" / "mlflow.db")
    run_id = assert_finished_training(store)
    assert_source_tags(store.tags(run_id))
    assert_owned_by(user.home / "mlruns", 1000)


def test_training_as_another_uid_with_user_flag(image, user1234):
    user1234.sh(readme("mkdir"))
    done = user1234.sh(shortened(here(readme("as_user"))))
    assert warning_lines(done.stdout + done.stderr) == []
    store = Store(user1234.home / "mlruns" / "mlflow.db")
    assert_source_tags(store.tags(assert_finished_training(store)))
    assert_owned_by(user1234.home / "mlruns", 1234)


def test_other_command_amp_training(image, user1000):
    user1000.sh(readme("mkdir"))
    user1000.sh(shortened(here(readme("amp"))))
    store = Store(user1000.home / "mlruns" / "mlflow.db")
    run_id = assert_finished_training(store)
    assert store.params(run_id)["amp"] == "True"


def test_docker_stop_ends_the_run_killed_with_its_checkpoint_and_resume_finishes_it(image, user1000):
    """SIGTERM from `docker stop` once the first epoch's checkpoint is in the run, mid second epoch."""
    user1000.sh(readme("mkdir"))
    detached = readme("detached")
    name = re.search(r"--name (\S+)", detached)[1]
    user1000.sh(here(detached) + " train --model step5 --subset 2048 --epochs 3")
    try:
        db = user1000.home / "mlruns" / "mlflow.db"
        deadline = time.monotonic() + 300
        while not (db.exists() and Store(db).runs() and Store(db).tags(Store(db).runs()[0][0]).get("last_checkpoint")):
            assert time.monotonic() < deadline, docker("logs", name).stderr[-3000:]
            time.sleep(0.5)
        user1000.sh(here(readme("stop")))
    finally:
        docker("rm", "-f", name)
    store = Store(db)
    ((run_id, status),) = store.runs()
    assert status == "KILLED"
    stopped_at = store.checkpoints(run_id)
    assert stopped_at and stopped_at[-1] != "epoch_003.pt"
    user1000.sh(here(readme("resume")).replace("RUN_ID", run_id))
    assert assert_finished_training(Store(db), epochs=3) == run_id


@contextmanager
def bridge_server(user: HostUser):
    """The README's tracking server on the Docker bridge, started from the user's folder (its store is
    there); yields its port."""
    bridge = readme("bridge")
    bridge_ip = subprocess.run(
        ["bash", "-c", f'{bridge}; echo "$BRIDGE"'], capture_output=True, text=True
    ).stdout.strip()
    port = free_port(bridge_ip)
    with open(user.home / "server.log", "w") as log:
        command = f"{bridge}; exec {here(readme('server'), port)}"
        server = subprocess.Popen(
            ["bash", "-c", command], cwd=user.home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://{bridge_ip}:{port}/health", timeout=5)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (user.home / "server.log").read_text()
                time.sleep(1)
        yield port
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers
        server.wait(timeout=60)


def test_readme_tracking_server_recipe_logs_a_containers_run_to_the_host(image, user1000):
    """The server runs as whoever runs the tests (the checkout's .venv is theirs), in the user's folder."""
    with bridge_server(user1000) as port:
        done = user1000.sh(shortened(here(readme("remote"), port)))
    assert warning_lines(done.stdout + done.stderr) == []
    store = Store(user1000.home / "mlflow.db")  # the server's store, in the folder it was started from
    ((run_id, status),) = store.runs()
    assert status == "FINISHED"
    assert store.steps(run_id, "test_acc") == [1, 2]
    assert len(list((user1000.home / "mlartifacts").rglob("checkpoints/epoch_002.pt"))) == 1


def test_readme_ray_cluster_of_the_image_runs_a_sweep_logged_to_the_host(image, user1000):
    """The README's Ray recipe: a head and a worker from the image, a sweep driven from a third container;
    the head has no CPUs, so the trials can only have run in the worker container."""
    with bridge_server(user1000) as port:
        names = {"ray-head": f"ray-head-{port}", "ray-worker": f"ray-worker-{port}"}

        def ours(command: str) -> str:
            for name, unique in names.items():
                command = command.replace(name, unique)
            return here(command, port)

        steps = ["ray_token", "ray_head", "ray_head_ip", "ray_worker"]
        script = "; ".join(ours(readme(step)) for step in steps)
        status = f"docker exec {names['ray-head']} ray status 2>/dev/null | grep -c ' node_'"
        two_nodes = f'for i in $(seq 120); do [ "$({status})" = 2 ] && break; sleep 1; done'  # as a user would wait
        sweep = ours(readme("ray_sweep")) + " --subset 1024 --epochs 1"
        try:
            done = user1000.sh(f"set -e; {script}; {two_nodes}; {sweep}")
        finally:
            docker("stop", *names.values())
    assert "Traceback" not in done.stdout + done.stderr
    assert "2 done, 0 stopped, 0 failed, of 2" in done.stdout
    store = Store(user1000.home / "mlflow.db")
    runs = dict(store.runs())
    assert sorted(runs.values()) == ["FINISHED"] * 3
    children = [r for r in runs if store.tags(r).get("mlflow.parentRunId")]
    assert len(children) == 2
    assert len({store.tags(r)["ray.node_id"] for r in children}) == 1  # the worker's
    assert all(store.steps(r, "test_acc") == [1] for r in children)
    assert len(list((user1000.home / "mlartifacts").rglob("checkpoints/epoch_001.pt"))) == 2


def test_readme_ui_container_answers_with_the_runs(trained):
    user, _ = trained
    port = free_port("127.0.0.1")
    command = here(readme("ui")).replace("127.0.0.1:5000:", f"127.0.0.1:{port}:")
    name = f"mnist8k-ui-{port}"
    ui = user.start(command.replace("docker run ", f"docker run --name {name} ", 1), user.home / "ui.log")
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
                break
            except OSError:
                assert ui.poll() is None and time.monotonic() < deadline, (user.home / "ui.log").read_text()
                time.sleep(1)
        assert "<title>MLflow</title>" in page
        ((experiment_id,),) = Store(user.home / "mlruns" / "mlflow.db").conn.execute("SELECT experiment_id FROM runs")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
            data=json.dumps({"experiment_ids": [str(experiment_id)]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        runs = json.load(urllib.request.urlopen(request, timeout=30))["runs"]
        assert [run["info"]["status"] for run in runs] == ["FINISHED"]
    finally:
        docker("stop", name)
        ui.wait(timeout=60)
