"""Contribution diagnostics: each row's share of the applied update (formula, both gradient engines,
the fast path), the early low-share warning, TensorBoard and drivekd-report, and --calibrate-kd."""

import json
import logging

import pytest
import torch

from drivekd.errors import ConfigError
from drivekd.projection import GramEngine, coefficients, combine
from drivekd.trainer.contribution import ShareMonitor, calibrated_weights, update_shares
from drivekd.trainer.loop import Trainer, train
from drivekd.trainer.report_to import flatten
from drivekd.trainer.runs_report import FILES, load_run, share_stats, write_report
from drivekd.trainer.settings import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = ["ce", "perception", "reasoning", "planning"]


def _cfg(tiny_models, demo_data, out, **kw):
    base = dict(student=tiny_models / "internvl-student", data=demo_data / "train.json", out=out, num_workers=0, progress=False,
                max_steps=2, grad_accum=1, micro_batch=1, save_every=0, warmup_ratio=0.0, report_to="none")
    base.update(kw)
    return TrainConfig(**base)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "drivekd.trainer.loop" and "share of the update" in r.getMessage()]


# ----------------------------------------------------------------------------- the formula


def test_shares_equal_the_update_built_from_the_rows():
    """share_k = ||lambda_k g_k|| / sum_j ||lambda_j g_j|| and along_k = <lambda_k g_k, u> / ||u||^2,
    u = lambda @ B, from the Gram alone; the along-shares sum to 1."""
    g = torch.Generator().manual_seed(0)
    B = torch.randn(4, 64, generator=g, dtype=torch.float64)
    B[2] *= 1e-3
    lam = torch.tensor([3.0, 0.7, -0.2, 1.0], dtype=torch.float64)
    share, along = update_shares(B @ B.T, lam)
    u = lam @ B
    mags = [abs(float(lam[k])) * float(B[k].norm()) for k in range(4)]
    assert share == pytest.approx([m / sum(mags) for m in mags], rel=1e-12)
    assert along == pytest.approx([float(lam[k] * B[k] @ u / (u @ u)) for k in range(4)], rel=1e-10)
    assert sum(along) == pytest.approx(1.0, rel=1e-12)
    # Two rows that cancel: the update has no direction to split, but each row's size still counts.
    b = B[0]
    share, along = update_shares(torch.stack([b, -b]) @ torch.stack([b, -b]).T, torch.ones(2, dtype=torch.float64))
    assert share == pytest.approx([0.5, 0.5]) and along is None
    assert update_shares(torch.zeros(3, 3), torch.ones(3)) == ([0.0, 0.0, 0.0], None)


@pytest.mark.parametrize("method", ["agp", "g1", "g2", "none"])
def test_both_engines_return_the_same_lambda(method):
    """combine() (K gradient rows) and the Gram engine + coefficients() hand back the same lambda in
    their info, and lambda @ rows is the update each applies."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    params = list(net.parameters())
    x, y = torch.randn(5, 6), torch.randn(5, 3)

    def losses():
        out = net(x)
        return [((out - y) ** 2).mean(), out[:, 0].pow(2).mean() * 0.1, -(out[:, 1] * y[:, 1]).mean(), out.abs().mean() * 0.01]

    rows = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(l, params, retain_graph=True)]) for l in losses()])
    vec, info_rows = combine(rows, method, order=[2, 3, 1], return_info=True)
    engine = GramEngine(params)
    ls = losses()
    lam, info_gram = coefficients(engine.gram(ls, None), method, order=[2, 3, 1], return_info=True)
    torch.testing.assert_close(info_gram["coef"], info_rows["coef"], rtol=1e-6, atol=1e-9)
    engine.backward(ls, lam)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in params]), vec, rtol=1e-5, atol=1e-6)
    assert update_shares(info_gram["gram"], info_gram["coef"])[0] == pytest.approx(
        update_shares(info_rows["gram"], info_rows["coef"])[0], rel=1e-5)


# ----------------------------------------------------------------------------- in the trainer


@pytest.mark.slow
def test_rows_and_gram_engines_log_the_same_shares(tiny_models, demo_data, targets, tmp_path):
    # per-query full-map MSE (larger than the default T x T mean) so the reasoning term is visible
    kw = dict(max_steps=2, grad_accum=2, lr=1e-3, projection="agp", dynamic_weights=False, w_reasoning=1e5,
              full_reduction="per-query")
    rows = train(_cfg(tiny_models, demo_data, tmp_path / "rows", grad_engine="rows", **kw), targets)
    gram = train(_cfg(tiny_models, demo_data, tmp_path / "gram", grad_engine="gram", **kw), targets)
    for a, b in zip(rows.metrics, gram.metrics):
        for key in [f"{p}_{r}" for p in ("share", "along") for r in ROWS]:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-12), key
    # AGP counts CE once per teacher term: the update's CE part is 3 x ||g_ce||.
    assert rows.metrics[0]["share_reasoning"] > 1e-3 and sum(rows.metrics[0][f"along_{r}"] for r in ROWS) == pytest.approx(1.0)


@pytest.mark.slow
def test_fast_path_measures_the_shares_on_logged_steps(tiny_models, demo_data, targets, tmp_path):
    """--projection none without re-weighting (one backward of the sum): a logged step's first
    micro-step measures the per-loss Gram. Its shares equal the per-loss path's (same rows, lambda
    all ones), the update is unchanged, and --no-contribution logs none."""
    kw = dict(projection="none", lr=1e-3, w_reasoning=1e5)
    fast = train(_cfg(tiny_models, demo_data, tmp_path / "fast", dynamic_weights=False, max_steps=1, **kw), targets)
    rows = train(_cfg(tiny_models, demo_data, tmp_path / "rows", dynamic_weights=True, max_steps=1, **kw), targets)
    assert fast.metrics[0]["grad_norms"] is None  # the fast path indeed
    for key in [f"{p}_{r}" for p in ("share", "along") for r in ROWS]:
        assert fast.metrics[0][key] == pytest.approx(rows.metrics[0][key], rel=1e-4, abs=1e-12), key

    kw = dict(kw, dynamic_weights=False, max_steps=2, grad_accum=2, log_every=2)
    on = train(_cfg(tiny_models, demo_data, tmp_path / "on", **kw), targets)
    off = train(_cfg(tiny_models, demo_data, tmp_path / "off", contribution=False, **kw), targets)
    logged = [json.loads(l) for l in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2]
    assert all(r["share_reasoning"] > 0 and sum(r[f"along_{n}"] for n in ROWS) == pytest.approx(1.0) for r in logged)
    assert on.metrics[0]["share_ce"] is None  # step 1 is not logged: nothing measured
    assert not any(k.startswith(("share_", "along_")) for k in off.metrics[-1])
    assert on.losses == pytest.approx(off.losses, rel=1e-6)
    # After the warning's window, every --contribution-every-th logged step only.
    sparse = train(_cfg(tiny_models, demo_data, tmp_path / "sparse", **dict(kw, grad_accum=1, log_every=1, max_steps=3),
                        contribution_warn_steps=1, contribution_every=2), targets)
    assert [m["share_ce"] is not None for m in sparse.metrics] == [True, False, True]
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "on" / "final" / "model.safetensors")), load_file(str(tmp_path / "off" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the warning


def test_warning_fires_once_on_the_default_demo_run(tiny_models, demo_data, targets, tmp_path, caplog):
    """Today's default (multi, AGP, re-weighting, the paper's weights, attention MSE): every teacher
    term's share is far under 1%; each is named once, after the first --contribution-warn-steps
    logged steps, with the knobs that change it, on the console and in run.json."""
    with caplog.at_level(logging.WARNING, logger="drivekd.trainer.loop"):
        res = train(_cfg(tiny_models, demo_data, tmp_path / "run", max_steps=4, contribution_warn_steps=2), targets)
    assert res.plan.cfg.recipe == "multi" and res.plan.cfg.projection == "agp" and res.plan.cfg.dynamic_weights
    msgs = _warnings(caplog)
    assert len(msgs) == 3  # one per teacher term, not once per step
    for term, msg in zip(ROWS[1:], msgs):
        assert f"the {term} teacher term" in msg and f"--w-{term}, now 1" in msg
        assert "--loss cosine" in msg and "--calibrate-kd" in msg and "first 2 logged step(s)" in msg
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [w["term"] for w in run["warnings"]] == ROWS[1:] and run["history"][-1]["warnings"] == run["warnings"]
    for w in run["warnings"]:
        mean = sum(m[f"share_{w['term']}"] for m in res.metrics[:2]) / 2
        assert w["at_step"] == 2 and w["mean_share"] == pytest.approx(mean) and mean < 0.01


def test_warning_window_is_the_run_when_shorter_and_survives_resume(tiny_models, demo_data, targets, tmp_path, caplog):
    """A 2-step run decides on its 2 steps (default window 20). A resume after the decision replays
    the kept records: run.json keeps the warning at its top level, the console does not repeat it."""
    with caplog.at_level(logging.WARNING, logger="drivekd.trainer.loop"):
        train(_cfg(tiny_models, demo_data, tmp_path / "run", max_steps=2, save_every=2), targets)
        assert len(_warnings(caplog)) == 3
        caplog.clear()
        train(_cfg(tiny_models, demo_data, tmp_path / "run", max_steps=2, save_every=2, resume=True), targets)  # nothing left to run
    assert _warnings(caplog) == []
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [w["term"] for w in run["warnings"]] == ROWS[1:] and run["warnings"][0]["steps"] == 2
    assert "warnings" in run["history"][0] and "warnings" not in run["history"][1]


@pytest.mark.slow
def test_no_warning_when_the_teacher_term_counts(tiny_models, demo_data, targets, tmp_path, caplog):
    """A teacher term with a weight that makes it count (here 1e8: the tiny models' T x T-mean attention
    gradients are ~1e-6 of CE's), or set by --calibrate-kd, is not warned about."""
    with caplog.at_level(logging.WARNING, logger="drivekd.trainer.loop"):
        heavy = train(_cfg(tiny_models, demo_data, tmp_path / "heavy", recipe="reasoning", w_reasoning=1e8,
                           dynamic_weights=False), targets)
        # per-query full-map MSE: under the default T x T mean the tiny models' term needs a weight past
        # calibration's 1e6 clamp
        cal = train(_cfg(tiny_models, demo_data, tmp_path / "cal", recipe="reasoning", calibrate_kd=0.3, dynamic_weights=False,
                         full_reduction="per-query"), targets)
        assert _warnings(caplog) == []
        low = train(_cfg(tiny_models, demo_data, tmp_path / "low", recipe="reasoning", dynamic_weights=False), targets)
    assert all(m["share_reasoning"] > 0.01 for m in heavy.metrics + cal.metrics)
    assert max(m["share_reasoning"] for m in low.metrics) < 0.01 and len(_warnings(caplog)) == 1
    assert "warnings" not in json.loads((tmp_path / "cal" / "run.json").read_text())
    # --contribution-warn 0 switches the warning off.
    assert ShareMonitor(ROWS, 0.0, 20, 5).add({"step": 1, **{f"share_{r}": 0.0 for r in ROWS}}) == []


def test_warning_is_printed_on_the_console(tiny_models, demo_data, tmp_path, monkeypatch, capsys):
    """drivekd-train configures no logging: the warning must still reach the terminal (stderr), through
    logging's last resort. Here in this process with the handlers pytest adds to the root logger taken
    away, i.e. as a process where nothing configured logging sees it."""
    from online_targets import TEACHER_LAYERS, compute_targets

    from drivekd.data.loaders import load_samples

    for name in [n for n in logging.root.manager.loggerDict if n == "drivekd" or n.startswith("drivekd.")]:
        logger = logging.getLogger(name)
        assert not logger.handlers and logger.propagate, name  # drivekd adds no handler of its own
    records = [r for r in json.loads((demo_data / "train.json").read_text()) if r["question_type"] == "perception"][:2]
    (tmp_path / "two.json").write_text(json.dumps(records))
    t = compute_targets(tiny_models / "internvl-teacher", load_samples(tmp_path / "two.json", demo_data), TEACHER_LAYERS)
    cfg = TrainConfig(student=tiny_models / "internvl-student", data=tmp_path / "two.json", images=demo_data, out=tmp_path / "out",
                      num_workers=0, progress=False, max_steps=1, save_every=0, report_to="none", recipe="perception", dynamic_weights=False)
    monkeypatch.setattr(logging.root, "handlers", [])
    train(cfg, t)
    line = next(l for l in capsys.readouterr().err.splitlines() if "share of the update" in l)
    assert line.startswith("drivekd-train: warning: the perception teacher term") and "--w-perception" in line


# ----------------------------------------------------------------------------- --calibrate-kd


@pytest.mark.slow
def test_calibration_sets_each_term_to_the_fraction_of_ce(tiny_models, demo_data, targets, tmp_path):
    """Measured on the first micro-batch, which step 1 then trains on: step 1's weighted gradient
    norms are the fraction x CE's. The norms and weights are in run.json and the checkpoint; the
    same seed gives the same weights, another seed (another first batch) others."""
    kw = dict(calibrate_kd=1e-4, calibrate_batches=1, max_steps=1, dynamic_weights=False)
    a = train(_cfg(tiny_models, demo_data, tmp_path / "a", **kw), targets)
    norms = a.metrics[0]["grad_norms"]
    for term in ROWS[1:]:
        assert norms[term] / norms["ce"] == pytest.approx(1e-4, rel=1e-3)
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    cal = run["calibration"]
    meta = json.loads((tmp_path / "a" / "final" / "trainer_state.json").read_text())["calibration"]
    assert cal == meta and cal["fraction"] == 1e-4 and cal["micro_batches"] == 1
    assert run["static_weights"] == [cal["weights"][r] for r in ROWS] and cal["weights"]["ce"] == 1.0
    for term in ROWS[1:]:
        assert cal["weights"][term] == pytest.approx(1e-4 * cal["norms"]["ce"] / cal["norms"][term])
        assert cal["weighted_norms"][term] == pytest.approx(cal["target_norm"])
    same = train(_cfg(tiny_models, demo_data, tmp_path / "same", **kw), targets)
    other = train(_cfg(tiny_models, demo_data, tmp_path / "other", seed=7, **kw), targets)
    assert same.plan.static_weights == a.plan.static_weights
    assert other.plan.static_weights != a.plan.static_weights
    # The paper's weights stay the default.
    assert TrainConfig().calibrate_kd is None


@pytest.mark.slow
def test_resume_reuses_the_calibrated_weights(tiny_models, demo_data, targets, tmp_path, monkeypatch):
    kw = dict(calibrate_kd=1e-4, calibrate_batches=2, max_steps=2, save_every=1, lr=1e-3, dynamic_weights=True)
    full = train(_cfg(tiny_models, demo_data, tmp_path / "full", **kw), targets)

    def never(self, n):
        raise AssertionError("a resumed run measured the gradient norms again")

    monkeypatch.setattr(Trainer, "_measure_norms", never)
    resumed = train(_cfg(tiny_models, demo_data, tmp_path / "resumed", resume_from=tmp_path / "full" / "step-000001", **kw),
                    targets)
    assert resumed.plan.static_weights == full.plan.static_weights != [1.0] * 4
    assert resumed.losses == pytest.approx(full.losses[1:], rel=1e-6)
    assert resumed.metrics[-1]["weights"] == pytest.approx(full.metrics[-1]["weights"], rel=1e-6)


def test_calibrated_weights_rules():
    w = calibrated_weights(ROWS, [2.0, 1.0, 0.0, 1.0], [3.0, 0.5, 0.2, None], 0.1)
    assert w == pytest.approx([2.0, 0.1 * 2.0 * 3.0 / 0.5, 0.0, 1.0])  # a switched-off term stays off; unmeasured keeps its weight
    assert calibrated_weights(ROWS[:2], [1.0, 1.0], [1.0, 1e-12], 0.5) == [1.0, 1e6]  # the re-weighting's clamp
    with pytest.raises(ConfigError, match="--calibrate-kd.*--w-ce"):
        calibrated_weights(ROWS[:2], [0.0, 1.0], [1.0, 1.0], 0.1)


def test_settings_are_checked():
    for bad, flag in ((dict(calibrate_kd=0.0), "--calibrate-kd"), (dict(calibrate_kd=-1.0), "--calibrate-kd"),
                      (dict(calibrate_batches=0), "--calibrate-batches"), (dict(contribution_warn=1.0), "--contribution-warn"),
                      (dict(contribution_warn=-0.1), "--contribution-warn"), (dict(contribution_warn_steps=0), "--contribution-warn-steps")):
        with pytest.raises(ConfigError, match=flag):
            TrainConfig(**bad)


# ----------------------------------------------------------------------------- TensorBoard and drivekd-report


def test_share_keys_go_under_one_tensorboard_section():
    rec = {"step": 2, "loss_ce": 1.0, "share_ce": 0.9, "share_perception": 0.1, "along_perception": -0.02, "along_ce": None,
           "weights": {"share_x": 1.0}}
    assert flatten(rec) == {"train/loss_ce": 1.0, "share/ce": 0.9, "share/perception": 0.1, "share/along_perception": -0.02,
                            "weights/share_x": 1.0}


@pytest.mark.slow
def test_report_draws_and_tabulates_the_shares(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config": {"recipe": "multi", "projection": "agp", "grad_accum": 1}, "rows": ROWS}))
    with (run / "metrics.jsonl").open("w") as fh:
        for s in range(1, 11):
            rec = {"step": s, "loss": 1.0, **{f"loss_{r}": 1.0 for r in ROWS}, "share_ce": 0.99, "share_perception": 0.004,
                   "share_reasoning": 0.002 * s, "share_planning": 0.0, "along_ce": 1.0, "along_perception": 0.001,
                   "along_reasoning": -0.001, "along_planning": 0.0}
            fh.write(json.dumps(rec) + "\n")
    files = write_report([run], tmp_path / "report")
    assert "shares.png" in FILES and (tmp_path / "report" / "shares.png").stat().st_size > 10_000
    assert sorted(f.name for f in files) == sorted(FILES)
    st = share_stats(load_run(run), "reasoning")
    assert st["share"] == pytest.approx(0.011) and st["along"] == pytest.approx(-0.001) and st["steps"] == 10
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "perception share of update (norm / along)" in md
    assert "| 0.4% / 0.1% | 1.1% / -0.1% | 0% / 0% |" in md
    assert "![shares](shares.png)" in md


def test_reweighting_starts_from_large_static_weights():
    """Calibrated weights are often > 88, where fp32 expm1 overflows: the re-weighting must start
    from them, not from its 1e6 clamp (it did, through inverse_softplus)."""
    from drivekd.optim.reweight import DynamicWeights, inverse_softplus

    w = torch.tensor([0.5, 19.0, 25.0, 100.0, 1e5])
    torch.testing.assert_close(torch.nn.functional.softplus(inverse_softplus(w)), w, rtol=1e-6, atol=0)
    assert DynamicWeights(ROWS[:3], [1.0, 150.0, 3e4]).weight_dict() == pytest.approx({"ce": 1.0, "perception": 150.0,
                                                                                          "reasoning": 3e4}, rel=1e-6)
