"""tools/validity_study.py (study v2): parts of an ablation -> val-evaluated checkpoints -> a choice made
on val only -> held-out once -> paired differences to CE with a t-interval; resumable per part."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from drivekd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _study_module():
    spec = importlib.util.spec_from_file_location("validity_study", ROOT / "tools" / "validity_study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


vs = _study_module()


def _plan(**kw):
    base = dict(sizes=(100,), multi_samples=6, lrs=(1e-3, 3e-3), seeds=(1, 2, 3), steps=100, save_every=50, micro_batch=8)
    return vs.Plan(**{**base, **kw})


def _curves(table):
    """{(lr, step): [score per seed]} -> val_curves' shape for a perception part."""
    out = {}
    for (lr, step), scores in table.items():
        out.setdefault(lr, {})[step] = {s + 1: {"perception": v} for s, v in enumerate(scores)}
    return out


def test_select_takes_the_best_mean_val_and_waits_for_the_whole_grid():
    plan = _plan()
    part = plan.parts["perception-100"]
    table = {(1e-3, 50): [60, 62, 64], (1e-3, 100): [70, 71, 72], (3e-3, 50): [75, 50, 70], (3e-3, 100): [71, 71, 71]}
    chosen = vs.select(plan, part, _curves(table))
    assert (chosen["lr"], chosen["step"], chosen["val_mean"]) == (1e-3, 100, 71)  # 71 vs 65 / 61.67 / 71: tie -> smaller lr
    table[(3e-3, 50)] = [90, 90, 90]
    assert (vs.select(plan, part, _curves(table))["lr"], vs.select(plan, part, _curves(table))["step"]) == (3e-3, 50)
    del table[(3e-3, 100)]  # a checkpoint not evaluated yet: no choice
    assert vs.select(plan, part, _curves(table)) is None
    table[(3e-3, 100)] = [71, 71]  # one seed missing: no choice
    assert vs.select(plan, part, _curves(table)) is None


def test_paired_interval_is_the_student_t_interval():
    p = vs.paired([1.0, 3.0, 2.0, 6.0])
    sd = math.sqrt(sum((d - 3.0) ** 2 for d in [1.0, 3.0, 2.0, 6.0]) / 3)
    assert p["mean"] == 3.0 and p["sd"] == pytest.approx(sd)
    assert p["ci95"] == pytest.approx([3.0 - 3.182 * sd / 2, 3.0 + 3.182 * sd / 2])  # t_{0.975, 3} = 3.182
    assert vs.paired([2.0])["ci95"] is None  # one seed: no interval


def test_parts_hold_the_issue_arms():
    plan = _plan(sizes=(100, 400), calibrated={"calibrate_ratio": 0.5})
    assert list(plan.parts) == ["perception-100", "perception-400", "variants-100", "variants-400", "multi-ce",
                                "multi-none", "multi-g1", "multi-g2", "multi-agp"]
    p = plan.parts["perception-100"]
    assert p.arms["ce"] == {"recipe": "sft", "split": "perception"}
    assert p.arms["kd-paper"] == {"recipe": "perception"}  # every paper default: MSE, weight 1
    assert p.arms["kd-cos"]["loss"] == "cosine"
    v = plan.parts["variants-400"]
    assert v.arms["kd-cos-l34"]["layers"] == "L-3..L-2" and v.ce_part == "perception-400"
    assert v.arms["kd-mse-calibrated"] == {"recipe": "perception", "calibrate_ratio": 0.5}
    assert "kd-mse-calibrated" not in _plan().parts["variants-100"].arms  # the slot is off unless configured
    assert all(plan.parts[f"multi-{a}"].arms[a]["full_reduction"] == "entries" for a in ("none", "g1", "g2", "agp"))
    assert plan.jobs(plan.parts["perception-100"]) == 3 * 2 * 3
    assert vs.parse_keys("a=0.5,b=true,c=x") == {"a": 0.5, "b": True, "c": "x"}
    with pytest.raises(ConfigError, match="--calibrated-arm"):
        vs.parse_keys("novalue")


def test_lamp_layers_pair_student_1_2_with_teacher_3_4():
    from drivekd.losses.recipes import plan_term

    term = plan_term("perception", 4, 6, layers=vs.LAMP_LAYERS)
    assert term.pairs == ((1, (3,)), (2, (4,)))


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    """A small drivekd.demo.benchmark (every question multiple choice): 3 train scenes (6 perception
    questions), 3 val and 3 held-out scenes, disjoint by scene."""
    from drivekd.demo.benchmark import make_benchmark

    root = tmp_path_factory.mktemp("bench")
    make_benchmark(root, 0, train=3, val=3, heldout=3)
    return root


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_quick_part_chooses_on_val_tests_on_heldout_and_resumes(tiny_models, benchmark, tmp_path, monkeypatch):
    from click.testing import CliRunner

    out = tmp_path / "study"
    args = ["--teacher", str(tiny_models / "internvl-teacher"), "--benchmark", str(benchmark), "--out", str(out),
            "--quick", "--max-new-tokens", "4"]
    res = CliRunner().invoke(vs.main, [*args, "--part", "perception-4@0.001"])  # the part's one lr: the whole grid
    assert res.exit_code == 0, res.output
    part = out / "parts" / "perception-4"
    study = json.loads((out / "study.json").read_text())
    arms = study["results"]["perception-4"]["arms"]
    assert set(arms) == {"ce", "kd-paper", "kd-cos"}
    for arm, a in arms.items():
        choice = a["choice"]
        assert choice["seeds"] == [1, 2] and choice["step"] in (1, 2) and choice["val_key"] == "perception"
        # the choice is the best mean val over (lr, step) of the val evaluations on disk
        curves = vs.val_curves(vs.Plan(sizes=(4,), multi_samples=6, lrs=(1e-3,), seeds=(1, 2), steps=2, save_every=1,
                                       micro_batch=2), vs.Plan(sizes=(4,), multi_samples=6, lrs=(1e-3,), seeds=(1, 2),
                                                               steps=2, save_every=1, micro_batch=2).parts["perception-4"],
                               arm, vs.Paths(out))
        means = {st: sum(v["perception"] for v in seeds.values()) / 2 for st, seeds in curves[1e-3].items()}
        assert set(means) == {1, 2} and choice["val_mean"] == max(means.values())
        for seed in (1, 2):  # held-out: evaluated at the chosen step, every seed
            rep = json.loads((part / "heldout" / arm / f"seed-{seed}" / "report.json").read_text())
            assert rep["n_records"] == 6
        assert (a["paired_to_ce"] is None) == (arm == "ce")
        if arm != "ce":
            p = a["paired_to_ce"]["perception"]
            assert p["n"] == 2 and len(p["ci95"]) == 2
    # step-1 checkpoints were evaluated on val by the study, the final (step 2) by the ablation runner
    assert (part / "val-steps" / "kd-cos-lr0.001" / "seed-2" / "step-000001" / "report.json").is_file()
    assert (part / "eval" / "kd-cos-lr0.001" / "seed-2" / "report.json").is_file()
    toml = (part / "ablation.toml").read_text()
    assert 'loss = "cosine"' in toml and "keep_last = 3" in toml and "seeds = [1, 2]" in toml
    md = (out / "report.md").read_text()
    assert "## Part perception-4" in md and "| kd-cos |" in md and "`multi-agp`" in md  # the parts left, with commands
    assert "multi-agp" in study["parts_pending"] and "perception-4" not in study["parts_pending"]

    # Rerun: every job and evaluation is found done; nothing trains again.
    from drivekd.trainer import loop

    monkeypatch.setattr(loop, "train", lambda cfg: pytest.fail("a finished job was trained again"))
    res = CliRunner().invoke(vs.main, [*args, "--part", "perception-4"])
    assert res.exit_code == 0, res.output
    state = json.loads((part / "state" / "ce-lr0.001.seed-1.json").read_text())
    assert state["train_calls"] == 1 and state["status"] == "done"


def test_a_changed_choice_after_heldout_is_refused(tmp_path):
    plan = vs.Plan(sizes=(4,), multi_samples=6, lrs=(1e-3,), seeds=(1, 2), steps=2, save_every=1, micro_batch=2)
    paths = vs.Paths(tmp_path)
    part = plan.parts["perception-4"]
    for seed, (a, b) in {1: (50.0, 60.0), 2: (50.0, 60.0)}.items():
        for step, score in ((1, a), (2, b)):
            d = paths.val_step(part.name, "ce-lr0.001", seed, step)
            d.mkdir(parents=True)
            (d / "report.json").write_text(json.dumps({"capabilities": {"perception": {"score": score}}}))
    paths.choice(part.name, "ce").parent.mkdir(parents=True)
    paths.choice(part.name, "ce").write_text(json.dumps({"lr": 1e-3, "step": 1, "seeds": [1, 2]}))
    with pytest.raises(ConfigError, match="held-out is looked at once"):
        vs.choose_and_test(plan, part, "ce", paths, None, heldout_data=tmp_path, benchmark=tmp_path, max_new_tokens=4,
                           eval_batch_size=2)


def test_unknown_part_or_lr_is_refused(tmp_path):
    plan = vs.Plan(sizes=(4,), multi_samples=6, lrs=(1e-3,), seeds=(1,), steps=1, save_every=1, micro_batch=1)
    for part, msg in (("perception-5", "no such part"), ("perception-4@0.5", "not in --lrs")):
        with pytest.raises(ConfigError, match=msg):
            vs.run_study(tmp_path, None, tmp_path, tmp_path / "s", plan, [part])


def test_overlapping_splits_are_refused(tiny_models, benchmark, tmp_path):
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    (leaky / "images").symlink_to(benchmark / "images")
    (leaky / "train.json").write_text((benchmark / "train.json").read_text())
    (leaky / "val.json").write_text((benchmark / "val_drivebench.json").read_text())
    train = json.loads((benchmark / "train.json").read_text())
    (leaky / "heldout.json").write_text(json.dumps(train[:2]))  # held-out questions on training images
    plan = vs.Plan(sizes=(2,), multi_samples=6, lrs=(1e-3,), seeds=(1,), steps=1, save_every=1, micro_batch=1)
    with pytest.raises(ConfigError, match="heldout split shares .* image\\(s\\) with train"):
        vs.prepare(tiny_models / "internvl-teacher", tiny_models / "internvl-student", leaky, tmp_path / "s", plan)
