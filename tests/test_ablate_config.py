"""The ablation file is checked whole before anything trains: errors name the run and the key;
optional runs whose recipe this drivekd lacks are reported unavailable; shipped files load.
Also the report's arithmetic: mean ± sample std over seeds, rows gathering several runs."""

import statistics
from pathlib import Path

import pytest
from click.testing import CliRunner

from drivekd.ablate import load_ablation, table4
from drivekd.ablate.report import fmt_cell
from drivekd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

HEAD = """
[ablation]
seeds = [1, 2]
eval_data = "bench.json"

[base]
student = "student"
data = "train.json"
cache = "cache"
max_steps = 2
"""


def _write(tmp_path, runs: str, head: str = HEAD) -> Path:
    (tmp_path / "bench.json").write_text("[]")
    p = tmp_path / "abl.toml"
    p.write_text(head + runs)
    return p


def test_valid_file_builds_every_job(tmp_path):
    abl = load_ablation(_write(tmp_path, """
[[runs]]
name = "ce"
recipe = "sft"
lr = 1e-4

[[runs]]
name = "agp"
row = "Ours (multi-teacher)"
recipe = "multi"
"""), project=None)
    assert [r.name for r in abl.runs] == ["ce", "agp"]
    ce = abl.runs[0]
    assert [j.seed for j in ce.jobs] == [1, 2] and [j.cfg.seed for j in ce.jobs] == [1, 2]
    assert ce.jobs[0].cfg.lr == 1e-4 and abl.runs[1].jobs[0].cfg.lr == 5e-5  # the run's key overrides only its run
    assert ce.jobs[0].cfg.resume is True
    assert ce.jobs[1].cfg.out == (tmp_path / "ablation" / "runs" / "ce" / "seed-2").resolve()
    assert ce.jobs[0].cfg.student == (tmp_path / "student").resolve()  # relative to the file's folder
    assert abl.eval_data == (tmp_path / "bench.json").resolve()
    assert abl.rows == ["ce", "Ours (multi-teacher)"]


@pytest.mark.parametrize("run, words", [
    ('name = "bad-lr"\nlr = -1.0', ["bad-lr", "--lr"]),
    ('name = "typo"\nprojecton = "agp"', ["typo", "projecton"]),
    ('name = "bad-proj"\nprojection = "pcgrad"', ["bad-proj", "--projection"]),
    ('name = "kl"\nrecipe = "klx"', ["'kl'", "recipe klx not known", "optional"]),
    ('name = "own-out"\nout = "x"', ["own-out", "'out'"]),
    ('name = "own-seed"\nseed = 3', ["own-seed", "'seed'"]),
    ('name = "split"\nrecipe = "multi"\nsplit = "perception"', ["'split'", "--split"]),
    ('name = "bad name!"', ["run #2", "name"]),
    ('name = "rep"\nreport = ["perceptoin"]', ["rep", "'report'"]),
])
def test_errors_name_the_run_and_key(tmp_path, run, words):
    p = _write(tmp_path, f'[[runs]]\nname = "ok"\nrecipe = "sft"\n\n[[runs]]\n{run}\n')
    with pytest.raises(ConfigError) as e:
        load_ablation(p)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_one_cell_per_row_and_capability(tmp_path):
    p = _write(tmp_path, """
[[runs]]
name = "a"
row = "CE"
report = ["perception"]
recipe = "sft"

[[runs]]
name = "b"
row = "CE"
recipe = "sft"
""")
    with pytest.raises(ConfigError, match="row 'CE' already takes perception from run 'a'"):
        load_ablation(p)


def test_optional_run_of_an_unknown_recipe_is_unavailable_not_an_error(tmp_path):
    abl = load_ablation(_write(tmp_path, """
[[runs]]
name = "kl-perception"
row = "CE + KL"
optional = true
recipe = "klx"
klx_temperature = 2.0
"""))
    run = abl.runs[0]
    assert run.jobs == []
    assert run.unavailable == "recipe klx and setting klx_temperature not known to this drivekd"


def test_cli_refuses_a_bad_file_before_training_anything(tmp_path):
    from drivekd.cli.ablate import main

    p = _write(tmp_path, '[[runs]]\nname = "ok"\nrecipe = "sft"\n\n[[runs]]\nname = "late"\nw_ce = "high"\n')
    res = CliRunner().invoke(main, ["--config", str(p)])
    assert res.exit_code == 2
    assert "run 'late'" in res.output and "--w-ce" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "ablation").exists()  # the first, valid run never started


@pytest.mark.parametrize("name", ["table4.toml", "demo.toml"])
def test_shipped_ablation_files_load(tmp_path, name):
    """Every run of the shipped files builds its TrainConfig; only the optional rows whose recipe
    this drivekd lacks are unavailable, and they say why."""
    from drivekd.trainer.settings import RECIPES

    project = tmp_path / "drivekd.toml"
    project.write_text('[data]\ntrain = "train.json"\neval = "bench.json"\n[train]\nstudent = "s"\ncache = "c"\n')
    (tmp_path / "bench.json").write_text("[]")
    abl = load_ablation(ROOT / "configs" / "ablations" / name, project=project, out=tmp_path / "out")
    assert len(abl.runs) == 22
    for r in abl.runs:
        recipe = r.settings.get("recipe")
        if recipe in RECIPES:
            assert r.unavailable is None and r.jobs and all(j.cfg.recipe == recipe for j in r.jobs)
        else:
            assert r.unavailable.startswith(f"recipe {recipe}") and r.unavailable.endswith("not known to this drivekd")
    assert abl.rows[:3] == ["CE", "CE + KL", "CE + Hidden (1)"]
    assert "Ours (multi-teacher)" in abl.rows


def _rep(scores: dict, qtypes: dict | None = None) -> dict:
    return {"score_definition": "mcq_accuracy", "capabilities": {c: {"score": v} for c, v in scores.items()},
            "question_types": {q: {"mcq_accuracy": v} for q, v in (qtypes or {}).items()}}


def test_table_is_mean_and_sample_std_over_seeds():
    caps = {"1": (40.0, 20.0, 50.0), "2": (44.0, 30.0, 52.0), "3": (47.0, 31.0, 60.0)}
    runs = [{"name": "agp", "row": "AGP", "report": ["perception", "reasoning", "planning"], "status": None,
             "reports": {s: _rep(dict(zip(("perception", "reasoning", "planning"), v)), {"prediction": v[1] + 1})
                         for s, v in caps.items()}}]
    [row] = table4(["AGP"], runs)
    per = [v[0] for v in caps.values()]
    assert row["cells"]["perception"]["mean"] == pytest.approx(statistics.mean(per))
    assert row["cells"]["perception"]["std"] == pytest.approx(statistics.stdev(per))
    avg = [sum(v) / 3 for v in caps.values()]
    assert row["cells"]["average"]["mean"] == pytest.approx(statistics.mean(avg))
    assert row["cells"]["average"]["std"] == pytest.approx(statistics.stdev(avg))
    assert row["question_types"]["prediction"]["mean"] == pytest.approx(statistics.mean(v[1] + 1 for v in caps.values()))
    assert row["question_types"]["behavior"]["status"] is None or row["question_types"]["behavior"]["mean"] is None
    assert fmt_cell(row["cells"]["planning"]) == f"{statistics.mean([50, 52, 60]):.2f} ± {statistics.stdev([50, 52, 60]):.2f}"


def test_a_row_gathers_its_runs_and_shows_the_rest_as_missing():
    runs = [
        {"name": "ce-p", "row": "CE", "report": ["perception"], "status": None,
         "reports": {"1": _rep({"perception": 40.0, "reasoning": 99.0, "planning": 99.0})}},
        {"name": "ce-pl", "row": "CE", "report": ["planning"], "status": None,
         "reports": {"1": _rep({"perception": 99.0, "reasoning": 99.0, "planning": 45.0})}},
        {"name": "kl", "row": "CE + KL", "report": ["perception"], "status": "unavailable: recipe kl not known to this drivekd",
         "reports": {}},
    ]
    ce, kl = table4(["CE", "CE + KL"], runs)
    assert ce["cells"]["perception"]["mean"] == 40.0 and ce["cells"]["perception"]["std"] is None  # one seed: no std
    assert ce["cells"]["planning"]["mean"] == 45.0  # from the other run of the row, not ce-p's 99
    assert fmt_cell(ce["cells"]["reasoning"]) == "-" and fmt_cell(ce["cells"]["average"]) == "-"
    assert fmt_cell(kl["cells"]["perception"]) == "unavailable"
    assert kl["notes"] == ["kl: unavailable: recipe kl not known to this drivekd"]


def test_project_config_gives_defaults_unless_switched_off(tmp_path, monkeypatch):
    """[train] of ./drivekd.toml sits below [base] and the runs (as for drivekd-train); project = false
    makes the file stand alone (the validity study must not pick up a user's drivekd.toml)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "drivekd.toml").write_text("[train]\nlr = 0.125\nweight_decay = 0.5\n")
    runs = '[[runs]]\nname = "ce"\nrecipe = "sft"\nweight_decay = 0.25\n'
    cfg = load_ablation(_write(tmp_path, runs)).runs[0].jobs[0].cfg
    assert (cfg.lr, cfg.weight_decay) == (0.125, 0.25)
    cfg = load_ablation(_write(tmp_path, runs, HEAD.replace("[ablation]", "[ablation]\nproject = false"))).runs[0].jobs[0].cfg
    assert (cfg.lr, cfg.weight_decay) == (5e-5, 0.25)


def test_missing_eval_set_is_found_before_training(tmp_path):
    p = _write(tmp_path, '[[runs]]\nname = "ce"\nrecipe = "sft"\n')
    (tmp_path / "bench.json").unlink()
    with pytest.raises(ConfigError, match="key 'eval_data'.*bench.json does not exist"):
        load_ablation(p)
    assert load_ablation(p, need_eval=False).runs[0].jobs  # --check / --no-eval do not need it


def test_check_lists_every_job_and_the_unavailable_rows(tmp_path):
    from drivekd.cli.ablate import main

    p = _write(tmp_path, '[[runs]]\nname = "ce"\nrecipe = "sft"\n\n[[runs]]\nname = "kl"\noptional = true\nrecipe = "klx"\n')
    res = CliRunner().invoke(main, ["--config", str(p), "--check"])
    assert res.exit_code == 0, res.output
    assert "2 job(s), recipe sft" in res.output and "unavailable: recipe klx not known to this drivekd" in res.output
    assert "2 jobs checked" in res.output and not (tmp_path / "ablation").exists()
