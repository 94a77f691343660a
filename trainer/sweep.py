"""`trainer sweep`: every run of a sweep or a search is a Ray Tune trial and one MLflow run.

The sweep's parent run records what to train (`sweep.json`: every trial's resolved config) and each
trial's child run carries a deterministic key (the tag `sweep.trial`: model, seed and a hash of the
sweep id and the config). The tracking server is the sweep's only shared state, so nothing needs
storage shared between Ray's nodes:
- a trial whose key has a FINISHED run is done; one with an unfinished run that has a checkpoint
  continues it (`tracking.train(cfg, resume_run_id=...)`); otherwise it starts a new child run;
- Ray retries a trial whose worker or node died (`--max-failures`): the retry resumes its run;
- `trainer sweep --resume SWEEP_RUN_ID` (a killed driver) reads the finished children from MLflow
  and trains only the rest.

A search (`--samples N`) samples N recipes per model and seed from `search_space` (seeded, so a resumed
search samples the same ones) and stops the weak ones early with ASHA on test_acc; the parent run
links its best child. Credentials (MLFLOW_TRACKING_USERNAME/_PASSWORD) reach the trials through Ray's
object store (`tune.with_parameters`), never through a trial's config, a runtime_env or a log.
"""

import hashlib
import json
import logging
import math
import os
import signal
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import ray
import ray._private.ray_constants as ray_constants
import torch
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from trainer import checkpoints, store, tracking
from trainer.config import Config
from trainer.data import DATA_DIR_ENV, ensure_mnist
from trainer.engine import NonFiniteLoss

TRIAL_TAG = "sweep.trial"
STOPPED_TAG = "sweep.stopped_early"
BEST_TAG = "sweep.best_run_id"
SPEC_FILE = "sweep.json"
PASSED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
UNFINISHED = ("RUNNING", "SCHEDULED", "KILLED")  # resumable from their last checkpoint
SEARCH_SEED = 0


def search_space(recipe: dict) -> dict:
    """The recipe values a search varies (Ray Tune domains), around the variant's own lr."""
    return {
        "lr": tune.loguniform(recipe["lr"] / 3, recipe["lr"] * 3),
        "pct_start": tune.uniform(0.1, 0.5),
        "weight_decay": tune.choice([0.0, 1e-5, 1e-4, 5e-4]),
        "dropout": tune.uniform(0.0, 0.1),
        "clean_epochs": tune.choice([0, 3, 5]),
        "batch_size": tune.choice([64, 128, 256]),
        "ema": tune.choice([0.0, 0.99, 0.999]),
    }


@dataclass
class Spec:
    """A sweep as its parent run records it: enough for `--resume` to finish it on any cluster."""

    configs: list[dict]
    samples: int = 0  # 0: a plain sweep; N: a search (ASHA on test_acc)
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    max_failures: int = 2
    keys: list[str] = field(default_factory=list)


def sample(configs: list[Config], samples: int) -> list[Config]:
    """`samples` recipes per config from the search space; the same ones every time (seeded)."""
    rng = np.random.default_rng(SEARCH_SEED)
    out = []
    for cfg in configs:
        for _ in range(samples):
            drawn = {k: d.sample(random_state=rng) for k, d in search_space(asdict(cfg)).items()}
            drawn = {k: float(f"{v:.4g}") if isinstance(v, float) else v.item() if hasattr(v, "item") else v
                     for k, v in drawn.items()}  # fmt: skip
            out.append(Config(**{**asdict(cfg), **drawn}))
    return out


def trial_key(sweep_id: str, params: dict) -> str:
    """`<model>-s<seed>-<hash>`: the same for a config in its sweep wherever and whenever it runs."""
    identity = {k: v for k, v in params.items() if k != "data_dir"}  # where the data lives may differ per node
    digest = hashlib.sha256(json.dumps([sweep_id, identity], sort_keys=True).encode()).hexdigest()[:12]
    return f"{params['model']}-s{params['seed']}-{digest}"


def children(client: MlflowClient, parent) -> dict[str, list]:
    """{trial key: the parent's child runs with that key, newest first}."""
    found: dict[str, list] = {}
    filter_string = f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    for run in client.search_runs([parent.info.experiment_id], filter_string, order_by=["attributes.start_time DESC"]):
        if TRIAL_TAG in run.data.tags:
            found.setdefault(run.data.tags[TRIAL_TAG], []).append(run)
    return found


def settled(runs: list) -> object | None:
    """The run that settles a trial: FINISHED, FAILED (a deterministic failure) or stopped early."""
    return next((r for r in runs if r.info.status in ("FINISHED", "FAILED") or STOPPED_TAG in r.data.tags), None)


def resumable(runs: list) -> object | None:
    """The newest unfinished run with a checkpoint (a run killed in its first epoch starts afresh)."""
    return next((r for r in runs if r.info.status in UNFINISHED and checkpoints.TAG in r.data.tags), None)


def run_trial(config: dict, context: dict) -> None:
    """One Ray Tune trial: train (or continue, or skip) the MLflow run of `config['trial']['key']`."""
    key, params = config["trial"]["key"], config["trial"]["params"]
    os.environ.update(context["env"])
    threads = max(1, math.floor(context["cpus"]))  # the CPUs Ray gave this trial; seeds reproduce per count
    os.environ["OMP_NUM_THREADS"] = str(threads)  # engine.compute_threads reads it
    torch.set_num_threads(threads)
    cfg = Config.from_dict({**params, "data_dir": os.environ.get(DATA_DIR_ENV) or params["data_dir"]})  # the node's own
    ensure_mnist(cfg.data_dir)
    store.setup()
    client = MlflowClient()
    parent = client.get_run(context["parent"])
    runs = children(client, parent).get(key, [])
    if settled(runs):
        return
    ctx = ray.get_runtime_context()
    where = {"ray.node_id": ctx.get_node_id(), "ray.worker_pid": str(os.getpid())}
    if gpus := ctx.get_accelerator_ids().get("GPU"):  # the GPUs Ray gave this trial (CUDA_VISIBLE_DEVICES)
        where["ray.gpu_ids"] = ",".join(gpus)
    previous = resumable(runs)
    for run in runs:  # killed in its first epoch, before any checkpoint: superseded by a new run
        if run is not previous and run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED")
    if previous is not None:  # a retry: `train` takes the run over once the dead worker's lease is free
        for k, v in where.items():
            client.set_tag(previous.info.run_id, k, v)

    def report(epoch, metrics):
        if epoch < cfg.epochs:  # the last epoch is reported with the summary, once the run has FINISHED
            try:
                tune.report({**metrics, "epoch": epoch})
            except SystemExit:  # how Tune stops a trial (ASHA): the run ends KILLED, marked as stopped
                mlflow.set_tag(STOPPED_TAG, f"ASHA after epoch {epoch}")
                raise tracking.Interrupted(why="stopped early") from None

    tags = {"mlflow.parentRunId": parent.info.run_id, TRIAL_TAG: key, **where}
    try:
        if previous is None:
            summary = tracking.train(cfg, on_epoch=report, tags=tags)
        else:  # the run's own config, on this node's data
            overrides = {"data_dir": cfg.data_dir, "workers": cfg.workers}
            summary = tracking.train(None, previous.info.run_id, overrides, on_epoch=report, wait_for_lease=True)
    except tracking.Interrupted:
        raise SystemExit(0) from None  # what Tune expects of a trial it stops
    except (NonFiniteLoss, checkpoints.CheckpointError, ValueError) as e:
        # Deterministic: a retry would fail the same way, so the trial ends here with its run FAILED.
        traceback.print_exc()
        runs = children(client, parent).get(key, [])
        if runs and "failure_reason" not in runs[0].data.tags:
            client.set_tag(runs[0].info.run_id, "failure_reason", f"{type(e).__name__}: {e}")
        return
    run = children(client, parent)[key][0]
    last = tracking.logged_history(run.info.run_id)[cfg.epochs]
    tune.report({**last, **summary})


class Progress(tune.Callback):
    """One line per finished trial and a live count."""

    def __init__(self, parent, total: int, done_before: int):
        self.parent, self.total = parent, total
        self.counts = {"running": 0, "done": done_before, "stopped": 0, "failed": 0}

    def line(self, verb: str, trial, text: str = "", change: dict | None = None) -> None:
        for k, v in (change or {}).items():
            self.counts[k] += v
        count = ", ".join(f"{v} {k}" for k, v in self.counts.items())
        print(f"{verb:7s}{trial.config['trial']['key']}{text} [{count}, of {self.total}]", flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.line("start", trial, change={"running": 1})

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.line("retry", trial, ": raised or its worker died; resuming its run", {"running": -1})

    def on_trial_error(self, iteration, trials, trial, **info):
        for run in children(MlflowClient(), self.parent).get(trial.config["trial"]["key"], [])[:1]:
            if run.info.status == "RUNNING":  # its process is gone; `--resume` continues it
                MlflowClient().set_terminated(run.info.run_id, "KILLED")
        self.line("failed", trial, f": in all {trial.max_failures + 1} tries", {"running": -1, "failed": 1})

    def on_trial_complete(self, iteration, trials, trial, **info):
        params = trial.config["trial"]["params"]
        runs = children(MlflowClient(), self.parent).get(trial.config["trial"]["key"], [])
        if runs and runs[0].info.status == "FINISHED":
            m = runs[0].data.metrics
            text = f" (run {runs[0].info.run_id[:8]}): best {m['best_test_acc']:.2f}"
            text += f", last-3 min {m['last3_min_test_acc']:.2f}"
            self.line("done", trial, text, {"running": -1, "done": 1})
        elif (
            trial.last_result.get("epoch", 0) < params["epochs"] and runs and "failure_reason" not in runs[0].data.tags
        ):
            epoch = trial.last_result.get("epoch", 0)
            stopped(runs[0], epoch)
            self.line(
                "stop",
                trial,
                f" (run {runs[0].info.run_id[:8]}) after epoch {epoch}: ASHA",
                {"running": -1, "stopped": 1},
            )
        else:
            reason = runs[0].data.tags.get("failure_reason", "see its run") if runs else "no run"
            self.line("failed", trial, f": {reason}", {"running": -1, "failed": 1})


def stopped(run, epoch: int, wait: float = 10) -> None:
    """A run the scheduler stopped: its trial ends it KILLED as it goes; if its process was gone first, here."""
    client = MlflowClient()
    deadline = time.time() + wait
    while client.get_run(run.info.run_id).info.status == "RUNNING" and time.time() < deadline:
        time.sleep(0.2)
    if client.get_run(run.info.run_id).info.status == "RUNNING":
        client.set_tag(run.info.run_id, STOPPED_TAG, f"ASHA after epoch {epoch}")
        client.set_terminated(run.info.run_id, "KILLED")


def start_ray(address: str | None) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS), else start Ray on this machine, on loopback only.
    Returns whether it joined a cluster."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing phones home unasked
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables, our Progress lines only
    # Ctrl-C raises KeyboardInterrupt here, as in `trainer train`, rather than Tune ending the run its way
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Ray's nodes take this machine's network address and listen on every interface; where Ray runs
        # no multi-node clusters (its flag, read at each use) it takes 127.0.0.1 and listens there only.
        ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False)
    return bool(address)


def trial_env() -> dict:
    """What the trials need from the driver's environment; the store as an absolute location."""
    env = {k: os.environ[k] for k in PASSED_ENV if os.environ.get(k)}
    uri = env.get("MLFLOW_TRACKING_URI", store.DEFAULT_TRACKING_URI)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return {**env, "MLFLOW_TRACKING_URI": uri}


def new_spec(configs: list[Config], samples: int, cpus: float, gpus: float, max_failures: int) -> Spec:
    for cfg in configs:
        cfg.data_dir = str(Path(cfg.data_dir).resolve())
        if cfg.workers is None:
            cfg.workers = 0  # augmentation in the trial's own process: its CPUs are its threads
    if samples:
        configs = sample(configs, samples)
    return Spec([asdict(c) for c in configs], samples, cpus, gpus, max_failures)


def sweep(spec: Spec | None, address: str | None, resume: str | None = None, data_dir: str | None = None) -> int:
    """Run the sweep `spec` (or finish the one of the parent run `resume`); returns how many trials failed
    or are left unfinished."""
    store.setup()
    client = MlflowClient()
    project_run = os.environ.pop("MLFLOW_RUN_ID", None)  # under `mlflow run -e sweep`: the parent
    if resume:
        spec = read_spec(client, resume, data_dir)
    run_id = resume or project_run
    name = None if run_id else f"{'search' if spec.samples else 'sweep'}-{len(spec.configs)}-runs"
    joined = start_ray(address)
    try:
        check_resources(spec, joined)  # before any run is made
        with mlflow.start_run(run_id=run_id, run_name=name) as parent_run:
            parent = client.get_run(parent_run.info.run_id)
            if not resume:
                spec.keys = [trial_key(parent.info.run_id, c) for c in spec.configs]
                log_spec(spec)
            trials = [{"key": k, "params": c} for k, c in zip(spec.keys, spec.configs, strict=True)]
            settled_keys = {k for k, runs in children(client, parent).items() if settled(runs)}
            todo = [t for t in trials if t["key"] not in settled_keys]
            print(f"{len(trials)} trials, {len(trials) - len(todo)} already settled in MLflow, {len(todo)} to run")
            signals = tracking.Signals()  # SIGTERM too, over Ray's own handler: like Ctrl-C, but exit 143
            try:
                with signals:
                    if todo:
                        tune_trials(spec, todo, parent, len(trials) - len(todo))
            except (KeyboardInterrupt, Exception) as e:
                if not (isinstance(e, KeyboardInterrupt) or signals.received):
                    raise
                # Tune raises its own KeyboardInterrupt, a C extension its own error: the signal is the one
                # `signals` received
                print(f"the sweep stays resumable: `trainer sweep --resume {parent.info.run_id}` finishes it")
                mlflow.end_run("KILLED")
                raise tracking.Interrupted(signals.received or signal.SIGINT) from None
            failed = summarize(client, parent, spec)
            unsettled = [k for k in spec.keys if not settled(children(client, parent).get(k, []))]
            if unsettled:  # a worker died in every try: the sweep stays resumable
                print(f"{len(unsettled)} trials unfinished: `trainer sweep --resume {parent.info.run_id}` continues")
                mlflow.end_run("KILLED")
    finally:
        ray.shutdown()
    return failed + len(unsettled)


def check_resources(spec: Spec, joined: bool) -> None:
    """A trial needs one node with its CPUs and GPUs. Ray would wait for one forever: on the local Ray,
    which cannot grow, that is an error; on a cluster one may still join (an autoscaler), so say it."""
    need = {"CPU": spec.cpus_per_run, "GPU": spec.gpus_per_run}
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if any(all(r.get(k, 0) >= v for k, v in need.items()) for r in nodes):
        return
    have = "; ".join(f"{r.get('CPU', 0):g} CPUs, {r.get('GPU', 0):g} GPUs" for r in nodes)
    message = f"no Ray node has the {need['CPU']:g} CPUs and {need['GPU']:g} GPUs a trial asks for (nodes: {have})"
    if not joined:
        raise ValueError(f"{message}: lower --cpus-per-run / --gpus-per-run")
    logging.getLogger("trainer").warning(f"{message}: the trials wait for a node that has them to join")


def tune_trials(spec: Spec, todo: list[dict], parent, done_before: int) -> None:
    experiment = MlflowClient().get_experiment(parent.info.experiment_id).name  # `mlflow run` may name it
    env = {**trial_env(), "MLFLOW_EXPERIMENT_NAME": experiment}
    context = {"env": env, "parent": parent.info.run_id, "cpus": spec.cpus_per_run}
    trainable = tune.with_parameters(run_trial, context=context)
    trainable = tune.with_resources(trainable, {"cpu": spec.cpus_per_run, "gpu": spec.gpus_per_run})
    scheduler = None
    if spec.samples:
        epochs = max(c["epochs"] for c in spec.configs)
        scheduler = ASHAScheduler(
            time_attr="epoch", max_t=epochs, grace_period=1, reduction_factor=2, stop_last_trials=False
        )
    with tempfile.TemporaryDirectory(prefix="mnist8k-tune-") as storage:  # Tune's own files: nothing we need
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(todo)},
            tune_config=tune.TuneConfig(
                scheduler=scheduler, metric="test_acc" if scheduler else None, mode="max" if scheduler else None
            ),
            run_config=tune.RunConfig(
                name="sweep",
                storage_path=storage,
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                callbacks=[Progress(parent, done_before + len(todo), done_before)],
            ),
        )
        tuner.fit()


def log_spec(spec: Spec) -> None:
    models = ",".join(dict.fromkeys(c["model"] for c in spec.configs))
    seeds = ",".join(dict.fromkeys(str(c["seed"]) for c in spec.configs))
    mlflow.log_params({"models": models, "seeds": seeds, "runs": len(spec.configs), "samples": spec.samples})
    mlflow.log_dict(asdict(spec), SPEC_FILE)  # and the resources; `mlflow run -e sweep` logged its -P values


def read_spec(client: MlflowClient, run_id: str, data_dir: str | None) -> Spec:
    try:
        spec = Spec(**mlflow.artifacts.load_dict(f"runs:/{run_id}/{SPEC_FILE}"))
    except Exception as e:
        raise ValueError(f"run {run_id} is not a sweep (no readable {SPEC_FILE}: {type(e).__name__})") from None
    if client.get_run(run_id).info.status == "FINISHED":
        raise ValueError(f"sweep {run_id} already finished: nothing to resume")
    if data_dir:
        for c in spec.configs:
            c["data_dir"] = str(Path(data_dir).resolve())
    return spec


def summarize(client: MlflowClient, parent, spec: Spec) -> int:
    """Per model: mean and std over its finished runs, seeds that met the target; for a search, the
    best run (highest last-3 minimum) as a tag and its config. Returns the failed trials."""
    found = children(client, parent)
    newest = [found[k][0] for k in spec.keys if found.get(k)]
    finished = [r for r in newest if r.info.status == "FINISHED"]
    stopped = sum(1 for r in newest if STOPPED_TAG in r.data.tags)
    failed = sum(1 for r in newest if r.info.status == "FAILED")
    by_model: dict[str, list] = {}
    for run in finished:
        by_model.setdefault(run.data.params["model"], []).append(run.data.metrics)
    for model, metrics in by_model.items():
        for key in ("best_test_acc", "last3_min_test_acc"):
            values = [m[key] for m in metrics]
            mlflow.log_metrics({f"{model}.{key}.mean": np.mean(values), f"{model}.{key}.std": np.std(values)})
        mlflow.log_metric(f"{model}.seeds_met_target", sum(m["target_met"] for m in metrics))
    mlflow.log_metrics({"failed_runs": failed, "stopped_early": stopped})
    if spec.samples and finished:
        best = max(finished, key=lambda r: (r.data.metrics["last3_min_test_acc"], r.data.metrics["best_test_acc"]))
        mlflow.set_tag(BEST_TAG, best.info.run_id)
        mlflow.log_dict(best.data.params, "best_config.json")
        mlflow.log_metric("best.last3_min_test_acc", best.data.metrics["last3_min_test_acc"])
        print(f"best: run {best.info.run_id} ({best.data.tags.get(TRIAL_TAG)})")
    return failed
