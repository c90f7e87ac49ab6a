"""The planned validation pass (--eval-data, --eval-generate; drivekd/planner/eval_peak.py).

On a shallow copy of the tiny InternVL student (2 text layers, 1 vision layer: the count's cost is
its ops): the fake count of the validation pass equals the same pass on real tensors, category by
category (forward with capture and targets, and generation); the KV cache at generation's peak is
the cache of prompt + --eval-max-new-tokens tokens; the training state is resident during it; the
dry run reports the pass and judges the larger of the two peaks; without --eval-data nothing of it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from drivekd.planner import plan as P
from drivekd.planner.eval_peak import EvalSpec
from drivekd.trainer.plan import student_depth
from drivekd.trainer.settings import TrainConfig
from conftest import config_copy

T, CAMERAS, NEW = 320, 1, 6


@pytest.fixture(scope="module")
def shallow(tiny_models, tmp_path_factory) -> Path:
    return config_copy(tiny_models / "internvl-student", tmp_path_factory.mktemp("eval") / "internvl", text=2, vision=1)


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("evaldata") / "eval.json"
    f.write_text("[]")  # the dry run never reads it (it plans the run's shapes, not the file's samples)
    return f


def _count(student: Path, fake: bool, spec: EvalSpec | None) -> P.Counted:
    # one backward (no per-loss rows): the step is not what is tested here, only the state it leaves
    cfg = TrainConfig(student=student, recipe="multi", projection="none", dynamic_weights=False, dtype="float32")
    family, L = student_depth(student)
    config = P.student_config(student)
    shapes = P.shapes_for(family, config, student, CAMERAS, T, cfg.image_settings)
    return P.count_step(cfg, P.dry_plan(cfg, L, family), shapes, config, fake=fake, evaluate=spec)


@pytest.fixture(scope="module")
def counts(shallow):
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    spec = EvalSpec(terms=True, new_tokens=NEW)
    try:
        yield _count(shallow, True, spec), _count(shallow, False, spec)
    finally:
        torch.set_num_threads(n)


def test_planned_eval_pass_equals_the_real_pass(counts):
    """Same validation code (validation.batch_losses, model.generate), same tracker: the fake count
    equals the real tensors' exactly (tolerance 0), for the pass and for its generation alone."""
    fake, real = counts
    assert fake.phases["eval"] == real.phases["eval"]
    assert fake.phases["eval_generate"] == real.phases["eval_generate"]
    assert fake.phases["eval_kv_cache"] == real.phases["eval_kv_cache"]
    assert fake.phases["eval"]["maps"] > 0 and fake.phases["eval"]["teacher_targets"] > 0  # the terms' forward ran
    assert fake.phases["eval_generate"]["kv_cache"] > 0


def test_training_state_is_resident_during_validation(counts):
    fake, _ = counts
    step, ev = fake.phases["update"], fake.phases["eval"]
    for k in ("weights", "gradients", "optimizer_state"):
        assert ev[k] == step[k] > 0, k
    assert ev["activations"] < fake.phases["micro"]["activations"]  # no_grad: nothing new saved for backward


def test_kv_cache_is_prompt_plus_new_tokens(shallow, counts):
    """The whole cache: per text layer, K and V of (1, kv_heads, prompt + new - 1, head_dim) in fp32 (this
    run's compute dtype); during a step one layer's old and grown K or V are both alive (torch.cat)."""
    fake, _ = counts
    tc = P.student_config(shallow).text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    per_token_layer = 2 * tc.num_key_value_heads * head_dim * 4  # K and V, fp32
    tokens = T - P.ANSWER_TOKENS + NEW - 1  # the last generated token is never fed back
    cache = tc.num_hidden_layers * per_token_layer * tokens
    assert fake.phases["eval_kv_cache"]["kv_cache"] == cache
    # at generation's peak (here the prefill's temporaries) at most the whole cache and one layer's grown copy
    assert 0 < fake.phases["eval_generate"]["kv_cache"] <= cache + per_token_layer * tokens


def test_dry_run_reports_the_pass_and_judges_the_larger_peak(shallow, eval_file, monkeypatch, one_thread):
    base = dict(student=shallow, recipe="multi", projection="none", dynamic_weights=False, dtype="float32")
    plain = P.dry_run(TrainConfig(**base), seq_len=T, cameras=CAMERAS, gpu_memory=2**30, suggest=False)
    assert "eval_peak_bytes" not in plain and "eval" not in plain["phases"]  # no --eval-data: nothing of it
    assert plain["needed_bytes"] == plain["peak_bytes"]
    assert "validation pass" not in P.format_report(plain)

    cfg = TrainConfig(**base, eval_data=eval_file, eval_generate=True, eval_max_new_tokens=NEW)
    real_count = P.count_at_depth

    def eval_heavier(*a, **k):
        # the validation pass made 64 MiB heavier than the step: the verdict must follow it
        c = real_count(*a, **k)
        c.phases["eval"] = {**c.phases["eval"], "temporaries": c.phases["eval"]["temporaries"] + (64 << 20)}
        return c

    monkeypatch.setattr(P, "count_at_depth", eval_heavier)
    r = P.dry_run(cfg, seq_len=T, cameras=CAMERAS, gpu_memory=r_gpu(plain), suggest=False)
    assert r["eval_peak_bytes"] > r["peak_bytes"] and r["needed_bytes"] == r["eval_peak_bytes"]
    assert r["fits"] is False  # the step alone fits (r_gpu) but the validation pass does not
    assert r["eval_pass"]["generate_new_tokens"] == NEW and r["eval_kv_cache_bytes"] > 0
    text = P.format_report(r)
    assert "validation pass (--eval-data, --eval-generate: 6 new tokens" in text and "KV cache" in text


def r_gpu(plain: dict) -> int:
    """A GPU the step alone fits with 32 MiB to spare."""
    return plain["peak_bytes"] + (32 << 20)
