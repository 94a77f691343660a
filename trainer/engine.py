"""The training engine: config, loaders, optimizer and schedule, one epoch of training, evaluation.

Nothing here knows about MLflow: `fit` calls `on_epoch(epoch, metrics, state)` after every epoch
and the tracking layer logs what it is handed.
"""

import os
import random
import resource
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from trainer.augment import EpochBatches, build_augment
from trainer.data import MNISTDataset, load_mnist, normalize, to_device, whole_batch

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "step", "onecycle", "cosine")
DEVICES = ("auto", "cpu", "cuda", "mps")
EVAL_BATCH = 500  # under inference_mode; on this CPU 500 evaluated 2-3x faster than 2,000 (cache) and peaks lower
SYNC_EVERY = 20  # steps between host syncs (progress bar refresh and the non-finite loss check)


@dataclass
class Config:
    """The whole resolved configuration of one training run (logged as the run's params)."""

    model: str
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    scheduler: str
    step_size: int
    gamma: float
    pct_start: float
    div_factor: float
    final_div_factor: float
    augment: str
    dropout: float
    ema: float
    seed: int = 1
    device: str = "auto"
    amp: bool = False
    compile: bool = False
    channels_last: bool = True  # NHWC: faster than NCHW on this CPU (README, Speed)
    subset: int | None = None
    workers: int | None = None
    data_dir: str = "./data"

    @classmethod
    def from_recipe(cls, model: str, recipe: dict, **overrides):
        """The variant's recipe, with every override that is not None on top."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in recipe.items() if k in names}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(model=model, **values)

    def as_params(self) -> dict:
        return asdict(self)


class NonFiniteLoss(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[name]:
        raise ValueError(f"device {name!r} is not available on this machine")
    return torch.device(name)


def check_compiler(cfg: Config) -> None:
    """`--compile` builds its kernels with a C/C++ compiler (C++ on a CPU, Triton's launcher on CUDA):
    say so in one line before training, not in a traceback at the first step."""
    compilers = (os.environ.get("CXX"), "g++", "clang++")
    if cfg.compile and not any(shutil.which(c) for c in compilers if c):
        raise ValueError("--compile needs a C++ compiler on PATH (g++, clang++ or $CXX): install one or drop --compile")


def default_workers() -> int:
    """Augmentation workers: one core stays with the training process, the rest augment."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


CORES = torch.get_num_threads()  # torch's default: the cores, or OMP_NUM_THREADS where it is set


def compute_threads() -> tuple[int, int]:
    """(training threads, evaluation threads). Training leaves the default augmentation workers their
    cores (two compute threads sharing a core with a worker stall each other at every op); evaluation,
    with the workers idle, takes every core. Both depend on the machine alone, never on --workers, so a
    seed's metrics don't either. OMP_NUM_THREADS, where set, is used for both."""
    if os.environ.get("OMP_NUM_THREADS"):  # read now: a Ray trial sets it from its CPUs after torch's import
        n = int(os.environ["OMP_NUM_THREADS"])
        return n, n
    return max(1, CORES - default_workers()), CORES


@contextmanager
def threads(n: int):
    """Run the block on n intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def peak_rss_mb() -> float:
    """Peak resident memory of this process or of its largest finished child (DataLoader workers), MB."""
    kb = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return kb / 1024


def make_loaders(cfg: Config, device: torch.device):
    """Train loader (augmented uint8 batches, for `to_device`; reproducible order) and test loader
    (normalised once, never augmented)."""
    workers = default_workers() if cfg.workers is None else cfg.workers
    x_train, y_train = load_mnist(cfg.data_dir, train=True, subset=cfg.subset)
    x_test, y_test = load_mnist(cfg.data_dir, train=False, subset=cfg.subset)
    train_set = MNISTDataset(x_train, y_train, build_augment(cfg.augment))
    sampler = EpochBatches(len(train_set), cfg.batch_size, cfg.seed)
    train = torch.utils.data.DataLoader(
        train_set,
        batch_sampler=sampler,
        collate_fn=whole_batch,
        generator=torch.Generator().manual_seed(cfg.seed),  # never draws from the global RNG (dropout's)
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    test_images = normalize(x_test)  # never augmented: normalised once, kept in memory
    test = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(test_images, y_test),
        batch_size=EVAL_BATCH,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),
    )
    return train, test, sampler


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    optim = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    return optim(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: Config, optimizer, steps_per_epoch: int):
    """Every schedule steps once per batch, so all of them are handled the same way."""
    total = cfg.epochs * steps_per_epoch
    if cfg.scheduler == "onecycle":
        if total < 4:
            raise ValueError(f"onecycle needs at least 4 steps, this run has {total}: use more epochs or data")
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=cfg.lr,
            total_steps=total,
            pct_start=max(cfg.pct_start, 2 / total),  # at least one warm-up step on short smoke runs
            div_factor=cfg.div_factor,
            final_div_factor=cfg.final_div_factor,
        )
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size * steps_per_epoch, gamma=cfg.gamma)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def memory_format(cfg: Config) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


def make_ema(cfg: Config, model: torch.nn.Module) -> AveragedModel | None:
    """An exponential moving average of the weights and BatchNorm statistics, updated every step."""
    if not cfg.ema:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)


def train_one_epoch(model, loader, optimizer, scheduler, device, amp=False, desc="train", ema=None) -> dict:
    """One pass over `loader`. Loss and accuracy are summed on the device; the host syncs every
    SYNC_EVERY steps only, to refresh the bar and stop at a non-finite loss."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0, disable=None)  # off when not a tty
    for step, batch in enumerate(bar, 1):
        x, y = to_device(batch, device)
        with autocast(device, amp):
            out = model(x)
            loss = F.cross_entropy(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        loss_sum += loss.detach() * len(y)
        correct += (out.argmax(1) == y).sum()
        seen += len(y)
        if step % SYNC_EVERY == 0 or step == len(loader):
            mean_loss = loss_sum.item() / seen
            if not np.isfinite(mean_loss):
                raise NonFiniteLoss(f"non-finite training loss at step {step} of {desc}")
            bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{100 * correct.item() / seen:.2f}")
    return {"train_loss": loss_sum.item() / seen, "train_acc": 100.0 * correct.item() / seen}


@torch.inference_mode()
def evaluate(model, loader, device, amp=False) -> dict:
    """Test loss and accuracy; `preds` (CPU tensor) feeds the confusion matrix and error grid."""
    model.eval()
    loss_sum, preds = torch.zeros((), device=device), []
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
        preds.append(out.argmax(1))
    preds = torch.cat(preds).cpu()
    targets = loader.dataset.tensors[1]
    return {
        "test_loss": loss_sum.item() / len(targets),
        "test_acc": 100.0 * (preds == targets).sum().item() / len(targets),
        "preds": preds,
    }


def fit(cfg: Config, model, device, on_epoch, start_epoch: int = 1, state: dict | None = None):
    """Train epochs start_epoch..cfg.epochs; after each, call on_epoch(epoch, metrics, state).
    With an EMA, the averaged weights are evaluated, and end up in `model` after the last epoch."""
    train_loader, test_loader, sampler = make_loaders(cfg, device)
    model.to(memory_format=memory_format(cfg))  # in place; the batches need no conversion (one channel)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, len(train_loader))
    ema = make_ema(cfg, model)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
    step_model = torch.compile(model) if cfg.compile else model  # shares its parameters with `model`
    eval_model = step_model if ema is None else ema.module
    train_threads, eval_threads = compute_threads()
    metrics = None
    for epoch in range(start_epoch, cfg.epochs + 1):
        seed_everything(cfg.seed * 1_000 + epoch)  # dropout masks depend on (seed, epoch) only
        sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        with threads(train_threads):
            metrics = train_one_epoch(
                step_model, train_loader, optimizer, scheduler, device, cfg.amp, f"epoch {epoch}/{cfg.epochs}", ema
            )
        with threads(eval_threads):
            metrics.update(evaluate(eval_model, test_loader, device, cfg.amp))
        metrics.update(lr=lr, epoch_seconds=time.perf_counter() - t0)
        print(
            f"epoch {epoch:2d}/{cfg.epochs}  lr {lr:.5f}  train loss {metrics['train_loss']:.4f} "
            f"acc {metrics['train_acc']:.2f}%  test loss {metrics['test_loss']:.4f} "
            f"acc {metrics['test_acc']:.2f}%  ({metrics['epoch_seconds']:.1f}s)",
            flush=True,
        )
        state = {
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }
        if ema is not None:
            state["ema"] = ema.state_dict()
        on_epoch(epoch, metrics, state)
    if metrics is None:  # resumed after its last epoch (killed while finishing): the figures need predictions
        with threads(eval_threads):
            metrics = evaluate(eval_model, test_loader, device, cfg.amp)
    if ema is not None:
        model.load_state_dict(ema.module.state_dict())  # the weights that were evaluated are the ones saved
    return test_loader, metrics
