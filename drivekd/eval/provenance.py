"""What an evaluation was run on, recorded in report.json's `provenance`: which model (path and a
fingerprint of its files), which data (sha256), which generation, judge and deployment settings,
and which drivekd / transformers / torch. Two reports with equal provenance are the same evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from pathlib import Path
from typing import Any

# Deployment protocol (Table 1's memory / tok/s / TTFT columns): fixed, so that every report's
# figures measure the same work whatever --max-new-tokens the accuracy run used.
DEPLOY_NEW_TOKENS = 32
DEPLOY_RUNS = 5
DEPLOY_BATCH = 1
_CHUNK = 1 << 24  # 16 MiB reads


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_fingerprint(folder: str | Path) -> str:
    """sha256 over every file of a checkpoint folder (relative path, size, bytes; subfolders such as a
    LoRA run's adapter/ included), in sorted path order. It reads the whole checkpoint: ~1-2 s per GB,
    small next to generating answers with it."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        rel = p.relative_to(folder).as_posix()
        h.update(f"{rel}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def run_name(model_dir: str | Path) -> str | None:
    """The training run a checkpoint belongs to: the name of the run folder above it (the folder whose
    run.json drivekd-train wrote), with the checkpoint's own name unless it is final/. None when the
    folder is not inside a drivekd run."""
    model_dir = Path(model_dir).resolve()
    run_json = model_dir.parent / "run.json"
    if not run_json.is_file():
        return None
    try:
        out = json.loads(run_json.read_text()).get("config", {}).get("out")
    except (ValueError, AttributeError):
        out = None
    run = Path(out).name if out else model_dir.parent.name
    return run if model_dir.name == "final" else f"{run}/{model_dir.name}"


def default_model_name(model_dir: str | Path) -> str:
    """--name's default: the run's name for a run's checkpoint, else the --model folder's name."""
    return run_name(model_dir) or Path(model_dir).resolve().name


def versions() -> dict[str, str]:
    import torch
    import transformers

    import drivekd

    return {"drivekd": drivekd.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "python": platform.python_version()}


def judge_settings(judge: Any) -> dict[str, Any] | None:
    """The judge's settings as given (the key's environment variable name, never the key)."""
    return None if judge is None else dataclasses.asdict(judge)


def deploy_protocol() -> dict[str, Any]:
    return {"max_new_tokens": DEPLOY_NEW_TOKENS, "runs": DEPLOY_RUNS, "batch_size": DEPLOY_BATCH,
            "prompt": "the first evaluated sample's chat-template prompt",
            "note": f"fixed: {DEPLOY_NEW_TOKENS} new tokens per generation whatever --max-new-tokens, after one warm-up; "
                    "tok/s and TTFT are medians over the runs"}


def evaluation_provenance(model_dir: Path, data: Path, images: Path | None, *, limit: int | None, n_samples: int,
                          generation: dict[str, Any], image_settings: Any, judge: Any, deploy: bool) -> dict[str, Any]:
    """report.json's `provenance` for a generation-based evaluation."""
    settings = image_settings.given() if hasattr(image_settings, "given") else (image_settings or {})
    return {
        "model": {"path": str(model_dir.resolve()), "fingerprint": checkpoint_fingerprint(model_dir), "run": run_name(model_dir)},
        "data": {"path": str(data.resolve()), "sha256": file_sha256(data), "limit": limit, "samples": n_samples},
        "images": {"root": str(Path(images).resolve()) if images is not None else None, "settings": dict(settings)},
        "generation": generation,
        "judge": judge_settings(judge),
        "deploy": deploy_protocol() if deploy else None,
        "versions": versions(),
    }


def scoring_provenance(predictions: Path, judge: Any, data: Path | None = None, fmt: str | None = None) -> dict[str, Any]:
    """report.json's `provenance` for `drivekd-eval score` (no model: the predictions file stands for it);
    `data` is the reference file of a DriveLM / RoboSense submission, `fmt` the layout read."""
    out = {"predictions": {"path": str(predictions.resolve()), "sha256": file_sha256(predictions)},
           "judge": judge_settings(judge), "versions": versions()}
    if fmt is not None:
        out["predictions"]["format"] = fmt
    if data is not None:
        out["reference"] = {"path": str(Path(data).resolve()), "sha256": file_sha256(data)}
    return out
