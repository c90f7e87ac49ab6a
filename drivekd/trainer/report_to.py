"""Metric loggers (`--report-to`): every metrics.jsonl record also goes to TensorBoard and/or W&B.

HF Trainer's convention: `--report-to tensorboard` (the default when the `tensorboard` package is
installed), `--report-to wandb`, a comma list of both, or `none`. The loggers are fed exactly the
record the loop appends to metrics.jsonl, flattened to scalar tags grouped by concern
(`train/loss`, `weights/ce`, `grad/cos/ce_vs_perception`, `share/perception` for `share_perception`,
`system/peak_mem_bytes`, ...: `group_of`), with the record's `step` as the global step. Only rank 0 writes
(the loop calls `report_metrics` where it writes metrics.jsonl, which is rank 0 only).

Where things go, under the run folder (--out):

    tensorboard/events.out.tfevents.*   `tensorboard --logdir runs/` shows every run side by side
    wandb/                              W&B offline run (`wandb sync runs/NAME/wandb/offline-run-*`);
                                        WANDB_MODE=online logs live instead

On resume the TensorBoard writer opens with `purge_step` = the first step it logs, so the steps a
killed run logged after its last checkpoint are dropped from the plots, as they are from
metrics.jsonl.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import uuid
import weakref
from pathlib import Path
from typing import Any, Iterable, Protocol

from drivekd.errors import ConfigError

REPORTERS = ("tensorboard", "wandb")
_INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install 'drivekd[wandb]'"}


def installed(name: str) -> bool:
    """Whether the package behind a reporter can be imported (checked without importing it)."""
    return importlib.util.find_spec(name) is not None


def default_report_to() -> str:
    """'tensorboard' when the package is installed (it is a drivekd dependency), else 'none'."""
    return "tensorboard" if installed("tensorboard") else "none"


def parse_report_to(value: str) -> tuple[str, ...]:
    """'tensorboard,wandb' -> ('tensorboard', 'wandb'); 'none' or '' -> (). Raises ConfigError on an
    unknown name or a reporter whose package is not installed."""
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    if names == ["none"] or not names:
        return ()
    out: list[str] = []
    for n in names:
        if n not in REPORTERS:
            raise ConfigError(f"--report-to: unknown reporter {n!r}; give a comma list of {', '.join(REPORTERS)}, or none")
        if not installed(n):
            raise ConfigError(f"--report-to {n} needs the {n} package ({_INSTALL[n]}), or pass --report-to none")
        if n not in out:
            out.append(n)
    return tuple(out)


# ----------------------------------------------------------------------------- records -> scalars


def _tag(key: str) -> str:
    # TensorBoard accepts [-/\w.] in tags (torch renames anything else with a log line per call);
    # the loop's cosine keys are 'ce|perception'.
    return re.sub(r"[^-/\w.]", "_", key.replace("|", "_vs_"))


# TensorBoard sections, by the top-level key of a metrics record (README, "Watching a run", explains
# each name): train/ the objective and schedule, weights/ the loss weights, grad/ the gradients and
# their projections, share/ each row's share of the update, system/ throughput and memory, eval/
# validation. (prefix of the key, section, what to strip from the key)
_GROUPS = (
    ("share_", "share/", "share_"), ("along_", "share/along_", "along_"),
    ("grad_norms", "grad/norms", "grad_norms"), ("grad_norm", "grad/norm", "grad_norm"),
    ("grad_cos", "grad/cos", "grad_cos"), ("active_share", "grad/active_share", "active_share"),
    ("projections_fired", "grad/projections_fired", "projections_fired"),
    ("weights", "weights", "weights"),
    ("samples_per_s", "system/", ""), ("tokens_per_s", "system/", ""), ("step_time_s", "system/", ""),
    ("peak_mem", "system/", ""), ("eval_", "eval/", "eval_"),
)


def group_of(key: str) -> str:
    """The tag of a top-level metrics key: `loss_ce` -> `train/loss_ce`, `grad_cos` -> `grad/cos`,
    `share_perception` -> `share/perception`, `peak_mem_bytes` -> `system/peak_mem_bytes`."""
    for prefix, section, strip in _GROUPS:
        if key.startswith(prefix):
            return section + key[len(strip):]
    return "train/" + key


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Scalar tags of one metrics record: nested dicts join with '/', lists count their items
    (`skipped`: samples skipped this step), None and strings are dropped, `step` is the x axis;
    top-level keys go to their section (`group_of`)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if not prefix and key == "step":
            continue
        if not prefix:
            key = group_of(key)
        tag = _tag(f"{prefix}{key}")
        if isinstance(value, dict):
            out.update(flatten(value, f"{tag}/"))
        elif isinstance(value, (list, tuple)):
            out[tag] = float(len(value))
        elif isinstance(value, bool):
            out[tag] = float(value)
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[tag] = float(value)
    return out


# ----------------------------------------------------------------------------- the loggers


class MetricLogger(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardLogger:
    def __init__(self, run_dir: Path, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops events at steps >= first_step written by an earlier
        # (killed) process into this folder, so a resumed run reads as one run.
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=first_step if first_step > 1 else None)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # one flush per metrics line: a killed run keeps what metrics.jsonl has

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """W&B in offline mode unless WANDB_MODE says otherwise; the run id lives in the run folder, so a
    resumed drivekd run continues the same W&B run."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        import wandb

        id_file = run_dir / "wandb" / "run-id"
        id_file.parent.mkdir(parents=True, exist_ok=True)
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12] + "\n")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "drivekd"), name=run_dir.name, id=id_file.read_text().strip(),
            dir=str(run_dir), config=config, mode=os.environ.get("WANDB_MODE", "offline"), resume="allow",
        )

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricLoggers:
    """The loggers of one run; `log(record)` takes a metrics.jsonl record."""

    def __init__(self, loggers: Iterable[MetricLogger]):
        self.loggers = list(loggers)

    @classmethod
    def open(cls, run_dir: str | Path, report_to: str, config: dict[str, Any], first_step: int = 1) -> "MetricLoggers":
        run_dir = Path(run_dir)
        made: list[MetricLogger] = []
        for name in parse_report_to(report_to):
            made.append(TensorBoardLogger(run_dir, first_step) if name == "tensorboard" else WandbLogger(run_dir, config))
        return cls(made)

    def log(self, record: dict[str, Any]) -> None:
        if self.loggers:
            scalars, step = flatten(record), int(record["step"])
            for logger in self.loggers:
                logger.log(scalars, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
        self.loggers = []


_OPEN: "weakref.WeakKeyDictionary[Any, MetricLoggers]" = weakref.WeakKeyDictionary()


def report_metrics(trainer: Any, record: dict[str, Any]) -> None:
    """Send one metrics record to the run's loggers (call where the record goes to metrics.jsonl).

    `trainer` needs `.cfg` (with `report_to`) and `.out`; its loggers open on the first record
    and close when the trainer is garbage-collected or the process exits, so the loop needs this
    one call and nothing else.
    """
    loggers = _OPEN.get(trainer)
    if loggers is None:
        cfg = trainer.cfg
        loggers = MetricLoggers.open(trainer.out, cfg.report_to, cfg.to_json(), first_step=int(record["step"]))
        _OPEN[trainer] = loggers
        weakref.finalize(trainer, loggers.close)  # also runs at interpreter exit
    loggers.log(record)


__all__ = ["MetricLoggers", "REPORTERS", "default_report_to", "flatten", "installed", "parse_report_to", "report_metrics"]
