"""Ablations: many drivekd-train runs from one store, each evaluated, gathered into one Table-4 report.

    load_ablation(path)     the ablation file (config.py), every run's TrainConfig checked up front
    run_ablation(abl)       train + evaluate job by job, resumable (runner.py)
    write_ablation_report   report.{json,md,png} from the eval reports (report.py)

The CLI is `drivekd-ablate` (drivekd/cli/ablate.py).
"""

from drivekd.ablate.config import Ablation, Job, RunSpec, load_ablation
from drivekd.ablate.report import table4, write_ablation_report
from drivekd.ablate.runner import AblationResult, run_ablation

__all__ = ["Ablation", "AblationResult", "Job", "RunSpec", "load_ablation", "run_ablation", "table4", "write_ablation_report"]
