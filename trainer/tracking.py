"""One MLflow run per training: its config, per-epoch metrics and checkpoints, figures and the model.

The life of a run, and what is guaranteed at every moment of it:
- start: the resolved config as params and `config.json`; a lease (one writer per run, see `Lease`);
- each epoch is committed in this order: its checkpoint file (with the epoch's metrics and the config
  inside), then the tags that name it and its sha256, then its metrics. A process that dies anywhere
  in between leaves a run that `--resume` continues from the newest checkpoint that verifies, logging
  each step's metrics exactly once;
- the end: figures, the model (once), the summary metrics, then FINISHED. A run interrupted there is
  finished by `--resume`, without training;
- SIGINT/SIGTERM end the run KILLED, an exception FAILED; the lease is released either way.
"""

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import torch
import torchinfo
from mlflow.tracking import MlflowClient

import models
from trainer import checkpoints, plots, serving, target
from trainer.augment import build_augment
from trainer.config import Config
from trainer.data import ensure_mnist, load_mnist
from trainer.engine import (
    NonFiniteLoss,
    check_compiler,
    cpu_model,
    fit,
    peak_rss_mb,
    resolve,
    resolve_device,
    seed_everything,
)
from trainer.files import atomic_write

log = logging.getLogger("trainer")
EPOCH_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds")
LEASE_OWNER, LEASE_EXPIRES = "lease_owner", "lease_expires"
SLOW_STORE_SECONDS = 5  # a store write that takes longer is said on the console
LEASE_SECONDS = float(os.environ.get("MNIST8K_LEASE_SECONDS", 60))  # a silent writer's run is free after this


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM (or a scheduler's stop), raised like Ctrl-C so that each ends the run KILLED."""

    def __init__(self, signum: int = signal.SIGINT, why: str | None = None):
        super().__init__(why or signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """SIGINT and SIGTERM raise `Interrupted` at once, and again at every `check()`: an exception raised
    by a handler can land where Python ignores it (a garbage-collector callback) or where a C extension
    replaces it with its own error, so the signal is also remembered and cannot be lost. Where a library
    logs it with its traceback before passing it on (SQLAlchemy, handing a connection back to its pool),
    that record is dropped: the signal is said in one line. Outside the main thread (a Ray trial) nothing
    is installed."""

    def __init__(self):
        self.received: int | None = None
        self.previous = {}
        self.holding = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handler) for s in (signal.SIGINT, signal.SIGTERM)}
            self.unraisable, sys.unraisablehook = sys.unraisablehook, self.dropped
            self.handlers = {logging.lastResort, *logging.getLogger().handlers} - {None}
            for h in self.handlers:
                h.addFilter(self.not_ours)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if self.previous:
            sys.unraisablehook = self.unraisable
            for h in self.handlers:
                h.removeFilter(self.not_ours)

    @staticmethod
    def not_ours(record: logging.LogRecord) -> bool:
        """False for a log record of our signal's exception (`Interrupted`)."""
        return not (record.exc_info and isinstance(record.exc_info[1], Interrupted))

    def dropped(self, unraisable):
        """Python's report of an exception it had to drop: ours is remembered (`check`), not printed."""
        if not isinstance(unraisable.exc_value, Interrupted):
            self.unraisable(unraisable)

    def handler(self, signum, frame):
        self.received = signum
        if not self.holding:
            raise Interrupted(signum)

    @contextmanager
    def held(self):
        """Inside, a signal is only remembered (`check` raises it after): for writes that must not be cut
        in two, such as ending the run."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False

    def check(self) -> None:
        if self.received:
            raise Interrupted(self.received)


class RunBusy(ValueError):
    """Another live process writes this run."""


class Lease:
    """One writer per run: the writer's id (host:pid:token) and an expiry time in the run's tags,
    renewed by a thread. Another process may take the run once the lease has expired, or at once
    when the holder is a dead process on this host."""

    def __init__(self, run_id: str):
        self.run_id, self.client = run_id, MlflowClient()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stopped = threading.Event()

    def holder(self) -> str | None:
        """The live holder of the run's lease other than us, or None."""
        tags = self.client.get_run(self.run_id).data.tags
        owner, expires = tags.get(LEASE_OWNER), float(tags.get(LEASE_EXPIRES, 0))
        self.expires = expires
        if not owner or owner == self.owner or expires < time.time():
            return None
        host, pid, _ = owner.split(":")
        if host == socket.gethostname() and not pid_alive(int(pid)):
            return None
        return owner

    def acquire(self, wait: bool = False) -> None:
        while (owner := self.holder()) is not None:
            if not wait:
                left = self.expires - time.time()
                raise RunBusy(
                    f"run {self.run_id} is being trained by {owner} (host:pid:token); its lease runs "
                    f"{left:.0f} s more unless renewed: stop that process or wait"
                )
            time.sleep(2)
        self.renew()
        time.sleep(0.5)  # two takers at once: the last write wins, the other sees it and backs off
        if (owner := self.holder()) is not None:
            raise RunBusy(f"run {self.run_id} was just taken by {owner}: not resumed")
        self.keeper = threading.Thread(target=self.keep, daemon=True)
        self.keeper.start()

    def renew(self) -> None:
        self.client.set_tag(self.run_id, LEASE_OWNER, self.owner)  # owner first: expiry alone is never ours
        self.client.set_tag(self.run_id, LEASE_EXPIRES, f"{time.time() + LEASE_SECONDS:.0f}")

    def keep(self) -> None:
        while not self.stopped.wait(LEASE_SECONDS / 4):
            try:
                self.renew()
            except Exception as e:  # a store outage: the next renewal retries; training goes on
                log.warning(f"lease renewal failed ({type(e).__name__}); retrying")

    def release(self) -> None:
        """Stop renewing, let a renewal in flight finish (its expiry, written after ours, would hold the run
        for LEASE_SECONDS more), then expire the lease."""
        self.stopped.set()
        self.keeper.join(timeout=SLOW_STORE_SECONDS)
        self.client.set_tag(self.run_id, LEASE_EXPIRES, "0")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def summarize(history: list[dict], num_params: int, epochs: int) -> dict:
    """The run's summary metrics, from its per-epoch test accuracies."""
    accs = [h["test_acc"] for h in history]
    best = int(np.argmax(accs))
    return {
        "best_test_acc": accs[best],
        "best_epoch": history[best]["epoch"],
        "best_train_acc": max(h["train_acc"] for h in history),
        "last3_min_test_acc": min(accs[-target.LAST_EPOCHS :]),
        "target_met": float(target.met(accs, num_params, epochs)),
    }


def git_commit() -> str | None:
    """The commit of the checkout this package runs from; None unless the package's folder sits at the
    top of a git checkout (wherever the command runs from: another repository's commit is not ours)."""
    package = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=package, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != package.parent:
        return None
    return lines[1]


def run_name(cfg: Config) -> str:
    """`<model>-s<seed>`; a --subset smoke run says so (`step5-s1-subset2048`)."""
    return f"{cfg.model}-s{cfg.seed}" + (f"-subset{cfg.subset}" if cfg.subset else "")


def file_under(project_run_id: str, run_id: str, name: str) -> None:
    """`mlflow run` logs its -P values (`recipe`, ...) in a run of its own before it starts `trainer`.
    That run becomes a child of the training run, so the runs list shows one run per training: the
    training, with the resolved params, the metrics and the model."""
    client = MlflowClient()
    client.set_tag(project_run_id, "mlflow.parentRunId", run_id)
    client.set_tag(project_run_id, "mlflow.runName", f"{name}-mlflow-run")
    note = f"The `mlflow run` that started {name}: its -P values as given (recipe = the variant's own)"
    client.set_tag(project_run_id, "mlflow.note.content", note)


def log_figure(fig, name: str) -> None:
    mlflow.log_figure(fig, name)
    plots.plt.close(fig)


def logged_history(run_id: str) -> dict[int, dict]:
    """{epoch: metrics} for every step whose metrics the run has logged (one transaction each)."""
    client = MlflowClient()
    by_epoch: dict[int, dict] = {}
    for key in EPOCH_METRICS:
        for m in client.get_metric_history(run_id, key):
            by_epoch.setdefault(m.step, {"epoch": m.step})[key] = m.value
    return {epoch: h for epoch, h in by_epoch.items() if "test_acc" in h}


@contextmanager
def said_if_slow(what: str, after: float = SLOW_STORE_SECONDS):
    """Say so when the store takes longer than `after` seconds (MLflow retries a server for minutes)."""
    message = f"the tracking store has not answered for {after:.0f} s ({what}): still retrying"
    timer = threading.Timer(after, log.warning, [message])
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def commit_epoch(run_id: str, epoch: int, metrics: dict, state: dict, cfg: Config, logged: dict, tmp: Path) -> None:
    """Checkpoint file, then the tags that name it, then the metrics (each write all or nothing)."""
    payload = checkpoints.to_bytes(state, metrics, cfg)
    path = checkpoints.name(epoch)
    local = tmp / Path(path).name
    atomic_write(local, payload)
    mlflow.log_artifact(str(local), artifact_path=checkpoints.FOLDER)
    local.unlink()
    mlflow.set_tags({checkpoints.TAG: path, checkpoints.SHA_TAG: checkpoints.sha256(payload)})
    if epoch not in logged:  # a resumed run re-trains epochs whose metrics may already be logged
        mlflow.log_metrics(metrics, step=epoch)


def log_model_once(run_id: str, model, example) -> None:
    """The model (`serving.log_model`), once: a model this run logged completely before it was
    interrupted is kept, a half-logged one is deleted and logged again."""
    client = MlflowClient()
    experiment = client.get_run(run_id).info.experiment_id
    for logged in client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'"):
        if logged.status.name == "READY":
            return
        client.delete_logged_model(logged.model_id)
    serving.log_model(model, example)


def log_run_start(cfg: Config, variant, model, n_params: int, device) -> None:
    commit = git_commit()
    smoke = f"Smoke run on the first {cfg.subset} train and test images, not a result. " if cfg.subset else ""
    mlflow.log_params({**vars(cfg), "num_params": n_params, "device": str(device)})
    mlflow.log_text(cfg.to_json(), "config.json")
    mlflow.set_tags(
        {
            "model": cfg.model,
            "description": variant.description,
            "mlflow.note.content": smoke + variant.description,  # the run page's Description
            "git_commit": commit or "none",
            **({"mlflow.source.git.commit": commit} if commit else {}),
            "torch_version": torch.__version__,
            "mlflow_version": mlflow.__version__,
            "subset": str(cfg.subset) if cfg.subset else "full",
            "cpu": cpu_model(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none",
        }
    )
    summary = torchinfo.summary(model, input_size=(1, 1, 28, 28), verbose=0, device="cpu")
    mlflow.log_text(str(summary), "model_summary.txt")
    train_images, _ = load_mnist(cfg.data_dir, train=True, subset=8)
    log_figure(plots.augment_preview(train_images.numpy(), build_augment(cfg.augment)), "augment_preview.png")


def log_run_end(run_id: str, history: list[dict], test_loader, preds, model, device, n_params: int, cfg) -> dict:
    """Figures (same names: a second pass replaces them), the model (once), then the summary metrics."""
    targets = test_loader.dataset.tensors[1].numpy()
    images = test_loader.dataset.tensors[0][:, 0].numpy()
    log_figure(plots.curves(history), "curves.png")
    log_figure(plots.confusion_matrix(targets, preds.numpy()), "confusion_matrix.png")
    log_figure(plots.misclassified(images, targets, preds.numpy()), "misclassified.png")
    log_model_once(run_id, model, load_mnist(cfg.data_dir, train=False, subset=2)[0].numpy())
    summary = summarize(history, n_params, cfg.epochs)
    logged = MlflowClient().get_run(run_id).data.metrics
    mlflow.log_metrics({k: v for k, v in {**summary, "peak_rss_mb": peak_rss_mb()}.items() if k not in logged})
    return summary


def resume_point(run_id: str, overrides: dict) -> tuple[Config, dict, dict]:
    """(config, newest good checkpoint, logged history) of a run to resume. The config is the run's
    own, from its checkpoint (or, for runs older than that, its params), with `overrides` on top."""
    run = MlflowClient().get_run(run_id)
    if run.info.status == "FINISHED":
        raise checkpoints.CheckpointError(f"run {run_id} already finished: nothing to resume")
    state = checkpoints.latest_good(run_id, log=log.warning)
    cfg = Config.from_dict(state["config"]) if "config" in state else Config.from_params(run.data.params)
    cfg = Config.from_dict({**vars(cfg), **{k: v for k, v in overrides.items() if v is not None}})
    return cfg, state, logged_history(run_id)


def train(
    cfg: Config | None = None,
    resume_run_id: str | None = None,
    overrides: dict | None = None,
    on_epoch=None,
    tags: dict | None = None,
    wait_for_lease: bool = False,
) -> dict:
    """Train `cfg` in a new MLflow run, or continue `resume_run_id` from its newest good checkpoint
    (its own config, with `overrides` such as data_dir on top). Under `mlflow run` the run is filed
    above the project run; a sweep's trial passes its parent and key in `tags`, gets every committed
    epoch's metrics through `on_epoch(epoch, metrics)` and, resuming, waits for a dead writer's lease
    to expire (`wait_for_lease`). Returns the summary metrics."""
    state, logged = None, {}
    if resume_run_id:
        cfg, state, logged = resume_point(resume_run_id, overrides or {})
    ensure_mnist(cfg.data_dir, log=log.info)
    device = resolve_device(cfg.device)
    cfg = resolve(cfg, device)
    check_compiler(cfg)
    project_run = os.environ.pop("MLFLOW_RUN_ID", None)  # under `mlflow run` (a sweep pops it first)
    experiment = MlflowClient().get_run(project_run).info.experiment_id if project_run else None
    if resume_run_id:
        lease = Lease(resume_run_id)
        lease.acquire(wait=wait_for_lease)
    name = None if resume_run_id else run_name(cfg)
    nested = mlflow.active_run() is not None
    run = mlflow.start_run(
        run_id=resume_run_id,
        run_name=name,
        nested=nested,
        experiment_id=experiment,
        tags=None if resume_run_id else tags,
    )
    run_id = run.info.run_id
    if project_run:
        file_under(project_run, run_id, name or run_id)
    if not resume_run_id:
        lease = Lease(run_id)
        lease.acquire()
    status = "FAILED"
    with Signals() as signals:
        try:
            summary = run_epochs(run_id, cfg, device, state, logged, signals, on_epoch)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except NonFiniteLoss as e:
            mlflow.set_tag("failure_reason", str(e))
            raise
        except Exception:
            if not signals.received:
                raise
            # The signal's exception was raised inside a C extension that turned it into its own error
            # (matplotlib's "Invalid affine transformation matrix"): the signal is what ended the run.
            status = "KILLED"
            raise Interrupted(signals.received) from None
        finally:
            with signals.held():
                close(run_id, lease, status)
        signals.check()  # a signal that came while the run was being closed still stops the process
    log.info(f"run {run_id}: " + ", ".join(f"{k} {v:g}" for k, v in summary.items()))
    return summary


def run_epochs(run_id: str, cfg: Config, device, state: dict | None, logged: dict, signals: Signals, report) -> dict:
    """The run's body: its start (or the resumed state), its epochs, each committed (and handed to
    `report`, where given), and its end."""
    variant = models.get_variant(cfg.model)
    seed_everything(cfg.seed)
    model = variant.build(cfg.dropout)
    n_params = models.num_params(model)
    history = [logged[e] for e in sorted(logged) if state and e <= state["epoch"]]
    if state:
        model.load_state_dict(state["model"])
        if state["epoch"] not in logged:  # died between the checkpoint's tags and its metrics
            mlflow.log_metrics(state["metrics"], step=state["epoch"])
            history.append({"epoch": state["epoch"], **state["metrics"]})
        log.info(f"resuming run {run_id} after epoch {state['epoch']}")
    else:
        log_run_start(cfg, variant, model, n_params, device)
    model.to(device)
    with tempfile.TemporaryDirectory() as tmp:

        def on_epoch(epoch, metrics, epoch_state):
            signals.check()
            history.append({"epoch": epoch, **metrics})
            with said_if_slow(f"committing epoch {epoch}"):
                commit_epoch(run_id, epoch, metrics, epoch_state, cfg, logged, Path(tmp))
            signals.check()
            if report is not None:
                report(epoch, metrics)

        start = state["epoch"] + 1 if state else 1
        test_loader, last = fit(cfg, model, device, on_epoch, start_epoch=start, state=state)
    with said_if_slow("logging figures, model and summary"):
        summary = log_run_end(run_id, history, test_loader, last["preds"], model, device, n_params, cfg)
    signals.check()
    return summary


def close(run_id: str, lease: Lease, status: str) -> None:
    """Release the lease and end the run with `status`; a store that fails here is a warning, so the
    error that ended the run is the one reported."""
    for what, step in (("release the lease of", lease.release), (f"mark {status}", lambda: mlflow.end_run(status))):
        try:
            step()
        except Exception as e:  # a lease expires by itself; a run left RUNNING is resumable
            log.warning(f"could not {what} run {run_id} ({type(e).__name__})")
