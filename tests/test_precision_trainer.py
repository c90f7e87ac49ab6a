"""--precision through the trainer: bf16 weights + BF16AdamW train, checkpoint and resume bit-exactly
with both gradient engines, and keep the fp32-master run's updates where pure bf16 loses them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drivekd.errors import ConfigError
from drivekd.trainer.checkpoint import load_state
from drivekd.trainer.loop import train
from drivekd.trainer.settings import TrainConfig


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tiny_models, demo_data, out, **kw):
    base = dict(student=tiny_models / "internvl-student", data=demo_data / "train.json", out=out, num_workers=0,
                progress=False, max_steps=2, grad_accum=1, micro_batch=1, save_every=0, dynamic_weights=False,
                warmup_ratio=0.0, report_to="none")
    base.update(kw)
    return TrainConfig(**base)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("precision,engine", [("bf16-offload", "gram"), ("bf16-kahan", "rows"),
                                              ("bf16-stochastic", "gram")])
def test_trains_and_resumes_bit_exactly(tiny_models, demo_data, targets, tmp_path, precision, engine):
    """2 steps with a checkpoint after each; resuming from step 1 gives the same step 2 to the bit:
    the Kahan compensation, the offloaded fp32 masters and their AdamW state, and the stochastic
    rounding's generator all round-trip through the checkpoint (one step before it and one after:
    what a longer run repeats; was 4 steps, measured 20 -> 10 CPU s for the three cases)."""
    kw = dict(max_steps=2, save_every=1, grad_accum=2, micro_batch=1, lr=1e-3, dynamic_weights=True,
              precision=precision, grad_engine=engine)
    full = train(_cfg(tiny_models, demo_data, tmp_path / "full", **kw), targets)
    assert len(full.losses) == 2 and all(math.isfinite(x) for x in full.losses)
    w0 = _weights(tiny_models / "internvl-student")
    w = _weights(tmp_path / "full" / "final")
    assert {t.dtype for t in w.values()} == {torch.bfloat16}  # the run kept bf16 weights
    assert any(not torch.equal(w[k].float(), w0[k].float()) for k in w)  # and trained them
    state = load_state(tmp_path / "full" / "step-000001")["optimizer"]
    assert state["mode"] == precision.removeprefix("bf16-")
    if precision == "bf16-offload":
        assert state["masters"][0][0].dtype == torch.float32 and state["inner"]["state"]
    else:
        st = next(iter(state["state"].values()))
        assert st["exp_avg"].dtype == torch.bfloat16
        assert ("comp" in st) == (precision == "bf16-kahan")

    resumed = train(_cfg(tiny_models, demo_data, tmp_path / "resumed", resume_from=tmp_path / "full" / "step-000001", **kw),
                    targets)
    assert resumed.losses == full.losses[1:]
    b = _weights(tmp_path / "resumed" / "final")
    for k in w:
        assert torch.equal(w[k], b[k]), k


def test_precision_is_a_numbers_changing_resume_key(tiny_models, demo_data, targets, tmp_path):
    kw = dict(max_steps=2, save_every=1, lr=1e-3)
    train(_cfg(tiny_models, demo_data, tmp_path / "run", precision="bf16-kahan", **kw), targets)
    with pytest.raises(ConfigError, match="--precision"):
        train(_cfg(tiny_models, demo_data, tmp_path / "other", resume_from=tmp_path / "run" / "step-000001", **kw), targets)
    with pytest.raises(ConfigError, match="--dtype"):
        TrainConfig(precision="bf16-offload", dtype="float32")


# 20 steps: the bf16 modes land at 0.107 of the fp32 run's movement (tolerance 0.15), pure bf16 at 0.71
# (measured; at 12 steps the modes sit at 0.143, too near the tolerance).
STEPS, LR = 20, 5e-5


@pytest.fixture(scope="module")
def short_runs(tiny_models, demo_data, tmp_path_factory):
    """STEPS optimizer steps of plain fine-tuning at lr 5e-5 per precision, through train()."""
    out = {}
    for precision in ("fp32", "bf16-offload", "bf16-kahan", "bf16-pure"):
        d = tmp_path_factory.mktemp(precision)
        res = train(_cfg(tiny_models, demo_data, d, recipe="sft", max_steps=STEPS, lr=LR, min_lr_ratio=1.0,
                         dtype="bfloat16", precision=precision))
        w = _weights(d / "final")
        out[precision] = (torch.cat([w[k].float().reshape(-1) for k in sorted(w)]), res.losses)
    return out


@pytest.mark.slow
def test_bf16_modes_track_the_fp32_master_run_and_pure_bf16_does_not(tiny_models, short_runs):
    """Trainer-level version of tests/test_precision.py's 200-step check (which runs the optimizer
    alone on a tiny LM): distance of the final weights to the fp32-master run's, relative to how
    far that run moved them. Stated tolerance: < 15% for offload and kahan (the bf16 forward and
    weights' own rounding sets the floor); pure bf16 drops most lr-5e-5 updates and lands > 3x
    further."""
    w0 = _weights(tiny_models / "internvl-student")
    start = torch.cat([w0[k].float().reshape(-1) for k in sorted(w0)])
    ref, ref_losses = short_runs["fp32"]
    moved = float((ref - start).norm())
    dist = {m: float((short_runs[m][0] - ref).norm()) / moved for m in ("bf16-offload", "bf16-kahan", "bf16-pure")}
    print("weight distance / fp32 movement:", dist)
    for m in ("bf16-offload", "bf16-kahan"):
        assert dist[m] < 0.15, dist
    assert dist["bf16-pure"] > 3 * max(dist["bf16-offload"], dist["bf16-kahan"]), dist
