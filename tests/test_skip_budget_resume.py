"""--max-skip-share holds for the whole run: a resumed run continues the skip count its checkpoint
recorded instead of starting its budget at zero (drivekd/trainer/loop.py, Trainer._skips)."""

import json
from dataclasses import replace

import pytest
import torch

from drivekd.errors import DriveKDError
from drivekd.store.memory import InMemoryTargets
from drivekd.store.targets import SampleTargets
from drivekd.trainer import loop
from drivekd.trainer.checkpoint import STATE_JSON, list_checkpoints, read_meta
from drivekd.trainer.settings import TrainConfig
from drivekd.trainer.loop import train
from online_targets import TEACHER_LAYERS

pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(Exception):
    """Stands for a kill right after a step checkpoint was written."""


def _poisoned(targets, samples, sid):
    """The stored targets with sample `sid`'s perception map NaN: its loss is non-finite every time."""
    table = {r: {s.id: targets.get(r, s.id) for s in samples[:2]} for r in TEACHER_LAYERS}
    t = table["perception"][sid]
    table["perception"][sid] = SampleTargets(t.sample_id, t.fingerprint, t.vision, t.text, {0: torch.full_like(t.maps[0], float("nan"))})
    return InMemoryTargets({r: targets.role_info(r) for r in TEACHER_LAYERS}, table)


@pytest.fixture
def run(tiny_models, demo_data, samples, targets, tmp_path):
    """Two samples, one poisoned; 4 steps of one micro-batch = 2 epochs, so the poisoned sample is
    skipped once per epoch: twice in the run, once in each half. --max-skip-share 0.25 of 4
    micro-batches allows 1 skip: the run must stop at its second skip, however it was started."""
    data = tmp_path / "two.json"
    data.write_text(json.dumps(json.loads((demo_data / "train.json").read_text())[:2]))
    cfg = TrainConfig(student=tiny_models / "internvl-student", data=data, images=demo_data, out=tmp_path / "run",
                      num_workers=0, progress=False, max_steps=4, grad_accum=1, micro_batch=1, save_every=1,
                      dynamic_weights=False, warmup_ratio=0.0, skip_nonfinite=True, max_skip_share=0.25)
    return cfg, _poisoned(targets, samples, samples[0].id), samples[0].id


def _kill_after_step(monkeypatch, name):
    save = loop.Trainer._save

    def save_then_die(self, n):
        save(self, n)
        if n == name:
            raise Killed(n)

    monkeypatch.setattr(loop.Trainer, "_save", save_then_die)


def test_a_resumed_run_continues_the_skip_count(run, monkeypatch):
    cfg, bad, sid = run
    # The run in one go stops at its second skip (step 3 or 4, by the data order).
    with pytest.raises(DriveKDError, match=rf"skipped 2 micro-batch\(es\) by step [34], more than --max-skip-share 0.25 "
                                            rf"of the run's 4 \(1 allowed\): {sid}") as whole:
        train(replace(cfg, out=cfg.out.parent / "whole"), bad)
    # The same run killed after step 2 (epoch 1: one skip, within the budget) ...
    with monkeypatch.context() as m:
        _kill_after_step(m, "step-000002")
        with pytest.raises(Killed):
            train(cfg, bad)
    assert read_meta(cfg.out / "step-000002")["skips"] == {"micro": [1], "ids": [[sid]]}
    # ... and resumed: its second skip exceeds the run's budget as it did in one go (the old code
    # counted from zero again and finished the run).
    with pytest.raises(DriveKDError) as resumed:
        train(replace(cfg, resume=True), bad)
    assert str(resumed.value) == str(whole.value)
    assert not (cfg.out / "final").exists()


def test_a_checkpoint_without_the_count_resumes_counting_from_zero(run, monkeypatch):
    """A checkpoint of an older drivekd records no count: the resume starts its budget at zero."""
    cfg, bad, sid = run
    with monkeypatch.context() as m:
        _kill_after_step(m, "step-000002")
        with pytest.raises(Killed):
            train(cfg, bad)
    for _, ck in list_checkpoints(cfg.out):
        meta = json.loads((ck / STATE_JSON).read_text())
        del meta["skips"]
        (ck / STATE_JSON).write_text(json.dumps(meta))
    res = train(replace(cfg, resume=True), bad)
    assert res.steps == 4 and sum(len(r["skipped"]) for r in res.metrics) == 1
    assert (cfg.out / "final").is_dir()
