"""Run checkpoints: RUN/step-NNNNNN/ and RUN/final/, valid only once complete.

A checkpoint folder holds

    model.safetensors, config.json, ...     the student (save_pretrained, safetensors); a LoRA run's
                                           step checkpoints: adapter_model.safetensors and
                                           adapter_config.json only, its final/: the merged
                                           model plus adapter/ (drivekd/trainer/trainable.py)
    processor / tokenizer files            the family's processor (save_pretrained), naming the
                                           transformers class (InternVLProcessor, ...), not drivekd's
                                           video-free stand-in, so AutoProcessor rebuilds it
    trainer_state.pt                       step checkpoints only: optimizer, scheduler, re-weighting,
                                           RNG states: tensors and plain containers only, read with
                                           weights_only=True
    trainer_state.json                     step, data position, world size, the resolved config,
                                           --skip-nonfinite's count per rank (a resume continues it)
    COMPLETE                               written last

A --fsdp run's step checkpoints hold no model files: sharded/ is a torch.distributed.checkpoint
folder (each rank writes its shards of the weights and of AdamW's state, rank 0 the metadata), beside
trainer_state.pt/.json and COMPLETE (`save_sharded`); the run resumes on the same number of ranks
(the data stream depends on it) and loads the student's architecture from --student. Its final/ is
consolidated: the full weights gathered to rank 0 and written in the plain from_pretrained layout.

It is written into RUN/.tmp-<name>-<pid>/ and renamed into place after COMPLETE exists, so a
kill at any moment leaves either the previous checkpoints or a complete new one (plus a .tmp
folder that the next run removes). Only COMPLETE folders are ever read.

final/ (and best/, the best validated step under --save-best) is a drop-in checkpoint: `AutoProcessor`
and `AutoModelForImageTextToText.from_pretrained` load it as they load the student it came from. It holds no optimizer state (twice the weights'
size under AdamW); a run continues from its step checkpoints, never from final/.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from drivekd.distributed import fault_hook
from drivekd.errors import DriveKDError
from drivekd.families.processors import save_processor

MARKER = "COMPLETE"
FINAL = "final"
BEST = "best"  # --save-best: the best validated step, in final/'s layout (drivekd/trainer/validation.py)
DROP_IN = (FINAL, BEST)  # checkpoints without optimizer state, loadable as the student is
STATE_PT = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d{6,})$")


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def list_checkpoints(run: str | Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints of a run, oldest first."""
    run = Path(run)
    out = []
    if run.is_dir():
        for p in run.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir() and is_complete(p):
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run: str | Path) -> Path | None:
    cks = list_checkpoints(run)
    return cks[-1][1] if cks else None


def clean_partial(run: str | Path) -> None:
    """Remove leftovers of interrupted saves (.tmp-* folders, step folders without COMPLETE)."""
    run = Path(run)
    if not run.is_dir():
        return
    for p in run.iterdir():
        if p.is_dir() and (p.name.startswith(".tmp-") or p.name.startswith(".old-") or (_STEP_RE.match(p.name) and not is_complete(p))):
            shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """Every RNG the process might use, as tensors / plain lists (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_py_state(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state(s) -> tuple:
    # random.getstate() is (version, tuple of 625 ints, gauss_next); lists after a round trip.
    version, internal, gauss = s
    return (version, tuple(internal), gauss)


@contextlib.contextmanager
def quiet_hf_progress():
    """transformers' own bars ("Writing model shards") off while a checkpoint is written: drawn in
    the middle of drivekd-train's bar they break it into fragments (`[A` in logs)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def save_checkpoint(
    run: Path,
    name: str,
    model,
    processor,
    state: dict[str, Any],
    meta: dict[str, Any],
    write_model=None,
    weights=None,
) -> Path:
    """Write a complete checkpoint RUN/<name>/ atomically. `state` goes to trainer_state.pt (tensors
    and plain containers; not for final/ or best/, which resume nothing), `meta` to trainer_state.json. Refuses to write non-finite weights.
    `write_model(folder)` writes the student instead of `model.save_pretrained` (a LoRA student:
    drivekd.trainer.trainable.model_writer). `weights`: the (name, tensor) pairs checked for finiteness
    instead of the model's parameters (a --fsdp final/: the gathered full weights)."""
    bad = [n for n, p in (weights if weights is not None else model.named_parameters()) if not torch.isfinite(p).all()]
    if bad:
        raise DriveKDError(f"refusing to checkpoint {name}: non-finite weights in {', '.join(bad[:5])}")
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        with quiet_hf_progress():
            if write_model is not None:
                write_model(tmp)
            else:
                model.save_pretrained(tmp, safe_serialization=True)
            save_processor(processor, tmp)
        if name not in DROP_IN:
            torch.save(state, tmp / STATE_PT)
        (tmp / STATE_JSON).write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2, sort_keys=True) + "\n")
        _fsync_dir_files(tmp)
        (tmp / MARKER).write_text("ok\n")
    except Exception as e:
        # A full disk surfaces as OSError (json, processor files), SafetensorError ("I/O error: No
        # space left on device") or torch.save's RuntimeError ("unexpected pos ..."): whichever,
        # nothing of this save is kept and the previous checkpoint is intact.
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_io_error(e):
            raise
        raise save_error(e, run, name, model, state if name not in DROP_IN else {}) from None
    return _publish(tmp, run, name)


def _publish(tmp: Path, run: Path, name: str) -> Path:
    """Rename a complete temporary folder into RUN/<name> (replacing one of that name)."""
    final = run / name
    if final.exists():
        # Replacing a checkpoint of the same name (a run resumed before it): move the old one
        # aside first so that there is always one complete copy on disk.
        old = run / f".old-{name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    return final


def _state_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    return 0


_IO_WORDS = ("unexpected pos", "No space left", "os error", "I/O error", "file write failed", "Disk quota")


def _is_io_error(e: Exception) -> bool:
    return isinstance(e, OSError) or any(w in str(e) for w in _IO_WORDS)


def save_error(e: Exception, run: Path, name: str, model, state: dict) -> DriveKDError:
    """One clear error for a failed checkpoint write: the folder, and for a full disk (or a write
    torch could not finish) the free space one checkpoint needs."""
    need = sum(p.numel() * p.element_size() for p in model.state_dict().values()) + _state_bytes(state)
    free = shutil.disk_usage(run).free
    errno_ = getattr(e, "errno", None)
    import errno as _errno

    full = errno_ in (_errno.ENOSPC, _errno.EDQUOT) or "No space left" in str(e) or (not isinstance(e, OSError) and free < need)
    what = (f"disk full: {free / 2**20:.1f} MiB free on that file system, a checkpoint needs about {need / 2**20:.1f} MiB"
            if full else f"{getattr(e, 'strerror', None) or e}")
    return DriveKDError(f"could not save checkpoint {name} in {run} ({what}); nothing of it was kept and the previous checkpoints "
                        "are intact. Free space (or lower --keep-last), then continue with --resume")


def _fsync_dir_files(d: Path) -> None:
    for f in d.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def prune(run: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step checkpoints."""
    for _, p in list_checkpoints(run)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def read_meta(ckpt: str | Path) -> dict[str, Any]:
    ckpt = Path(ckpt)
    if not is_complete(ckpt):
        raise DriveKDError(f"{ckpt} is not a complete checkpoint (no {MARKER} marker)")
    meta = json.loads((ckpt / STATE_JSON).read_text())
    if isinstance(meta.get("config"), dict):  # an older drivekd's names and changed defaults, in today's terms
        from drivekd.trainer.settings import recorded_settings

        meta["config"] = recorded_settings(meta["config"])
    return meta


def load_state(ckpt: str | Path) -> dict[str, Any]:
    """trainer_state.pt, read with weights_only=True (tensors and plain containers only)."""
    path = Path(ckpt) / STATE_PT
    if not path.is_file():
        raise DriveKDError(f"{ckpt} holds no optimizer/trainer state ({STATE_PT}): a run's final/ keeps the model only. "
                           "Continue from one of its step-NNNNNN checkpoints (--resume, or --resume-from RUN/step-NNNNNN)")
    return torch.load(path, map_location="cpu", weights_only=True)


SHARDED = "sharded"
_SAVE_FAULT: dict[str, Any] = {}


def save_sharded(run: Path, name: str, model, optimizer, state: dict[str, Any], meta: dict[str, Any], dist) -> Path | None:
    """A --fsdp step checkpoint, called on every rank: RUN/.tmp-<name>-fsdp/sharded/ by
    torch.distributed.checkpoint (each rank its shards of the weights and optimizer state), then
    rank 0 adds trainer_state.pt / .json (scheduler, RNG, re-weighting: `state` without "optimizer"),
    COMPLETE, and renames the folder into place. A kill -9 at any point leaves the previous
    checkpoints as they were (the .tmp folder is removed by the next run)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    run = Path(run)
    tmp = run / f".tmp-{name}-fsdp"  # one name on every rank (a pid differs per rank)
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.to_local()).all()]
    if dist.any(bool(bad)):
        raise DriveKDError(f"refusing to checkpoint {name}: non-finite weights{' in ' + ', '.join(bad[:5]) if bad else ' on another rank'}")
    if dist.main:
        run.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp / SHARDED))
    out = None
    if dist.main:
        if "hook" not in _SAVE_FAULT:  # tests: DRIVEKD_FAULT_KILL_AFTER=N, a kill -9 inside this process's Nth save
            _SAVE_FAULT["hook"] = fault_hook()
        if _SAVE_FAULT["hook"] is not None:
            _SAVE_FAULT["hook"]()
        torch.save({k: v for k, v in state.items() if k != "optimizer"}, tmp / STATE_PT)
        (tmp / STATE_JSON).write_text(json.dumps({"format_version": FORMAT_VERSION, "fsdp": True, **meta}, indent=2,
                                                 sort_keys=True) + "\n")
        _fsync_dir_files(tmp)
        (tmp / MARKER).write_text("ok\n")
        out = _publish(tmp, run, name)
    dist.barrier()
    return out


def is_sharded(ckpt: str | Path) -> bool:
    return (Path(ckpt) / SHARDED).is_dir()


def load_sharded(ckpt: str | Path, model, optimizer) -> None:
    """Every rank reads its shards of a `save_sharded` checkpoint into the sharded model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not is_sharded(ckpt):
        raise DriveKDError(f"{ckpt} is not a --fsdp checkpoint (no {SHARDED}/ folder): it was written without --fsdp; "
                           "resume it without --fsdp")
    # get_state_dict builds a fresh optimizer's state (to have tensors to load into) only when no
    # parameter has a .grad; the --fsdp .grads are always views of the step's gradient buffer, so
    # they are set aside meanwhile (else nothing of the optimizer state would load).
    params = list(model.parameters())
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        msd, osd = get_state_dict(model, optimizer)
        sd = {"model": msd, "optimizer": osd}
        dcp.load(sd, checkpoint_id=str(Path(ckpt) / SHARDED))
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
    finally:
        for p, g in zip(params, saved):
            p.grad = g
