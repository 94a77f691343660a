"""`trainer bench`: our pipeline against the compute floor and the write-ups' plain loop, in one run.

1. floor: forward + backward + step on in-memory tensors, no augmentation, in PyTorch's default
   NCHW layout (and `floor_nhwc`, the same in our default channels_last layout, and `floor_train`, the
   same in our layout on our training threads: our pipeline's eager compute without the data);
2. plain: torchvision RandomAffine on PIL images + ToTensor + Normalize, a default DataLoader and a
   `.item()` every step (the write-ups' loop), at the same augmentation strength as ours;
3. ours: one training epoch exactly as `trainer train` runs it, then its evaluation (with --compile or
   --amp, ours is compiled or bf16; every other row stays eager float32: the floor is eager compute).
Same model, batch size and device for all (on a GPU every row's tensors and model are on it, and each
timing waits for the device to finish). floor and plain run on torch's default threads (every core); ours
splits them as `trainer train` does (`engine.compute_threads`). Each is warmed up, then all are repeated in
turn (round robin, so that the machine's slow spells hit every row alike); min and median reported.
"""

import dataclasses
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torchvision import transforms

import models
from trainer import engine
from trainer.augment import ROTATE, SCALE, SHIFT
from trainer.data import MNIST_MEAN, MNIST_STD, load_mnist


def elapsed(fn, device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def floor(cfg, model, batches: int, device):
    """Eager compute in PyTorch's default (NCHW) layout: the floor the ratios are taken against."""
    x = torch.randn(cfg.batch_size, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (cfg.batch_size,), device=device)
    optimizer = engine.make_optimizer(cfg, model)

    def run():
        for _ in range(batches):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return run, batches * cfg.batch_size


def floor_nhwc(cfg, model, batches: int, device):
    """The same compute in our default channels_last layout."""
    return floor(cfg, model.to(memory_format=torch.channels_last), batches, device)


def floor_train(cfg, model, batches: int, device):
    """The same compute in our layout on the threads `trainer train` trains on: eager ours without the data."""
    run, images = floor(cfg, model.to(memory_format=engine.memory_format(cfg)), batches, device)
    train_threads, _ = engine.compute_threads()

    def on_train_threads():
        with engine.threads(train_threads):
            run()

    return on_train_threads, images


class PILDataset(torch.utils.data.Dataset):
    """The write-ups' dataset: a PIL image per sample through torchvision transforms."""

    def __init__(self, images, labels, transform):
        from PIL import Image

        self.images = [Image.fromarray(im) for im in images.numpy()]
        self.labels, self.transform = labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def plain(cfg, model, batches: int, device):
    """torchvision affine with the parameters of our `standard` pipeline."""
    transform = transforms.Compose(
        [
            transforms.RandomAffine(degrees=ROTATE, translate=(SHIFT, SHIFT), scale=(1 - SCALE, 1 + SCALE)),
            transforms.ToTensor(),
            transforms.Normalize((MNIST_MEAN,), (MNIST_STD,)),
        ]
    )
    images, labels = load_mnist(cfg.data_dir, train=True, subset=batches * cfg.batch_size)
    loader = torch.utils.data.DataLoader(PILDataset(images, labels, transform), batch_size=cfg.batch_size, shuffle=True)
    optimizer = engine.make_optimizer(cfg, model)

    def run():
        model.train()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()

    return run, len(labels)


def ours(cfg, model, device):
    t = engine.build_training(cfg, model, device)
    eval_times = []
    train_threads, eval_threads = engine.compute_threads()

    def run():
        with engine.threads(train_threads):
            engine.train_one_epoch(model, t.train_loader, t.optimizer, t.scheduler, device, cfg.amp, "bench", t.ema)
        start = time.perf_counter()
        with engine.threads(eval_threads):
            engine.evaluate(model, t.test_loader, device, cfg.amp)
        eval_times.append(time.perf_counter() - start)  # evaluate ends in .item(): the device is done

    return run, t.sampler.n, eval_times


def bench(cfg: engine.Config, batches: int, repeats: int) -> dict:
    device = engine.resolve_device(cfg.device)
    cfg = engine.resolve(cfg, device)
    engine.check_compiler(cfg)
    engine.seed_everything(cfg.seed)
    runs, images = {}, {}
    makers = {"floor": floor, "plain": plain} | ({"floor_nhwc": floor_nhwc} if cfg.channels_last else {})
    makers["floor_train"] = floor_train
    for name, make in makers.items():
        model = models.get_model(cfg.model, cfg.dropout).to(device).train()
        runs[name], images[name] = make(cfg, model, batches, device)
    model = models.get_model(cfg.model, cfg.dropout).to(device, memory_format=engine.memory_format(cfg))
    ours_cfg = dataclasses.replace(cfg, epochs=1 + repeats)  # a schedule that lasts the warm-up and the repeats
    runs["ours"], images["ours"], eval_times = ours(ours_cfg, torch.compile(model) if cfg.compile else model, device)
    for run in runs.values():
        run()  # warm-up (ours: starts the workers and, under --compile, compiles)
    eval_times.clear()
    times = {name: [] for name in runs}
    for _ in range(repeats):  # round robin: a slow spell of the machine hits every row alike
        for name, run in runs.items():
            times[name].append(elapsed(run, device))
    times["ours"] = [t - e for t, e in zip(times["ours"], eval_times, strict=True)]  # training only
    rows = {}
    for name, row_times in times.items():
        rows[name] = {"images": images[name], "min_s": min(row_times), "median_s": statistics.median(row_times)}
        rows[name]["images_per_s"] = images[name] / rows[name]["median_s"]
        rows[name]["best_images_per_s"] = images[name] / rows[name]["min_s"]
    return {
        "model": cfg.model,
        "batch_size": cfg.batch_size,
        "augment": cfg.augment,
        "device": str(device),
        "channels_last": cfg.channels_last,
        "compile": cfg.compile,  # ours only: the floors and plain are eager float32
        "amp": cfg.amp,  # ours only, as compile
        "threads": torch.get_num_threads(),  # floor and plain
        "ours_threads": dict(zip(("train", "eval"), engine.compute_threads(), strict=True)),
        "workers": engine.default_workers() if cfg.workers is None else cfg.workers,
        "repeats": repeats,
        "rows": rows,
        **{f"ours_over_{name}": rows["ours"]["images_per_s"] / rows[name]["images_per_s"] for name in makers},
        "eval_share_of_epoch": statistics.median(e / (t + e) for e, t in zip(eval_times, times["ours"], strict=True)),
        "peak_rss_mb": engine.peak_rss_mb(),
    }


def table(result: dict) -> str:
    lines = [
        f"model {result['model']}, batch {result['batch_size']}, augment {result['augment']}, "
        f"device {result['device']}, channels_last {result['channels_last']}, compile {result['compile']}, "
        f"amp {result['amp']}, {result['repeats']} repeats",
        f"threads: floor and plain {result['threads']}; ours {result['ours_threads']['train']} to train "
        f"(+ {result['workers']} augmentation workers), {result['ours_threads']['eval']} to evaluate",
        f"{'':12s} {'images':>8s} {'img/s (median)':>15s} {'img/s (best)':>13s}",
    ]
    for name, row in result["rows"].items():
        lines.append(f"{name:12s} {row['images']:>8d} {row['images_per_s']:>15,.0f} {row['best_images_per_s']:>13,.0f}")
    lines += [
        "   ".join(f"ours / {name}: {result[f'ours_over_{name}']:.2f}" for name in result["rows"] if name != "ours"),
        f"evaluation: {100 * result['eval_share_of_epoch']:.1f}% of the epoch   "
        f"peak RSS: {result['peak_rss_mb']:.0f} MB",
    ]
    return "\n".join(lines)


def write_json(result: dict, path) -> None:
    from trainer.files import atomic_write

    atomic_write(path, json.dumps(result, indent=2).encode())
