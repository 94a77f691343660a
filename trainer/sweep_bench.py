"""`trainer bench-sweep`: the same N runs one after another (`trainer train` each, every core to one
run) and as one `trainer sweep` on a local Ray (one run per `--cpus-per-run` CPUs at a time); runs per
hour of each and their ratio. Both log into a throwaway sqlite store; the runs' own numbers don't count.
It also reports how many cores the sequential runs kept busy on average (their CPU time over their wall
time): with C cores and the same CPU time per run, no way of scheduling the runs can be more than
C / that many times faster."""

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAINER = str(Path(sys.executable).parent / "trainer")


def cpu_seconds() -> float:
    """CPU time of this process's finished children (and of the children they waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of the command."""
    cpu, start = cpu_seconds(), time.perf_counter()
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:3])} failed: {done.stderr.strip().splitlines()[-1]}")
    return time.perf_counter() - start, cpu_seconds() - cpu


def bench_sweep(model: str, runs: int, options: list[str]) -> dict:
    seeds = [str(s) for s in range(1, runs + 1)]
    with tempfile.TemporaryDirectory(prefix="mnist8k-bench-") as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "MLFLOW_EXPERIMENT_NAME": "bench"}
        env.pop("MLFLOW_RUN_ID", None)
        sequential = [timed([TRAINER, "train", "--model", model, "--seed", s, *options], env) for s in seeds]
        walls, cpus = zip(*sequential, strict=True)
        ray, _ = timed([TRAINER, "sweep", "--models", model, "--seeds", ",".join(seeds), *options], env)
    return {
        "runs": runs,
        "sequential_s": sum(walls),
        "ray_s": ray,
        "sequential_cores_busy": sum(cpus) / sum(walls),
        "cores": os.cpu_count(),
    }


def table(result: dict) -> str:
    per_hour = {k: 3600 * result["runs"] / result[f"{k}_s"] for k in ("sequential", "ray")}
    lines = [f"{'':12s}{'runs':>6s}{'wall s':>10s}{'runs/hour':>11s}"]
    for k in ("sequential", "ray"):
        lines.append(f"{k:12s}{result['runs']:6d}{result[f'{k}_s']:10.1f}{per_hour[k]:11.1f}")
    lines.append(f"ray / sequential: {per_hour['ray'] / per_hour['sequential']:.2f}")
    busy, cores = result["sequential_cores_busy"], result["cores"]
    lines.append(
        f"sequential runs kept {busy:.2f} of {cores} cores busy: at the same CPU time per run, "
        f"no schedule on {cores} cores beats {cores / busy:.2f}x"
    )
    return "\n".join(lines)
