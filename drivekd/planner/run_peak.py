"""The planned peak GPU memory of a run about to start: run.json's "run" -> "planned_memory" and the banner's line.

At start, drivekd-train counts the step it is about to run with the planner (`drivekd-train
--dry-run`'s count: the real step code on fake tensors, drivekd/planner/plan.py) at the run's own
shapes: micro-batch 1, the most cameras a sample of the data has, T = the longest sample the store
holds (the banner's token range; at least what the synthetic sample needs: each camera's image
tokens between two delimiters and a 200-token answer), the device's memory deciding --grad-engine
auto. The answer is `dry_run(cfg, seq_len=T, cameras=C, gpu_memory=device)["needed_bytes"]` (the step's peak, or
the validation pass's with --eval-data when larger).

A count costs seconds of CPU (about as long as --dry-run: ~2 s on the tiny students, ~10 s at 1B),
so it runs only where its answer applies: a single-process CUDA run at micro-batch 1 of a recipe the
planner counts in full, unless --no-plan-memory. Everything else says why not (a CPU run: the planner
counts a GPU step, and CPU runs are the tiny ones whose start must stay quick).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from drivekd.errors import DriveKDError
from drivekd.planner import plan as P


def why_not(cfg, device: torch.device, world: int) -> str | None:
    """Why the run's peak is not planned at start, or None when it is."""
    if not cfg.plan_memory:
        return "--no-plan-memory"
    if device.type != "cuda":
        return (f"--device {device.type}: the planner counts GPU memory (`drivekd-train --dry-run --gpu-memory SIZE` "
                "plans this run for a GPU)")
    if world > 1:
        return f"{world} processes: the planner counts one process (no DDP buckets or sharding)"
    if cfg.micro_batch != 1:
        return f"--micro-batch {cfg.micro_batch}: the planner counts one sample per micro-step"
    if P.uncounted_terms(cfg):
        return f"--recipe {cfg.recipe}: the planner counts the attention terms only"
    return None


def planned_memory(plan, tokens: dict[str, Any] | None, device: torch.device, world: int) -> dict[str, Any]:
    """{"planned": True, "peak_bytes", ...} (see count_for_run), or {"planned": False, "why": ...}."""
    why = why_not(plan.cfg, device, world)
    if why is None:
        try:
            return count_for_run(plan, tokens, torch.cuda.get_device_properties(device).total_memory)
        except DriveKDError as e:  # a config the planner cannot build; the run itself may still work
            why = f"the planner could not count this run: {e}"
    return {"planned": False, "why": why}


def count_for_run(plan, tokens: dict[str, Any] | None, gpu_memory: int) -> dict[str, Any]:
    """The planner's count of `plan`'s step (a validated RunPlan) on a GPU of `gpu_memory` bytes.
    tokens: the store's token range ({"max": T, ...}) or None (T then is the cameras' image tokens + 264)."""
    cfg = plan.cfg
    student = Path(cfg.student)
    family, L = P.model_depth(student)
    config = P.student_config(student)
    cameras = max((len(s.images) for s in plan.samples), default=0)
    per, _ = P.camera_tokens(family, student, cfg.image_settings)
    need = cameras * (per + 2) + P.ANSWER_TOKENS + 8  # the synthetic sample's minimum (planner/plan.py shapes_for)
    seq_len = max(tokens["max"], need) if tokens else None
    shapes = P.shapes_for(family, config, student, cameras, seq_len, cfg.image_settings)
    teacher_L = max((i.num_teacher_layers for i in plan.role_infos.values()), default=None)
    c = P.count_at_depth(cfg, L, family, teacher_L, shapes, config, device_memory=gpu_memory)
    peak = c.peak + P.margin_bytes(c.peak)
    ev = sum(c.phases.get("eval", {}).values())  # --eval-data: the validation pass, judged with the step (dry run's needed_bytes)
    peak = max(peak, ev + P.margin_bytes(ev) if ev else 0)
    return {"planned": True, "peak_bytes": peak, "tracked_peak_bytes": c.peak, "host_peak_bytes": c.host_peak,
            "gpu_memory_bytes": gpu_memory, "fits": peak <= gpu_memory, "seq_len": shapes.seq_len, "cameras": cameras,
            "seq_len_from": "the longest stored sample" if tokens else "the cameras' image tokens + 264 (no stored token ids)",
            "grad_engine": c.engine or "none"}


def describe(m: dict[str, Any] | None) -> str:
    """The banner's line."""
    if m is None:
        return "not planned"
    if not m["planned"]:
        return f"not planned ({m['why']})"
    gib = lambda b: f"{b / P.GiB:.2f} GiB"  # noqa: E731
    host = f", host {gib(m['host_peak_bytes'])}" if m["host_peak_bytes"] else ""
    verdict = "fits" if m["fits"] else "does NOT fit"
    return (f"{gib(m['peak_bytes'])} of {gib(m['gpu_memory_bytes'])} ({verdict}; T {m['seq_len']}, {m['cameras']} camera(s), "
            f"as drivekd-train --dry-run counts it{host})")


__all__ = ["count_for_run", "describe", "planned_memory", "why_not"]
