"""`trainer sweep`: every config as a child run of one parent run, which logs mean/std per model."""

import logging
import os
import traceback

import mlflow
import numpy as np

from trainer.config import Config
from trainer.tracking import train

log = logging.getLogger("trainer")


def sweep(configs: list[Config]) -> int:
    """Each config as a child run of one parent run; a failed child is recorded and the sweep goes on.
    The parent logs, per model, mean and std over seeds and how many seeds met the target. Returns
    the number of failed children."""
    results: dict[str, list[dict]] = {}
    failed = 0
    project_run = os.environ.pop("MLFLOW_RUN_ID", None)  # under `mlflow run -e sweep`: the parent
    with mlflow.start_run(run_id=project_run, run_name=None if project_run else f"sweep-{len(configs)}-runs"):
        mlflow.log_params({"models": ",".join(dict.fromkeys(c.model for c in configs)), "runs": len(configs)})
        mlflow.log_param("seeds", ",".join(dict.fromkeys(str(c.seed) for c in configs)))
        for cfg in configs:
            try:
                summary = train(cfg)
                results.setdefault(cfg.model, []).append(summary)
            except KeyboardInterrupt:
                mlflow.end_run("KILLED")
                raise
            except Exception as e:  # the child run is already ended FAILED; keep going
                failed += 1
                log.warning(f"{cfg.model}-s{cfg.seed} failed: {type(e).__name__}: {e}")
                mlflow.log_text(traceback.format_exc(), f"failures/{cfg.model}-s{cfg.seed}.txt")
        for model, summaries in results.items():
            for key in ("best_test_acc", "last3_min_test_acc"):
                values = [s[key] for s in summaries]
                mlflow.log_metrics({f"{model}.{key}.mean": np.mean(values), f"{model}.{key}.std": np.std(values)})
            mlflow.log_metric(f"{model}.seeds_met_target", sum(s["target_met"] for s in summaries))
        mlflow.log_metric("failed_runs", failed)
    return failed
