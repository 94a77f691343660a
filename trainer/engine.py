"""The training engine: config, loaders, optimizer and schedule, one epoch of training, evaluation.

Nothing here knows about MLflow: `fit` calls `on_epoch(epoch, metrics, state)` after every epoch
and the tracking layer logs what it is handed.
"""

import ctypes
import logging
import os
import platform
import random
import resource
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from trainer.augment import EpochBatches, build_augment
from trainer.config import Config
from trainer.data import MNISTDataset, load_mnist, normalize, to_device, whole_batch

log = logging.getLogger("trainer")
EVAL_BATCH = 500  # under inference_mode; on this CPU 500 evaluated 2-3x faster than 2,000 (cache) and peaks lower
SYNC_EVERY = 20  # steps between host syncs (progress bar refresh and the non-finite loss check)


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


def cpu_info() -> str:
    """/proc/cpuinfo ('' where there is none)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_bf16_unit() -> str | None:
    """The CPU's native bf16 unit, 'AMX' or 'AVX512-BF16', or None where bf16 would be emulated."""
    flags = cpu_info().split()
    return "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None


def cpu_model() -> str:
    """The CPU as far as the numbers go: its model name, CPUID family and model, the instruction set
    PyTorch's kernels run on and its native bf16 unit, e.g. 'Intel(R) Xeon(R) Processor (family 6 model
    207; AVX512, AMX)'. A virtual machine may show a generic model name: two Xeons with AMX that both said
    'Intel(R) Xeon(R) Processor' gave different per-epoch numbers (README, Results); and two machines
    sold under one name can differ in instruction set and bf16 unit."""
    info = {}
    for line in cpu_info().splitlines():  # the first processor's fields
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    name = info.get("model name") or platform.processor() or "unknown"
    cpuid = f"family {info['cpu family']} model {info['model']}" if "cpu family" in info else None
    units = ", ".join(u for u in (torch.backends.cpu.get_cpu_capability(), cpu_bf16_unit()) if u)
    return f"{name} ({'; '.join(filter(None, (cpuid, units)))})"


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast runs on native bf16 hardware: a CUDA GPU that supports it, or a CPU with AMX
    or AVX512-BF16. Elsewhere bf16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_bf16_unit() is not None


def resolve(cfg: Config, device: torch.device) -> Config:
    """The config as it will run: `amp` left to auto (None) becomes whether the device has native bf16."""
    return replace(cfg, amp=native_bf16(device)) if cfg.amp is None else cfg


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


def die_with_parent(worker_id: int) -> None:
    """DataLoader worker_init_fn: the kernel kills the worker when the training process dies, SIGKILL
    included (Linux; elsewhere the loader's own watchdog ends it)."""
    if os.uname().sysname == "Linux":
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def make_loaders(cfg: Config, device: torch.device):
    """Train loader (augmented uint8 batches, for `to_device`; reproducible order) and test loader
    (normalised once, never augmented)."""
    workers = default_workers() if cfg.workers is None else cfg.workers
    x_train, y_train = load_mnist(cfg.data_dir, train=True, subset=cfg.subset)
    x_test, y_test = load_mnist(cfg.data_dir, train=False, subset=cfg.subset)
    train_set = MNISTDataset(x_train, y_train, build_augment(cfg.augment))
    sampler = EpochBatches(len(train_set), cfg.batch_size, cfg.seed, augmented=cfg.epochs - cfg.clean_epochs)
    train = torch.utils.data.DataLoader(
        train_set,
        batch_sampler=sampler,
        collate_fn=whole_batch,
        generator=torch.Generator().manual_seed(cfg.seed),  # never draws from the global RNG (dropout's)
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=die_with_parent if workers > 0 else None,
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
    return optim(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


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
    """An exponential moving average of the weights and BatchNorm statistics, updated every step. Its
    decay warms up as min(ema, (1 + n) / (10 + n)) after n updates, so that early epochs and short
    runs evaluate weights that have left their initial values."""
    if not cfg.ema:
        return None

    @torch.no_grad()
    def update(averaged, current, n):
        if not torch.is_floating_point(averaged[0]):  # BatchNorm's batch counters: copied
            torch._foreach_copy_(averaged, current)
            return
        decay = torch.clamp((1 + n) / (10 + n), max=cfg.ema)
        torch._foreach_lerp_(averaged, current, 1 - decay)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


@dataclass
class Training:
    """What one run trains with, built in one place for `fit` and `trainer bench`."""

    train_loader: torch.utils.data.DataLoader
    test_loader: torch.utils.data.DataLoader
    sampler: EpochBatches
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: AveragedModel | None


def build_training(cfg: Config, model: torch.nn.Module, device: torch.device) -> Training:
    train_loader, test_loader, sampler = make_loaders(cfg, device)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, len(train_loader))
    return Training(train_loader, test_loader, sampler, optimizer, scheduler, make_ema(cfg, model))


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
    With an EMA, the averaged weights are evaluated, and end up in `model` at the end. Returns the
    test loader and the last evaluation (a run resumed after its last epoch is evaluated once)."""
    cfg = resolve(cfg, device)
    model.to(memory_format=memory_format(cfg))  # in place; the batches need no conversion (one channel)
    t = build_training(cfg, model, device)
    if state is not None:
        t.optimizer.load_state_dict(state["optimizer"])
        t.scheduler.load_state_dict(state["scheduler"])
        if t.ema is not None:
            t.ema.load_state_dict(state["ema"])
    step_model = torch.compile(model) if cfg.compile else model  # shares its parameters with `model`
    eval_model = step_model if t.ema is None else t.ema.module
    train_threads, eval_threads = compute_threads()
    last = None
    for epoch in range(start_epoch, cfg.epochs + 1):
        seed_everything(cfg.seed * 1_000 + epoch)  # dropout masks depend on (seed, epoch) only
        t.sampler.set_epoch(epoch)
        lr = t.optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        with threads(train_threads):
            desc = f"epoch {epoch}/{cfg.epochs}"
            metrics = train_one_epoch(
                step_model, t.train_loader, t.optimizer, t.scheduler, device, cfg.amp, desc, t.ema
            )
        with threads(eval_threads):
            last = evaluate(eval_model, t.test_loader, device, cfg.amp)
        metrics.update(
            {k: v for k, v in last.items() if k != "preds"}, lr=lr, epoch_seconds=time.perf_counter() - start
        )
        log.info(
            f"epoch {epoch:2d}/{cfg.epochs}  lr {lr:.5f}  train loss {metrics['train_loss']:.4f} "
            f"acc {metrics['train_acc']:.2f}%  test loss {metrics['test_loss']:.4f} "
            f"acc {metrics['test_acc']:.2f}%  ({metrics['epoch_seconds']:.1f}s)"
        )
        state = {
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(),
        }
        if t.ema is not None:
            state["ema"] = t.ema.state_dict()
        on_epoch(epoch, metrics, state)
    if last is None:  # nothing left to train: evaluate the model as the last epoch left it
        with threads(eval_threads):
            last = evaluate(eval_model, t.test_loader, device, cfg.amp)
    if t.ema is not None:
        model.load_state_dict(t.ema.module.state_dict())  # the weights that were evaluated are the ones saved
    return t.test_loader, last
