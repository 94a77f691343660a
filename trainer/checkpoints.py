"""The checkpoint format: what one epoch's commit stores, and how a resume reads it back, verified.

A checkpoint is a `torch.save` zip (tensors and plain types only, `torch.load(weights_only=True)`
reads it) holding the model, optimizer, scheduler and EMA states, the epoch, that epoch's metrics and
the resolved config. It is logged as `checkpoints/epoch_NNN.pt`; the run's tags name the latest one
and its sha256. A resume verifies the latest against that sha256 and every file against the zip's
own CRCs; a bad file is named and the newest good one before it is used instead.
"""

import hashlib
import io
import random
import tempfile
import zipfile
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from trainer.config import Config

FOLDER = "checkpoints"
TAG, SHA_TAG = "last_checkpoint", "last_checkpoint_sha256"
REQUIRED = {"epoch", "model", "optimizer", "scheduler"}


class CheckpointError(ValueError):
    pass


def name(epoch: int) -> str:
    return f"{FOLDER}/epoch_{epoch:03d}.pt"  # three digits: epoch_100 sorts after epoch_011


def epoch_of(path: str) -> int:
    return int(Path(path).stem.split("_")[1])


def to_bytes(state: dict, metrics: dict, cfg: Config) -> bytes:
    """Model, optimizer, scheduler, epoch, its metrics, the config and the RNG states. A resume needs no
    RNG state (every epoch reseeds from (seed, epoch)); they are kept so that a checkpoint says
    everything about where the run stood."""
    np_state = np.random.get_state()
    payload = {
        **state,
        "metrics": metrics,
        "config": asdict(cfg),
        "rng": {
            "python": list(random.getstate()[1]),
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
            "torch": torch.get_rng_state(),
        },
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def read(payload: bytes, label: str, expected_sha256: str | None = None) -> dict:
    """A verified checkpoint: the sha256 where one is known, every member's CRC, the required keys."""
    if expected_sha256 and sha256(payload) != expected_sha256:
        raise CheckpointError(f"{label}: sha256 mismatch (the file changed after it was logged)")
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as zf:
            bad = zf.testzip()
        if bad:
            raise CheckpointError(f"{label}: CRC error in {bad}")
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # truncated, tampered or not a checkpoint at all
        raise CheckpointError(f"{label}: unreadable ({type(e).__name__})") from None
    missing = REQUIRED - set(state)
    if missing:
        raise CheckpointError(f"{label}: lacks {sorted(missing)}")
    return state


def latest_good(run_id: str, log=print) -> dict:
    """The run's newest checkpoint that verifies, from its last committed one backwards."""
    run = MlflowClient().get_run(run_id)
    latest = run.data.tags.get(TAG)
    if latest is None:
        raise CheckpointError(f"run {run_id} has no checkpoint: it never completed an epoch")
    logged = [f.path for f in MlflowClient().list_artifacts(run_id, FOLDER) if f.path.endswith(".pt")]
    candidates = sorted((p for p in logged if epoch_of(p) <= epoch_of(latest)), key=epoch_of, reverse=True)
    for path in candidates:
        expected = run.data.tags.get(SHA_TAG) if path == latest else None
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp)
            payload = Path(local).read_bytes()
        try:
            return read(payload, f"checkpoint {path} of run {run_id}", expected)
        except CheckpointError as e:
            log(f"{e}; trying the one before")
    raise CheckpointError(f"run {run_id}: no checkpoint verifies ({len(candidates)} tried)")
