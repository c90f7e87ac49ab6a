"""tools/gpu_check.py on the CPU (tiny students): its variants run real optimizer steps and get
its plan beside it, and the documented output format holds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Run end to end: one of each engine, T, precision path and LoRA. kahan-T6 differs from offload-T6 only
# in its TrainConfig (the precision modes' steps are tested in test_precision*.py): it is built and
# checked below, not run (its plan was the costliest row).
VARIANTS = ("sft-T6", "agp-rows-T3", "agp-gram-T6", "offload-T6", "lora-T6")


@pytest.mark.slow
def test_gpu_check_runs_on_tiny_students(tmp_path):
    out = tmp_path / "gc"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--tiny", "--out", str(out), "--steps", "2",
                           "--jobs", "1", "--variants", *VARIANTS], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    rows = result["rows"]
    assert [(r["model"], r["variant"]) for r in rows] == [(m, v) for m in ("tiny-internvl", "tiny-qwen2_5_vl") for v in VARIANTS]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["step_s"] > 0 and r["planned_tracked_gib"] > 0 and r["planned_peak_gib"] > r["planned_tracked_gib"], r
        assert r["measured_gib"] is None and "ratio" not in r  # no CUDA: memory columns n/a
        assert "plan_error" not in r, r
    by = {(r["model"], r["variant"]): r for r in rows}
    for m in ("tiny-internvl", "tiny-qwen2_5_vl"):
        assert by[(m, "sft-T6")]["engine"] == "none"
        assert by[(m, "agp-rows-T3")]["engine"] == "rows" and by[(m, "agp-gram-T6")]["engine"] == "gram"
        assert by[(m, "agp-rows-T3")]["seq_len"] < by[(m, "agp-gram-T6")]["seq_len"]  # several T
        assert by[(m, "offload-T6")]["precision"] == "bf16-offload" and by[(m, "lora-T6")]["lora"] is True
    assert set(result["autoprocessor"]) == {"internvl", "qwen2_5_vl"}
    assert {"torch", "transformers", "drivekd", "device_name"} <= set(result["environment"])
    md = (out / "gpu_check.md").read_text()
    assert "| model | variant | status | seq_len | engine | planned_tracked_gib | planned_peak_gib | measured_gib |" in md
    assert md.count("| tiny-") == len(rows)


def test_every_variant_is_a_valid_run_config(tiny_models):
    """Every variant of tools/gpu_check.py (those the test above does not run too) is a TrainConfig the
    trainer accepts, with the precision, engine and LoRA it names."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    for fam in ("internvl", "qwen2_5_vl"):
        for name, (changes, cams) in gc.VARIANTS.items():
            cfg = gc.run_config(tiny_models / f"{fam}-student", fam, changes, tiny=True)
            assert cams in (3, 6) and all(getattr(cfg, k) == v for k, v in changes.items()), (fam, name)
    assert gc.VARIANTS["kahan-T6"][0]["precision"] == "bf16-kahan"
