"""Method defaults that follow the authors (issue 22): KL temperature 1, the full-map MSE as the mean
over all T x T entries; older names of the reduction keep meaning what they meant."""

import json

import pytest
import torch
import torch.nn.functional as F

from drivekd.errors import ConfigError
from drivekd.losses.attention import attention_loss, full_attention_mse
from drivekd.losses.kl import topk_kl
from drivekd.trainer.settings import TrainConfig, config_from_sources, recorded_settings


def _maps(T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two causal row-normalised (T, T) maps, as a decoder layer's head-mean attention."""
    g = torch.Generator().manual_seed(seed)
    tril = torch.ones(T, T, dtype=torch.bool).tril()
    a, b = (torch.rand(T, T, generator=g).masked_fill(~tril, 0) for _ in range(2))
    return a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)


def test_kl_temperature_defaults_to_one_the_exact_bucketed_kl():
    assert TrainConfig().kl_temperature == 1.0
    g = torch.Generator().manual_seed(0)
    B, P, V, k = 2, 3, 11, 4
    logits = torch.randn(B, P, V, generator=g)
    teacher = torch.log_softmax(torch.randn(B, P, V, generator=g), -1)
    lp, idx = teacher.topk(k, -1)
    tail = teacher.scatter(-1, idx, float("-inf")).logsumexp(-1)
    mask = torch.ones(B, P, dtype=torch.bool)
    # The KL of the two distributions coarsened to the teacher's k tokens + one tail bucket, by hand.
    s = torch.log_softmax(logits, -1)
    s_b = torch.cat([s.gather(-1, idx), s.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)], -1)
    t_b = torch.cat([lp, tail[..., None]], -1)
    exact = (t_b.exp() * (t_b - s_b)).sum(-1).mean(-1)
    torch.testing.assert_close(topk_kl(logits, lp, idx, tail, mask), exact)  # the function's default
    torch.testing.assert_close(topk_kl(logits, lp, idx, tail, mask, TrainConfig().kl_temperature), exact)  # the trainer's
    assert not torch.allclose(topk_kl(logits, lp, idx, tail, mask, 2.0), exact)


def test_full_map_mse_defaults_to_the_authors_mean_over_all_entries():
    assert TrainConfig().full_reduction == "entries"
    S, Tm = _maps(7, 1)
    valid = torch.ones(1, 7, dtype=torch.bool)
    authors = F.mse_loss(S, Tm)  # the released trainer: mean over T x T, upper triangle 0 in both
    torch.testing.assert_close(full_attention_mse(S[None], Tm[None], valid), authors.reshape(1))
    z = torch.zeros(1, 7, dtype=torch.bool)
    torch.testing.assert_close(attention_loss("full", "mse", S[None], Tm[None], text=z, vision=z, valid=valid),
                               authors.reshape(1))
    cfg = TrainConfig()  # the trainer passes its setting through: same value
    torch.testing.assert_close(full_attention_mse(S[None], Tm[None], valid, cfg.full_reduction), authors.reshape(1))
    per_query = sum(((S[i, : i + 1] - Tm[i, : i + 1]) ** 2).mean() for i in range(7)) / 7
    assert not torch.allclose(authors, per_query)


@pytest.mark.parametrize("given,name", [("entries", "entries"), ("reference", "entries"), ("per-query", "per-query"),
                                        ("paper", "per-query")])
def test_older_reduction_names_map_to_their_forms(given, name):
    assert TrainConfig(full_reduction=given).full_reduction == name  # run.json records the current name
    S, Tm = _maps(6, 2)
    valid = torch.ones(1, 6, dtype=torch.bool)
    want = {"entries": F.mse_loss(S, Tm),
            "per-query": sum(((S[i, : i + 1] - Tm[i, : i + 1]) ** 2).mean() for i in range(6)) / 6}[name]
    torch.testing.assert_close(full_attention_mse(S[None], Tm[None], valid, given), want.reshape(1))


def test_reduction_names_from_flags_and_toml(tmp_path):
    from click.testing import CliRunner

    from drivekd.cli.train import main

    p = tmp_path / "drivekd.toml"
    p.write_text('[train]\nfull_reduction = "reference"\n')  # an older study config
    assert config_from_sources({}, p).full_reduction == "entries"
    assert config_from_sources({"full_reduction": "paper"}, p).full_reduction == "per-query"
    with pytest.raises(ConfigError, match="--full-reduction must be one of entries, per-query, reference, paper"):
        TrainConfig(full_reduction="rows")
    out = CliRunner().invoke(main, ["--help"], terminal_width=200).output
    assert "reference = entries" in out and "paper = per-query" in out


def test_recorded_settings_in_todays_terms():
    old = TrainConfig().to_json() | {"kl_temperature": 2.0, "full_reduction": "paper"}  # as written before the change
    # A perception run used neither setting: it reads as today's defaults, so it resumes unchanged.
    got = recorded_settings(old | {"recipe": "perception"})
    assert got["kl_temperature"] == 1.0 and got["full_reduction"] == "entries"
    # Where they entered the run, the recorded value stays (a resume without it is refused), renamed.
    assert recorded_settings(old | {"recipe": "reasoning"})["full_reduction"] == "per-query"
    assert recorded_settings(old | {"recipe": "multi"})["full_reduction"] == "per-query"
    assert recorded_settings(old | {"recipe": "perception", "signal": "full"})["full_reduction"] == "per-query"
    assert recorded_settings(old | {"recipe": "reasoning", "loss": "cosine"})["full_reduction"] == "entries"
    assert recorded_settings(old | {"recipe": "kl"})["kl_temperature"] == 2.0
    assert recorded_settings(old | {"recipe": "reasoning", "full_reduction": "reference"})["full_reduction"] == "entries"


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_resume_of_a_run_recorded_under_the_old_names(tiny_models, demo_data, targets, tmp_path):
    from drivekd.trainer.loop import train

    def cfg(out, **kw):
        return TrainConfig(student=tiny_models / "internvl-student", data=demo_data / "train.json", out=out, num_workers=0,
                           progress=False, grad_accum=1, micro_batch=1, dynamic_weights=False, warmup_ratio=0.0,
                           recipe="reasoning", report_to="none", **kw)

    run = tmp_path / "run"
    train(cfg(run, max_steps=2, save_every=1, full_reduction="per-query"), targets)
    ckpt = run / "step-000001"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["config"]["full_reduction"] == "per-query"
    # Rewrite the record as the drivekd before issue 22 wrote it: old name, old KL default.
    state["config"].update(full_reduction="paper", kl_temperature=2.0)
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    # Today's default is another objective for this run's full-map term: refused, naming the flag.
    with pytest.raises(ConfigError, match="--full-reduction: checkpoint 'per-query', now 'entries'"):
        train(cfg(tmp_path / "b", max_steps=2, resume_from=ckpt), targets)
    # Either name of the recorded form resumes; the KL temperature does not enter a reasoning run.
    for name in ("paper", "per-query"):
        res = train(cfg(tmp_path / name, max_steps=2, resume_from=ckpt, full_reduction=name), targets)
        assert res.steps == 2
