"""Scale-out on real processes, loopback only: a PostgreSQL-backed `trainer server` with basic auth, a
two-node Ray cluster on this machine, sweeps on it, a trial's worker SIGKILLed mid-epoch, a killed
sweep driver restarted, a search whose ASHA stops trials early. `pytest -m scale` selects these alone."""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.scale

BIN = Path(sys.executable).parent
USER, PASSWORD = "sweeper", secrets.token_hex(12)
EPOCH_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, seconds: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited ({proc.returncode}) first:\n{proc.stdout.read()}")
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {seconds:.0f} s")


@pytest.fixture(scope="module")
def server():
    """`trainer server` (PostgreSQL + mlflow server --app-name basic-auth) on a free loopback port."""
    folder = Path(tempfile.mkdtemp(prefix="mnist8k-pg-"))  # short: PostgreSQL's socket path has a limit
    folder.chmod(0o711)  # run by root, PostgreSQL runs as its own user, which must reach the folder
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD}
    log = open(folder / "server.log", "w+")  # noqa: SIM115
    cmd = [BIN / "trainer", "server", "--dir", folder / "stack", "--port", port, "--workers", "2"]
    proc = subprocess.Popen(list(map(str, cmd)), env=env, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            return requests.get(f"{uri}/health", timeout=1).ok
        except requests.RequestException:  # refused, or too slow while it starts
            return False

    try:
        deadline = time.time() + 180
        while not healthy():
            assert proc.poll() is None and time.time() < deadline, (log.seek(0), log.read())[1]
            time.sleep(0.5)
        yield {"uri": uri, "folder": folder / "stack"}
    finally:
        proc.terminate()
        proc.wait(timeout=90)
        log.close()
        shutil.rmtree(folder)


@pytest.fixture(scope="module")
def cluster():
    """A head node and a second node (`ray start --block`, each with 1 CPU and its own temp dir; the
    second declares 1 GPU, which Ray schedules like a real one), listening on loopback only, with a
    token of their own. Yields the address and the nodes' env."""
    host = socket.gethostname()  # joins by a name for 127.0.0.1: Ray turns the literal into the LAN address
    if socket.gethostbyname(host) != "127.0.0.1":
        pytest.fail(f"this machine's name {host!r} must resolve to 127.0.0.1 for a loopback-only Ray cluster")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}  # no credentials
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    temp = [Path(tempfile.mkdtemp(prefix="ray")) for _ in range(2)]
    common = ["--num-cpus", "1", "--object-store-memory", "100000000", "--disable-usage-stats", "--block"]
    head = [BIN / "ray", "start", "--head", "--port", port, "--include-dashboard", "false", "--temp-dir", temp[0]]
    second = [BIN / "ray", "start", "--address", f"{host}:{port}", "--temp-dir", temp[1], "--num-gpus", "1"]
    procs = []
    try:
        # Ray takes 127.0.0.1 as the node's address only where it runs no multi-node clusters: the head does.
        head_env = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        procs.append(subprocess.Popen(list(map(str, head + common)), env=head_env, stdout=subprocess.DEVNULL))
        status = [str(BIN / "ray"), "status", "--address", f"{host}:{port}"]
        wait_for(lambda: subprocess.run(status, env=env, capture_output=True).returncode == 0, 120, "ray head")
        procs.append(subprocess.Popen(list(map(str, second + common)), env=env, stdout=subprocess.DEVNULL))

        def two_nodes():
            out = subprocess.run(status, env=env, capture_output=True, text=True).stdout
            return out.split("Pending:")[0].count(" node_") == 2

        wait_for(two_nodes, 120, "second ray node")
        yield {"address": f"{host}:{port}", "env": env, "temp": temp}
    finally:
        for proc in reversed(procs):  # `ray start --block` stops its node's processes on SIGTERM
            proc.terminate()
            proc.wait(timeout=60)
        for folder in temp:
            shutil.rmtree(folder, ignore_errors=True)


def sweep_env(server, cluster, experiment):
    return {
        **cluster["env"],
        "MLFLOW_TRACKING_URI": server["uri"],
        "MLFLOW_EXPERIMENT_NAME": experiment,
        "MLFLOW_TRACKING_USERNAME": USER,
        "MLFLOW_TRACKING_PASSWORD": PASSWORD,
    }


def trainer(*args, env, **popen):
    cmd = [str(BIN / "trainer"), *map(str, args)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def as_from_a_terminal():
    """Ctrl-C's default action, as in a shell with job control: a background job of a script (how CI may
    start the tests) inherits SIGINT ignored, and then Python never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def client(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    return MlflowClient(server["uri"])


def runs_of(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def per_epoch(client, run_id):
    return {
        key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
        for key in EPOCH_KEYS
    }


def test_the_server_refuses_missing_and_wrong_credentials(server, data_dir):
    search = f"{server['uri']}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(search, timeout=10).status_code == 401
    assert requests.get(search, auth=(USER, "wrong-password-1234"), timeout=10).status_code == 401
    assert requests.get(search, auth=(USER, PASSWORD), timeout=10).status_code == 200
    env = {**os.environ, "MLFLOW_TRACKING_URI": server["uri"], "MLFLOW_TRACKING_PASSWORD": "wrong-password-1234"}
    env["MLFLOW_TRACKING_USERNAME"] = USER
    out = trainer("train", "--subset", "100", "--data-dir", data_dir, env=env).communicate(timeout=120)[0]
    assert "401" in out and "Traceback" not in out and len(out.strip().splitlines()) == 1, out


def test_a_sweep_runs_on_both_nodes_and_logs_everything_into_the_postgres_server(server, cluster, client, data_dir):
    env = sweep_env(server, cluster, "two-nodes")
    args = ["--models", "step5", "--seeds", "1,2,3,4", "--subset", "1024", "--epochs", "2"]
    proc = trainer("sweep", *args, "--address", cluster["address"], "--data-dir", data_dir, env=env)
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out
    assert out.count("done   step5-s") == 4 and "[0 running, 4 done, 0 stopped, 0 failed, of 4]" in out, out

    (parent,), children = runs_of(client, "two-nodes")
    assert sorted(r.info.run_name for r in children) == [f"step5-s{seed}-subset1024" for seed in (1, 2, 3, 4)]
    assert len({r.data.tags["ray.node_id"] for r in children}) == 2, "the trials ran on one node only"
    for run in children:
        assert run.info.status == "FINISHED"
        assert {"model", "epochs", "lr", "num_params", "seed", "workers"} <= set(run.data.params)
        assert all([s for s, _ in v] == [1, 2] for v in per_epoch(client, run.info.run_id).values())
        assert {"best_test_acc", "last3_min_test_acc", "target_met", "peak_rss_mb"} <= set(run.data.metrics)
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"curves.png", "confusion_matrix.png", "model_summary.txt", "checkpoints"} <= files
        checkpoints = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
        assert checkpoints == {"checkpoints/epoch_001.pt", "checkpoints/epoch_002.pt"}
        source = f"source_run_id = '{run.info.run_id}'"
        assert client.search_logged_models([run.info.experiment_id], filter_string=source), "model not logged"
        for value in [*run.data.params.values(), *run.data.tags.values()]:
            assert PASSWORD not in value
    accs = [r.data.metrics["best_test_acc"] for r in children]
    assert abs(parent.data.metrics["step5.best_test_acc.mean"] - sum(accs) / 4) < 1e-9
    assert parent.data.metrics["failed_runs"] == 0 and parent.info.status == "FINISHED"
    assert any((server["folder"] / "artifacts").rglob("epoch_002.pt")), "artifacts not proxied into the server's folder"
    # the credentials travel in Ray's object store only: in no log, no Tune file, no output
    assert PASSWORD not in out
    for folder in cluster["temp"]:
        found = subprocess.run(["grep", "-rlsF", PASSWORD, str(folder)], capture_output=True, text=True).stdout
        assert not found, f"the password is in {found}"


def test_a_killed_worker_resumes_its_run_and_matches_an_uninterrupted_run(server, cluster, client, data_dir):
    env = sweep_env(server, cluster, "kill-worker")
    smoke = ["--subset", "4096", "--epochs", "4", "--data-dir", data_dir]
    proc = trainer("sweep", "--models", "step5", "--seeds", "7", *smoke, "--address", cluster["address"], env=env)
    straight_env = {**env, "MLFLOW_EXPERIMENT_NAME": "kill-worker-straight", "OMP_NUM_THREADS": "1"}
    straight = trainer("train", "--model", "step5", "--seed", "7", "--workers", "0", *smoke, env=straight_env)

    def after_epoch_1():
        _, children = runs_of(client, "kill-worker")
        done = [r for r in children if r.data.tags.get("last_checkpoint") == "checkpoints/epoch_001.pt"]
        return done[0] if done else None

    run = wait_for(after_epoch_1, 600, "the trial's first checkpoint", proc)
    pid = int(run.data.tags["ray.worker_pid"])
    os.kill(pid, signal.SIGKILL)  # mid-epoch 2 (or a later one, on a slow poll): never after the last
    logged = [s for s, _ in per_epoch(client, run.info.run_id)["test_acc"]]
    assert logged in ([1], [1, 2], [1, 2, 3]), f"the kill came after the last epoch: {logged}"
    assert client.get_run(run.info.run_id).data.tags["last_checkpoint"] == f"checkpoints/epoch_{logged[-1]:03d}.pt"

    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0 and "retry  step5-s7" in out, out
    _, children = runs_of(client, "kill-worker")
    assert [r.info.run_id for r in children] == [run.info.run_id], "the retry started another run"
    resumed = client.get_run(run.info.run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["ray.worker_pid"] != str(pid)
    straight_out = straight.communicate(timeout=900)[0]
    assert straight.returncode == 0, straight_out
    (reference,), _ = runs_of(client, "kill-worker-straight")
    assert per_epoch(client, run.info.run_id) == per_epoch(client, reference.info.run_id)
    assert [s for s, _ in per_epoch(client, run.info.run_id)["test_acc"]] == [1, 2, 3, 4]


def test_a_restarted_driver_trains_only_the_unfinished_trials(server, cluster, client, data_dir):
    env = sweep_env(server, cluster, "driver")
    args = ["--models", "step5", "--seeds", "1,2,3", "--subset", "1024", "--epochs", "3", "--data-dir", data_dir]
    proc = trainer("sweep", *args, "--address", cluster["address"], env=env)

    def some_finished():
        _, children = runs_of(client, "driver")
        finished = [r for r in children if r.info.status == "FINISHED"]
        return (finished, children) if 0 < len(finished) < 3 else None

    wait_for(some_finished, 600, "a first finished trial", proc)
    proc.kill()
    proc.communicate()
    # Ray ends a dead driver's trials. (With issue 18's run lease a restart could come at once: a resumed
    # run waits out its old writer's heartbeat.)
    pids = [int(r.data.tags["ray.worker_pid"]) for r in runs_of(client, "driver")[1]]
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), 120, "the old trials' exit")
    (parent,), children = runs_of(client, "driver")
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert 0 < len(finished) < 3

    restart = trainer("sweep", "--resume", parent.info.run_id, "--address", cluster["address"], env=env)
    out = restart.communicate(timeout=900)[0]
    assert restart.returncode == 0, out
    assert f"3 trials, {len(finished)} already settled in MLflow, {3 - len(finished)} to run" in out, out
    for run in finished:  # not re-run: untouched
        after = client.get_run(run.info.run_id)
        assert after.info.end_time == run.info.end_time
        assert len(client.get_metric_history(run.info.run_id, "test_acc")) == 3
    _, children = runs_of(client, "driver")
    done = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(r.info.run_name for r in done) == [f"step5-s{seed}-subset1024" for seed in (1, 2, 3)]
    for run in done:
        assert [s for s, _ in per_epoch(client, run.info.run_id)["test_acc"]] == [1, 2, 3]
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["failed_runs"] == 0


def test_a_search_stops_weak_trials_early_and_links_the_best(server, cluster, client, data_dir):
    env = sweep_env(server, cluster, "search")
    args = ["--models", "step5", "--seeds", "1", "--samples", "6", "--subset", "512", "--epochs", "3"]
    proc = trainer("sweep", *args, "--address", cluster["address"], "--data-dir", data_dir, env=env)
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out
    (parent,), children = runs_of(client, "search")
    assert len(children) == 6
    epochs = {r.info.run_id: len(client.get_metric_history(r.info.run_id, "test_acc")) for r in children}
    stopped = [r for r in children if "sweep.stopped_early" in r.data.tags]
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert stopped and finished and len(stopped) + len(finished) == 6, out
    assert all(r.info.status == "KILLED" and epochs[r.info.run_id] < 3 for r in stopped)
    assert all(epochs[r.info.run_id] == 3 for r in finished)
    assert len({r.data.params["lr"] for r in children}) == 6  # sampled recipes
    best = max(finished, key=lambda r: (r.data.metrics["last3_min_test_acc"], r.data.metrics["best_test_acc"]))
    assert parent.data.tags["sweep.best_run_id"] == best.info.run_id
    assert parent.data.metrics["stopped_early"] == len(stopped)


def test_a_failing_trial_is_recorded_not_retried_and_the_sweep_goes_on(server, cluster, client, data_dir):
    env = sweep_env(server, cluster, "failing")
    exploding = ["--scheduler", "step", "--step-size", "1", "--gamma", "1e6", "--lr", "0.01"]  # lr x1e6 per epoch
    args = ["--models", "tiny,step3", "--seeds", "1", "--subset", "300", "--epochs", "2", *exploding]
    proc = trainer("sweep", *args, "--address", cluster["address"], "--data-dir", data_dir, env=env)
    out = proc.communicate(timeout=900)[0]
    (parent,), children = runs_of(client, "failing")
    status = {r.info.run_name: r.info.status for r in children}
    failed = [r for r in children if r.info.status == "FAILED"]
    assert set(status) == {"tiny-s1-subset300", "step3-s1-subset300"} and failed, out
    assert all("non-finite" in r.data.tags["failure_reason"] for r in failed)
    assert "retry" not in out and parent.data.metrics["failed_runs"] == len(failed)
    assert proc.returncode == 1 and f"{len(failed)} of the sweep's trials failed" in out.splitlines()[-1]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signalled_driver_exits_130_or_143_resumable_with_nothing_called_failed(
    server, cluster, client, data_dir, signum
):
    experiment = f"interrupted-{signum.name}"
    env = sweep_env(server, cluster, experiment)
    args = ["--models", "step5", "--seeds", "1,2", "--subset", "1024", "--epochs", "3", "--data-dir", data_dir]
    proc = trainer("sweep", *args, "--address", cluster["address"], env=env, preexec_fn=as_from_a_terminal)
    wait_for(lambda: runs_of(client, experiment)[1], 300, "a first trial's run", proc)
    proc.send_signal(signum)
    out = proc.communicate(timeout=120)[0]
    (parent,), _ = runs_of(client, experiment)
    assert proc.returncode == 128 + signum, out
    assert f"`trainer sweep --resume {parent.info.run_id}`" in out and "trials failed" not in out, out
    assert parent.info.status == "KILLED" and "SIGTERM received" not in out  # not Ray's crash report


def test_trials_with_a_fraction_of_a_gpu_share_the_node_that_has_one(server, cluster, client, data_dir):
    env = sweep_env(server, cluster, "gpu-share")
    args = ["--models", "tiny", "--seeds", "1,2", "--subset", "256", "--epochs", "1", "--data-dir", data_dir]
    proc = trainer("sweep", *args, "--gpus-per-run", "0.5", "--cpus-per-run", "0.5", "--address", cluster["address"],
                   env=env)  # fmt: skip
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out
    _, children = runs_of(client, "gpu-share")
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children), out
    assert {r.data.tags["ray.gpu_ids"] for r in children} == {"0"}  # both on the one GPU, half each
    assert len({r.data.tags["ray.node_id"] for r in children}) == 1


def test_a_trial_no_node_can_hold_is_refused_by_a_local_ray_and_waited_for_on_a_cluster(
    server, cluster, client, data_dir, tmp_path
):
    args = ["--models", "tiny", "--seeds", "1", "--subset", "256", "--epochs", "1", "--data-dir", data_dir]
    local = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "MLFLOW_EXPERIMENT_NAME": "x"}
    local.pop("RAY_ADDRESS", None)
    proc = trainer("sweep", *args, "--gpus-per-run", "64", env=local)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1 and "Traceback" not in out, out
    assert out.strip().splitlines()[-1].startswith("Error: no Ray node has the 1 CPUs and 64 GPUs a trial asks"), out
    store = MlflowClient(local["MLFLOW_TRACKING_URI"])
    assert not store.search_runs([e.experiment_id for e in store.search_experiments()]), "a run was made"

    env = sweep_env(server, cluster, "unplaceable")  # each node of the cluster has 1 CPU
    proc = trainer("sweep", *args, "--cpus-per-run", "2", "--address", cluster["address"], env=env)
    wait_for(lambda: runs_of(client, "unplaceable")[0], 120, "the sweep's run", proc)
    time.sleep(5)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert "the trials wait for a node that has them to join" in out and proc.returncode == 143, out
    (parent,), children = runs_of(client, "unplaceable")
    assert parent.info.status == "KILLED" and not children
