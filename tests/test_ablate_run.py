"""drivekd-ablate end to end on a real teacher store and tiny models: a killed ablation (simulated by
running a subset) restarts where it stopped without retraining finished runs; a half-finished run
resumes from its checkpoint; the report's table holds each run's evaluated numbers."""

import json
import shutil

import pytest

from drivekd.ablate import load_ablation, run_ablation, write_ablation_report
from drivekd.ablate.state import read_state

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def setup(tiny_models, demo_data, tmp_path_factory):
    """Six training samples (two per capability), their store, and six DriveBench records to evaluate."""
    from drivekd.teacher.build import BuildConfig, build

    root = tmp_path_factory.mktemp("ablate")
    records = json.loads((demo_data / "train.json").read_text())
    by_cap = {}
    for r in records:
        by_cap.setdefault(r["question_type"], []).append(r)
    train = [r for cap in ("perception", "reasoning", "planning") for r in by_cap[cap][:2]]
    (root / "train.json").write_text(json.dumps(train))
    bench = json.loads((demo_data / "drivebench.json").read_text())[:6]
    (root / "bench.json").write_text(json.dumps(bench))
    t = tiny_models / "internvl-teacher"
    build(BuildConfig(teachers={"perception": t, "reasoning": t, "planning": t}, data=root / "train.json",
                      images=demo_data, out=root / "cache", progress=False))
    return root, tiny_models, demo_data


def _file(root, tiny_models, demo_data, tmp_path):
    p = tmp_path / "abl.toml"
    p.write_text(f"""
[ablation]
seeds = [1, 2]
eval_data = "{root / 'bench.json'}"
eval_images = "{demo_data}"
max_new_tokens = 4

[base]
student = "{tiny_models / 'internvl-student'}"
data = "{root / 'train.json'}"
images = "{demo_data}"
cache = "{root / 'cache'}"
max_steps = 2
grad_accum = 1
save_every = 1
keep_last = 1
num_workers = 0
progress = false
report_to = "none"
dynamic_weights = false

[[runs]]
name = "ce"
row = "CE"
recipe = "sft"

[[runs]]
name = "agp"
row = "Ours (multi-teacher)"
recipe = "multi"
projection = "agp"

[[runs]]
name = "kl"
row = "CE + KL"
optional = true
recipe = "klx"
""")
    return p


def test_kill_resume_skip_and_report(setup, tmp_path):
    root, tiny_models, demo_data = setup
    abl = load_ablation(_file(root, tiny_models, demo_data, tmp_path), project=None)

    # "Killed" after the first run: only it has trained and been evaluated.
    first = run_ablation(abl, only=["ce"])
    assert [(o.key, o.status, o.trained) for o in first.outcomes] == [("ce/seed-1", "done", True), ("ce/seed-2", "done", True)]
    ce1 = abl.run("ce").jobs[0]
    weights = abl.run_dir(ce1) / "final" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    md = (abl.out / "report.md").read_text()
    assert "pending: 2 of 2 job(s) not evaluated yet" in md  # the agp row, not run yet
    assert "unavailable: recipe klx not known to this drivekd" in md

    # A half-finished job: agp seed 1 trained up to its step-2 checkpoint, final/ lost.
    run_ablation(abl, only=["agp"])
    agp1 = abl.run("agp").jobs[0]
    shutil.rmtree(abl.run_dir(agp1) / "final")
    state = read_state(abl.state_path(agp1))
    state["status"] = "training"
    abl.state_path(agp1).write_text(json.dumps(state))

    again = run_ablation(abl)
    by_key = {o.key: o for o in again.outcomes}
    assert by_key["ce/seed-1"].status == "skipped" and by_key["ce/seed-2"].status == "skipped"
    assert weights.stat().st_mtime_ns == mtime  # the finished run was not retrained
    assert by_key["agp/seed-1"].trained and by_key["agp/seed-2"].status == "skipped"
    history = json.loads((abl.run_dir(agp1) / "run.json").read_text())["history"]
    assert history[-1]["resumed_from"].endswith("step-000002") and history[-1]["from_step"] == 2
    assert read_state(abl.state_path(ce1))["train_calls"] == 1
    assert read_state(abl.state_path(agp1))["train_calls"] == 2
    report = json.loads((abl.out / "report.json").read_text())
    calls = {r["name"]: r["train_calls"] for r in report["runs"]}
    assert calls["ce"] == {"1": 1, "2": 1} and calls["agp"] == {"1": 2, "2": 1}

    # The table holds each job's evaluated numbers. Make one job answer half its questions right and
    # re-score it as `drivekd-eval score` does, so the seeds differ and the std is not zero.
    from drivekd.eval.predictions import read_predictions
    from drivekd.eval.report import score_and_report

    ev = abl.eval_dir(ce1)
    records = read_predictions(ev / "predictions.json")
    for rec in records[::2]:
        rec["pred"] = rec["answer"]
    score_and_report(records, ev, model_name="ce seed 1")
    report = write_ablation_report(abl)
    rows = {r["row"]: r for r in report["rows"]}
    for name, row in (("ce", "CE"), ("agp", "Ours (multi-teacher)")):
        for cap in ("perception", "reasoning", "planning"):
            evaluated = [json.loads((abl.eval_dir(j) / "report.json").read_text())["capabilities"][cap]["score"]
                         for j in abl.run(name).jobs]
            cell = rows[row]["cells"][cap]
            if None in evaluated:
                assert cell["mean"] is None
                continue
            assert cell["values"] == evaluated
            assert cell["mean"] == pytest.approx(sum(evaluated) / 2)
    assert any(rows["CE"]["cells"][c]["std"] for c in ("perception", "reasoning", "planning"))
    assert rows["CE + KL"]["cells"]["perception"]["status"] == "unavailable"
    assert (abl.out / "report.png").stat().st_size > 0


def test_changed_settings_of_a_finished_run_are_refused(setup, tmp_path):
    from drivekd.errors import ConfigError

    root, tiny_models, demo_data = setup
    p = _file(root, tiny_models, demo_data, tmp_path)
    abl = load_ablation(p)
    job = abl.run("ce").jobs[0]
    from drivekd.ablate.runner import settings_identity
    from drivekd.ablate.state import write_state

    from drivekd.ablate.runner import check_finished_settings

    # A state recorded by an older drivekd lacks the keys added since: they had their defaults then.
    older = {k: v for k, v in settings_identity(job.cfg).items() if k != "weight_decay"}
    write_state(abl.state_path(job), {"status": "done", "settings": older})
    check_finished_settings(abl, [job])
    # Recorded before issue 22 changed two defaults that a CE run does not use: not a change.
    write_state(abl.state_path(job), {"status": "done", "settings": {**settings_identity(job.cfg), "kl_temperature": 2.0,
                                                                       "full_reduction": "paper"}})
    check_finished_settings(abl, [job])
    write_state(abl.state_path(job), {"status": "done", "settings": {**settings_identity(job.cfg), "lr": 1.0}})
    with pytest.raises(ConfigError, match="run 'ce' \\(seed 1\\) was started with other settings \\(lr changed\\)"):
        run_ablation(abl)
    assert not abl.run_dir(job).exists()


def test_a_failing_run_is_reported_and_the_others_go_on(setup, tmp_path):
    """A run the planner refuses (layer 1 is not in the store) fails with its reason; the CLI exits 1."""
    from click.testing import CliRunner

    from drivekd.cli.ablate import main

    root, tiny_models, demo_data = setup
    p = _file(root, tiny_models, demo_data, tmp_path)
    text = p.read_text().replace("seeds = [1, 2]", "seeds = [1]")
    text = text.replace('name = "ce"\nrow = "CE"\nrecipe = "sft"', 'name = "bad-layer"\nrecipe = "perception"\nlayers = "1"')
    text = text.replace('name = "agp"\nrow = "Ours (multi-teacher)"\nrecipe = "multi"\nprojection = "agp"',
                        'name = "ce"\nrow = "CE"\nrecipe = "sft"')  # after the failing run
    p.write_text(text)
    res = CliRunner().invoke(main, ["--config", str(p)])
    assert res.exit_code == 1, res.output
    report = json.loads((tmp_path / "ablation" / "report.json").read_text())
    status = {r["name"]: r["status"] for r in report["runs"]}
    assert status["ce"] is None  # trained and evaluated after the failed run
    assert status["bad-layer"].startswith("failed (seed 1: ") and "layer" in status["bad-layer"]
    assert "bad-layer/seed-1" in res.output
