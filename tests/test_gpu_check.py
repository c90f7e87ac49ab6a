"""tools/gpu_check.py on the CPU (tiny students): its variants run real optimizer steps and get
its plan beside it, and the documented output format holds."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Run end to end: one of each engine, T, precision path and LoRA, on the tiny InternVL student (each row's
# dry run, in the tool's worker process, is most of the test's time; the tool's per-family part is each
# family's six-camera settings, which test_every_variant_is_a_valid_run_config builds for both families,
# and the autoprocessor check, which runs for both). kahan-T6 differs from offload-T6 only in its
# TrainConfig (the precision modes' steps are tested in test_precision*.py), and agp-gram-T6 from
# offload-T6 only in its precision: they are built and checked below, not run (offload-T6 runs the Gram engine).
VARIANTS = ("sft-T6", "agp-rows-T3", "offload-T6", "lora-T6")


def _tool(monkeypatch):
    """tools/gpu_check.py as the module `gpu_check`, importable by name: its dry-run worker processes
    (spawned) unpickle its functions from it."""
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import gpu_check

    return gpu_check


@pytest.mark.slow
def test_gpu_check_runs_on_tiny_students(tmp_path, monkeypatch):
    # its main() in this process (a subprocess would only add an interpreter start-up: the tool's own
    # dry-run worker is a real spawned process either way)
    out = tmp_path / "gc"
    _tool(monkeypatch).main(["--tiny", "--models", "internvl", "--out", str(out), "--steps", "2", "--jobs", "1", "--variants", *VARIANTS])
    result = json.loads((out / "gpu_check.json").read_text())
    rows = result["rows"]
    assert [(r["model"], r["variant"]) for r in rows] == [("tiny-internvl", v) for v in VARIANTS]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["step_s"] > 0 and r["planned_tracked_gib"] > 0 and r["planned_peak_gib"] > r["planned_tracked_gib"], r
        assert r["measured_gib"] is None and "ratio" not in r  # no CUDA: memory columns n/a
        assert "plan_error" not in r, r
    by = {r["variant"]: r for r in rows}
    assert by["sft-T6"]["engine"] == "none"
    assert by["agp-rows-T3"]["engine"] == "rows" and by["offload-T6"]["engine"] == "gram"
    assert by["agp-rows-T3"]["seq_len"] < by["offload-T6"]["seq_len"]  # several T
    assert by["offload-T6"]["precision"] == "bf16-offload" and by["lora-T6"]["lora"] is True
    assert set(result["autoprocessor"]) == {"internvl", "qwen2_5_vl"}
    assert {"torch", "transformers", "drivekd", "device_name"} <= set(result["environment"])
    md = (out / "gpu_check.md").read_text()
    assert "| model | variant | status | seq_len | engine | planned_tracked_gib | planned_peak_gib | measured_gib |" in md
    assert md.count("| tiny-") == len(rows)


def test_every_variant_is_a_valid_run_config(tiny_models, monkeypatch):
    """Every variant of tools/gpu_check.py (those the test above does not run too) is a TrainConfig the
    trainer accepts, with the precision, engine and LoRA it names."""
    gc = _tool(monkeypatch)
    for fam in ("internvl", "qwen2_5_vl"):
        for name, (changes, cams) in gc.VARIANTS.items():
            cfg = gc.run_config(tiny_models / f"{fam}-student", fam, changes, tiny=True)
            assert cams in (3, 6) and all(getattr(cfg, k) == v for k, v in changes.items()), (fam, name)
    assert gc.VARIANTS["kahan-T6"][0]["precision"] == "bf16-kahan"
    # agp-gram-T6 is offload-T6 at the default precision (the row the test above runs for the Gram engine)
    gram, offload = gc.VARIANTS["agp-gram-T6"], gc.VARIANTS["offload-T6"]
    assert gram[1] == offload[1] and {k: v for k, v in offload[0].items() if k not in ("precision", "dtype")} == gram[0]
