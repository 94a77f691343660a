"""One MLflow run per training: params, per-epoch metrics, checkpoints, figures and the model.

Store and experiment come from MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME, defaulting to the
local `sqlite:///mlflow.db` and `mnist8k`. A run that raises ends FAILED; Ctrl-C or SIGTERM ends it
KILLED; either way the checkpoint of the last completed epoch is already in the run.
"""

import fcntl
import io
import os
import random
import signal
import subprocess
import tempfile
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import fields
from pathlib import Path
from typing import get_args

import mlflow
import numpy as np
import requests
import torch
import torchinfo
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

import models
from trainer import plots
from trainer.augment import build_augment
from trainer.data import atomic_write, load_mnist
from trainer.engine import Config, NonFiniteLoss, check_compiler, fit, peak_rss_mb, resolve_device, seed_everything

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "mnist8k"
TARGET_ACC, PARAM_LIMIT, EPOCH_LIMIT = 99.40, 8000, 15
CHECKPOINT_TAG = "last_checkpoint"
# Params added after the first runs were logged, with the value those runs had (resume and report use it).
ADDED_SINCE = {"ema": 0.0, "channels_last": False}
EPOCH_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds")


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that both end the run KILLED."""


def setup_tracking() -> str:
    """Point MLflow at the store and experiment; returns the tracking URI."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):  # the first touch creates (migrates) a sqlite store: one process at a time
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
        if mlflow.get_experiment_by_name(name) is None:
            create_experiment(name, uri)
    if not os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run`, the run (and its experiment) exists
        mlflow.set_experiment(name)
    return uri


@contextmanager
def store_lock(uri: str):
    """An exclusive lock on `<db>.lock` beside a sqlite store; nothing to lock for a server."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    with open(f"{uri.removeprefix('sqlite:///')}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def create_experiment(name: str, uri: str) -> None:
    """A sqlite store keeps its artifacts beside the database file (not in the current directory)."""
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()
    try:
        mlflow.create_experiment(name, artifact_location=location)
    except MlflowException as e:  # another process created it first: fine
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def summarize(history: list[dict], num_params: int, epochs: int) -> dict:
    """The run's summary metrics, from its per-epoch test accuracies."""
    accs = [h["test_acc"] for h in history]
    best = int(np.argmax(accs))
    last3 = min(accs[-3:])
    met = last3 >= TARGET_ACC and num_params < PARAM_LIMIT and epochs <= EPOCH_LIMIT
    return {
        "best_test_acc": accs[best],
        "best_epoch": history[best]["epoch"],
        "best_train_acc": max(h["train_acc"] for h in history),
        "last3_min_test_acc": last3,
        "target_met": float(met),
    }


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def model_summary(model) -> str:
    return str(torchinfo.summary(model, input_size=(1, 1, 28, 28), verbose=0, device="cpu"))


def log_figure(fig, name: str) -> None:
    mlflow.log_figure(fig, name)
    plots.plt.close(fig)


def checkpoint(state: dict, cfg: Config) -> dict:
    """Model, optimizer, scheduler, epoch, RNG states and data order; tensors and plain types only, so
    torch.load(weights_only=True) reads it. A resume needs no RNG state (every epoch reseeds from
    (seed, epoch)); they are kept so that a checkpoint says everything about where the run stood."""
    np_state = np.random.get_state()
    return {
        **state,
        "rng": {
            "python": list(random.getstate()[1]),
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
            "torch": torch.get_rng_state(),
        },
        "data_order": {"seed": cfg.seed, "epoch": state["epoch"]},
    }


def log_checkpoint(state: dict, cfg: Config, tmpdir: Path) -> None:
    """Write atomically, log as checkpoints/epoch_NN.pt, then point the tag at it (never at half a file)."""
    name = f"epoch_{state['epoch']:02d}.pt"
    path = tmpdir / name
    buffer = io.BytesIO()
    torch.save(checkpoint(state, cfg), buffer)
    atomic_write(path, buffer.getvalue())
    mlflow.log_artifact(str(path), artifact_path="checkpoints")
    mlflow.set_tag(CHECKPOINT_TAG, f"checkpoints/{name}")
    path.unlink()


@contextmanager
def sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():  # a Ray Tune trial: Ray handles its signals
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        raise Interrupted("SIGTERM")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def log_model(model, device) -> None:
    model.eval()
    example = np.zeros((2, 1, 28, 28), dtype=np.float32)
    with torch.inference_mode():
        out = model(torch.from_numpy(example).to(device)).float().cpu().numpy()
    mlflow.pytorch.log_model(
        model.cpu().to(memory_format=torch.contiguous_format),  # channels_last weights make torch.export warn
        name="model",
        signature=infer_signature(example, out),
        input_example=example,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
    )


def train(cfg: Config, resume_run_id: str | None = None, on_epoch=None, tags: dict | None = None) -> dict:
    """Train `cfg` inside one MLflow run (or continue `resume_run_id` from its last checkpoint).

    Under `mlflow run` the run is a child of the run already active. `on_epoch(epoch, metrics)`, if
    given, is called after each epoch is logged and checkpointed (`trainer sweep` reports to Ray Tune);
    `tags` are set on a new run as it is created (a sweep's parent and trial key). Returns the summary
    metrics."""
    variant = models.get_variant(cfg.model)
    device = resolve_device(cfg.device)
    check_compiler(cfg)
    seed_everything(cfg.seed)
    model = variant.build(cfg.dropout)
    n_params = models.num_params(model)
    history, state = [], None
    if resume_run_id:
        state = load_checkpoint(resume_run_id)
        model.load_state_dict(state["model"])
        history = logged_history(resume_run_id, state["epoch"])
        print(f"resuming run {resume_run_id} after epoch {state['epoch']}")
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        project_run = os.environ.pop("MLFLOW_RUN_ID", None)
        if project_run and not mlflow.active_run():  # `mlflow run`: the -P values' run; training is its child
            stack.enter_context(mlflow.start_run(run_id=project_run))
        nested = mlflow.active_run() is not None
        name = None if resume_run_id else f"{cfg.model}-s{cfg.seed}"
        run = stack.enter_context(
            mlflow.start_run(run_id=resume_run_id, run_name=name, nested=nested, tags=None if resume_run_id else tags)
        )
        try:
            with sigterm_as_interrupt():
                if not resume_run_id:
                    log_run_start(cfg, variant, model, n_params, device)
                model.to(device)

                def log_epoch(epoch, metrics, state):
                    history.append({"epoch": epoch, **{k: v for k, v in metrics.items() if k != "preds"}})
                    mlflow.log_metrics({k: v for k, v in history[-1].items() if k != "epoch"}, step=epoch)
                    log_checkpoint(state, cfg, Path(tmp))
                    if on_epoch is not None:
                        on_epoch(epoch, history[-1])

                start = state["epoch"] + 1 if state else 1
                test_loader, last = fit(cfg, model, device, log_epoch, start_epoch=start, state=state)
                summary = summarize(history, n_params, cfg.epochs)
                mlflow.log_metrics(summary)
                log_artifacts_at_end(history, test_loader, last["preds"])
                log_model(model, device)
                mlflow.log_metric("peak_rss_mb", peak_rss_mb())  # fit's workers have exited: counted
        except NonFiniteLoss as e:
            mlflow.set_tag("failure_reason", str(e))
            raise
        except KeyboardInterrupt:
            mlflow.end_run("KILLED")
            raise
    print(f"run {run.info.run_id}: " + ", ".join(f"{k} {v:g}" for k, v in summary.items()))
    return summary


def log_run_start(cfg: Config, variant, model, n_params: int, device) -> None:
    mlflow.log_params({**cfg.as_params(), "num_params": n_params, "device": str(device)})
    mlflow.set_tags(
        {
            "model": cfg.model,
            "description": variant.description,
            "git_commit": git_commit() or "unknown",
            "torch_version": torch.__version__,
            "mlflow_version": mlflow.__version__,
            "subset": str(cfg.subset) if cfg.subset else "full",
        }
    )
    mlflow.log_text(model_summary(model), "model_summary.txt")
    train_images, _ = load_mnist(cfg.data_dir, train=True, subset=8)
    log_figure(plots.augment_preview(train_images.numpy(), build_augment(cfg.augment)), "augment_preview.png")


class CheckpointError(ValueError):
    pass


def config_of_run(run_id: str) -> Config:
    """The Config a run was started with, from its logged params."""
    params = MlflowClient().get_run(run_id).data.params
    values = {}
    for f in fields(Config):
        if f.name not in params and f.name not in ADDED_SINCE:
            raise CheckpointError(f"run {run_id} has no param {f.name!r}: not a trainer run")
        raw = params.get(f.name, str(ADDED_SINCE.get(f.name)))
        types = [t for t in get_args(f.type) if t is not type(None)] or [f.type]
        values[f.name] = None if raw == "None" else (raw == "True" if types[0] is bool else types[0](raw))
    return Config(**values)


def load_checkpoint(run_id: str) -> dict:
    """The run's last complete checkpoint, read with torch.load(weights_only=True)."""
    run = MlflowClient().get_run(run_id)
    path = run.data.tags.get(CHECKPOINT_TAG)
    if path is None:
        raise CheckpointError(f"run {run_id} has no checkpoint: it never completed an epoch")
    if run.info.status == "FINISHED":
        raise CheckpointError(f"run {run_id} already finished: nothing to resume")
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp)
        try:
            state = torch.load(local, map_location="cpu", weights_only=True)
            missing = {"epoch", "model", "optimizer", "scheduler"} - set(state)
        except Exception as e:  # truncated, tampered or not a checkpoint at all
            raise CheckpointError(f"checkpoint {path} of run {run_id} is unreadable ({type(e).__name__})") from None
    if missing:
        raise CheckpointError(f"checkpoint {path} of run {run_id} lacks {sorted(missing)}")
    return state


def logged_history(run_id: str, upto: int) -> list[dict]:
    """The per-epoch metrics a run logged for epochs 1..upto."""
    client = MlflowClient()
    by_epoch: dict[int, dict] = {epoch: {"epoch": epoch} for epoch in range(1, upto + 1)}
    for key in EPOCH_METRICS:
        for m in client.get_metric_history(run_id, key):
            if m.step in by_epoch:
                by_epoch[m.step][key] = m.value
    return list(by_epoch.values())


def log_artifacts_at_end(history, test_loader, preds) -> None:
    targets = test_loader.dataset.tensors[1].numpy()
    images = test_loader.dataset.tensors[0][:, 0].numpy()
    log_figure(plots.curves(history), "curves.png")
    log_figure(plots.confusion_matrix(targets, preds.numpy()), "confusion_matrix.png")
    log_figure(plots.misclassified(images, targets, preds.numpy()), "misclassified.png")


class StoreUnreachable(ValueError):
    pass


def check_store() -> None:
    """Fail before training, not after 15 epochs, if the tracking store can't be used."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    if uri.startswith(("http://", "https://")):
        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=5).raise_for_status()
        except requests.RequestException as e:
            raise StoreUnreachable(f"tracking server {uri} is unreachable ({type(e).__name__})") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise StoreUnreachable(f"tracking store {uri}: folder {folder} is missing or not writable")
    setup_tracking()
