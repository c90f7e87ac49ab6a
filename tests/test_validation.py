"""Validation during training (issue 25): --eval-data / --eval-every / --eval-generate measure the
student on a held-out set, --save-best keeps the best step as best/ (drop-in, in run.json), and a
resume keeps the best-so-far."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from drivekd.data.loaders import load_samples
from drivekd.distributed import Dist
from drivekd.errors import ConfigError
from drivekd.losses.attention import answer_positions, token_ce
from drivekd.trainer import validation
from drivekd.trainer.checkpoint import STATE_PT, read_meta
from drivekd.trainer.plan import validate
from drivekd.trainer.report_to import default_report_to, installed
from drivekd.trainer.settings import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def eval_file(demo_data):
    """The demo questions as a validation set in Drive-KD format, the multiple-choice ones tagged 0 as
    DriveBench tags them: same sample ids as train.json (so the store covers them), and questions
    drivekd-eval's scorer reads as multiple choice."""
    train = json.loads((demo_data / "train.json").read_text())
    bench = json.loads((demo_data / "drivebench.json").read_text())
    recs = [dict(t, tag=[0]) if b["tag"] == [0] else t for t, b in zip(train, bench)]
    path = demo_data / "eval-tagged.json"  # beside train.json: the same image root, so the same ids
    path.write_text(json.dumps(recs))
    return path


def _cfg(tiny_models, demo_data, out, **kw):
    base = dict(student=tiny_models / "internvl-student", data=demo_data / "train.json", out=out, num_workers=0, progress=False,
                max_steps=3, grad_accum=1, micro_batch=2, save_every=1, keep_last=5, lr=1e-3, warmup_ratio=0.0, report_to="none")
    return TrainConfig(**{**base, **kw})


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# The best of eval/ce is taken as its *largest* value (--save-best-mode max) in these runs: the CE on
# the training questions falls step after step, so the best step is step 1 whatever the exact values,
# and a resume that forgot its best-so-far would pick a later step.
VAL = dict(eval_every=1, eval_generate=True, eval_max_samples=4, eval_max_new_tokens=4, save_best="eval/ce",
           save_best_mode="max")


@pytest.fixture(scope="module")
def val_run(tiny_models, demo_data, eval_file, targets, tmp_path_factory):
    from drivekd.trainer.loop import train

    out = tmp_path_factory.mktemp("val") / "run"
    train(_cfg(tiny_models, demo_data, out, eval_data=eval_file, report_to=default_report_to(), **VAL), targets)
    return out


@pytest.mark.slow
def test_validation_metrics_and_best_checkpoint_in_a_tiny_run(val_run, tiny_models, eval_file):
    from transformers import AutoModelForImageTextToText

    from drivekd.families import Family

    evals = [r for r in _records(val_run) if "eval_ce" in r]
    assert [r["step"] for r in evals] == [1, 2, 3]  # --eval-every 1 (and the last step)
    for r in evals:
        # every teacher row: the store holds their targets for these samples
        for key in ("eval_loss_perception", "eval_raw_perception", "eval_loss_reasoning", "eval_loss_planning"):
            assert r[key] > 0, key
        assert r["eval_samples"] == 12 and r["eval_generated"] == 4
        assert 0 <= r["eval_acc"] <= 100 and any(k.startswith("eval_acc_") for k in r)
    ce = [r["eval_ce"] for r in evals]
    assert ce[0] > ce[1] > ce[2]  # what the max-mode best below relies on

    if installed("tensorboard"):  # the same numbers under eval/ in TensorBoard
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(val_run / "tensorboard"), size_guidance={"scalars": 0})
        acc.Reload()
        assert [(e.step, round(e.value, 4)) for e in acc.Scalars("eval/ce")] == [(r["step"], round(r["eval_ce"], 4)) for r in evals]
        assert "eval/loss_perception" in acc.Tags()["scalars"] and "eval/acc" in acc.Tags()["scalars"]

    # drivekd-report: eval.png, and the validation and best step in summary.md
    from drivekd.trainer.runs_report import eval_keys, load_run, summary_markdown

    run = load_run(val_run)
    assert eval_keys([run])[:3] == ["eval_ce", "eval_loss_perception", "eval_raw_perception"] and "eval_acc" in eval_keys([run])
    row = next(line for line in summary_markdown([run], []).splitlines() if line.startswith("| run |") and "multi" in line)
    assert f"| {ce[0]:.4g} -> {ce[2]:.4g} | eval/ce {ce[0]:.4g} @ step 1 |" in row

    # eval_ce is the mean answer-token CE of the student after that step: recomputed from final/ (step 3)
    family = Family.from_pretrained(val_run / "final")
    model = AutoModelForImageTextToText.from_pretrained(val_run / "final", local_files_only=True).eval()
    per = []
    with torch.no_grad():
        for s in load_samples(eval_file):
            inputs = family.build_inputs([s])
            keep, tgt = answer_positions(inputs.padded("labels"))
            per.append(float(token_ce(model(**inputs.tensors, logits_to_keep=keep).logits, tgt)[0]))
    assert ce[2] == pytest.approx(sum(per) / len(per), rel=1e-4)

    # best/: the recorded step, drop-in (no optimizer state), the weights of that step's checkpoint
    facts = json.loads((val_run / "run.json").read_text())["validation"]  # what the run validates, as the banner says
    assert facts["samples"] == 12 and facts["generated"] == 4 and "eval/loss_perception" in facts["metrics"]
    best = json.loads((val_run / "run.json").read_text())["best"]
    assert best == {"metric": "eval/ce", "mode": "max", "step": 1, "value": ce[0]}
    assert (val_run / "best" / "COMPLETE").exists() and not (val_run / "best" / STATE_PT).exists()
    assert read_meta(val_run / "best")["validation"]["best"] == best
    step1 = load_file(str(val_run / "step-000001" / "model.safetensors"))
    saved = load_file(str(val_run / "best" / "model.safetensors"))
    assert saved.keys() == step1.keys() and all(torch.equal(saved[k], step1[k]) for k in step1)
    final = load_file(str(val_run / "final" / "model.safetensors"))
    assert not all(torch.equal(final[k], step1[k]) for k in step1)  # training went on after the best step
    loaded = AutoModelForImageTextToText.from_pretrained(val_run / "best", local_files_only=True).state_dict()
    want = AutoModelForImageTextToText.from_pretrained(val_run / "step-000001", local_files_only=True).state_dict()
    assert all(torch.equal(loaded[k], want[k]) for k in want)


@pytest.mark.slow
def test_validation_leaves_training_unchanged(val_run, tiny_models, demo_data, targets, tmp_path):
    """Evaluating (eval mode, generation) between steps draws no RNG and changes no weight."""
    from drivekd.trainer.loop import train

    plain = tmp_path / "plain"
    # two steps: the validation after step 1 ran between them (as after step 2 before step 3)
    train(_cfg(tiny_models, demo_data, plain, save_every=0, max_steps=2), targets)
    assert [r["step"] for r in _records(val_run) if "eval_ce" in r] == [1, 2, 3]  # it did validate after every step
    losses = [r["loss"] for r in _records(val_run) if "loss" in r]
    assert losses[:2] == [r["loss"] for r in _records(plain)]


@pytest.mark.slow
def test_resume_keeps_the_best_so_far(val_run, tiny_models, demo_data, eval_file, targets, tmp_path):
    """Killed after step 2's checkpoint (best/ of step 1 on disk): the resumed run keeps step 1 as the
    best, although its first validation (step 3) is then the only one it has measured itself."""
    from drivekd.trainer.loop import train

    run = tmp_path / "run"
    shutil.copytree(val_run, run)
    shutil.rmtree(run / "step-000003")
    shutil.rmtree(run / "final")
    assert read_meta(run / "step-000002")["validation"]["best"]["step"] == 1  # the checkpoint holds the best-so-far
    train(_cfg(tiny_models, demo_data, run, eval_data=eval_file, resume=True, **VAL), targets)
    assert json.loads((run / "run.json").read_text())["best"] == json.loads((val_run / "run.json").read_text())["best"]
    assert read_meta(run / "best")["step"] == 1
    assert [r["step"] for r in _records(run) if "eval_ce" in r] == [1, 2, 3]  # step 3 validated once, after the resume


def test_bad_save_best_metric_is_refused_by_name_before_anything_loads(tmp_path):
    from drivekd.cli.train import main

    r = CliRunner().invoke(main, ["--student", str(tmp_path / "nowhere"), "--data", str(tmp_path / "x.json"), "--out",
                                  str(tmp_path / "run"), "--eval-data", str(tmp_path / "e.json"), "--save-best", "eval/accuracy"])
    assert r.exit_code == 2 and "--save-best 'eval/accuracy': not a validation metric" in r.output, r.output
    assert "eval/acc_<capability>" in r.output
    with pytest.raises(ConfigError, match="--save-best needs --eval-data"):
        TrainConfig(save_best="eval/ce")
    with pytest.raises(ConfigError, match="add --eval-generate"):
        TrainConfig(eval_data="e.json", save_best="eval/acc_perception")
    assert validation.metric_mode("eval/acc_planning") == "max" and validation.metric_mode("eval/raw_planning") == "min"


def test_save_best_of_a_row_the_run_lacks_is_refused_before_the_student_loads(tiny_models, demo_data, eval_file, tmp_path,
                                                                             monkeypatch):
    import drivekd.trainer.loop as loop

    def no_model(*a, **k):
        raise AssertionError("the student was loaded")

    monkeypatch.setattr(loop, "load_model", no_model)
    cfg = _cfg(tiny_models, demo_data, tmp_path / "run", recipe="sft", eval_data=eval_file, save_best="eval/loss_perception")
    with pytest.raises(ConfigError, match="--save-best eval/loss_perception: this run has no perception term"):
        loop.train(cfg)


def test_teacher_rows_without_targets_for_the_eval_set_are_skipped_and_named_once(tiny_models, demo_data, targets, tmp_path):
    # drivebench.json: the same questions under DriveBench ids, which the store does not hold
    cfg = _cfg(tiny_models, demo_data, tmp_path / "run", eval_data=demo_data / "drivebench.json")
    plan = validate(cfg, targets)
    v = validation.prepare(plan, Dist("cpu"))
    assert v.terms == [] and len(v.samples) == 12
    notes = [n for n in plan.notes if n.startswith("--eval-data")]
    assert len(notes) == 1 and "eval/ce only" in notes[0] and "perception" in notes[0] and "planning" in notes[0]
    # ... and a --save-best on such a row is refused
    cfg = _cfg(tiny_models, demo_data, tmp_path / "run", eval_data=demo_data / "drivebench.json", save_best="eval/raw_planning")
    with pytest.raises(ConfigError, match="holds no planning targets"):
        validation.prepare(validate(cfg, targets), Dist("cpu"))


# 2 gloo ranks validate as one process (the eval set and the generated questions split unevenly, sums and
# counts all-reduced): tests/test_two_ranks.py::test_train_equals_one_process, whose torchrun launch
# validates as it trains (a second launch here would cost three more interpreters' imports).


# ----------------------------------------------------------------------------- drivekd-ablate: a run's checkpoint chosen on val

_ABL = """
[ablation]
eval_data = "bench.json"
{head}

[base]
student = "student"
data = "train.json"
recipe = "sft"
max_steps = 2
{base}

[[runs]]
name = "ce"
"""


def _ablation(tmp_path, head="", base="", project=False):
    from drivekd.ablate import load_ablation

    for name in ("bench.json", "val.json"):
        (tmp_path / name).write_text("[]")
    p = tmp_path / "abl.toml"
    p.write_text(_ABL.format(head=head, base=base))
    return load_ablation(p, project=project)


def test_ablation_evaluates_the_best_checkpoint_chosen_on_val(tmp_path, monkeypatch):
    import drivekd.ablate.runner as runner

    with pytest.raises(ConfigError, match=r"run 'ce': key 'save_best'.*every run needs save_best"):
        _ablation(tmp_path, head='checkpoint = "best"')
    with pytest.raises(ConfigError, match="the ablation's test set"):
        _ablation(tmp_path, head='checkpoint = "best"', base='eval_data = "bench.json"\nsave_best = "eval/ce"')
    with pytest.raises(ConfigError, match="checkpoint'.*one of final, best"):
        _ablation(tmp_path, head='checkpoint = "last"')
    # the project's [data].eval is the ablation's test set: a run does not validate on it by itself
    (tmp_path / "drivekd.toml").write_text('[data]\neval = "bench.json"\n')
    abl = _ablation(tmp_path, project=tmp_path / "drivekd.toml")
    assert abl.runs[0].jobs[0].cfg.eval_data is None
    with pytest.raises(ConfigError, match=r"--save-best needs --eval-data.*the ablation's test set, so name a validation set"):
        _ablation(tmp_path, base='save_best = "eval/ce"', project=tmp_path / "drivekd.toml")
    abl = _ablation(tmp_path, head='checkpoint = "best"', base='eval_data = "val.json"\nsave_best = "eval/ce"',
                    project=tmp_path / "drivekd.toml")
    assert abl.checkpoint == "best" and abl.runs[0].jobs[0].cfg.eval_data == (tmp_path / "val.json").resolve()

    # the runner evaluates RUN/best/ (trained runs: final/ and best/ complete)
    job = abl.runs[0].jobs[0]
    for name in ("final", "best"):
        (abl.run_dir(job) / name).mkdir(parents=True)
        (abl.run_dir(job) / name / "COMPLETE").write_text("ok\n")
    seen = []

    def fake_eval(abl_, job_, model_dir, out_dir, name):
        seen.append(model_dir.name)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.json").write_text("{}")

    monkeypatch.setattr(runner, "_evaluate", fake_eval)
    monkeypatch.setattr("drivekd.ablate.report.write_ablation_report", lambda abl: None)
    runner.run_ablation(abl)
    assert seen == ["best"]
    abl.checkpoint = "final"  # switched back: the evaluation of best/ is not reused for final/
    runner.run_ablation(abl)
    assert seen == ["best", "final"]


def test_eval_data_from_the_project_config(tmp_path):
    from drivekd.trainer.settings import config_from_sources

    (tmp_path / "drivekd.toml").write_text('[data]\ntrain = "train.json"\neval = "val.json"\n')
    cfg = config_from_sources({"save_best": "eval/ce"}, tmp_path / "drivekd.toml")
    assert cfg.eval_data == (tmp_path / "val.json").resolve() and cfg.save_best == "eval/ce"
    assert config_from_sources({"eval_every": 10}, tmp_path / "drivekd.toml").eval_data == (tmp_path / "val.json").resolve()
    assert config_from_sources({}, tmp_path / "drivekd.toml").eval_data is None  # a run that asks for no validation
    assert config_from_sources({"eval_data": "other.json"}, tmp_path / "drivekd.toml").eval_data.name == "other.json"  # the flag wins
    (tmp_path / "t.toml").write_text('[train]\neval_data = "v2.json"\neval_every = 5\n')  # [train] keys, relative to the file
    cfg = config_from_sources({}, tmp_path / "t.toml")
    assert cfg.eval_data == (tmp_path / "v2.json").resolve() and cfg.eval_every == 5


@pytest.mark.slow
def test_lora_best_checkpoint_mid_run_leaves_the_adapters_training(tiny_models, demo_data, eval_file, targets, tmp_path):
    """A LoRA run's best/ holds the merged model (and adapter/), as final/ does; writing it at step 1
    must not merge the live model, whose adapters train on (final/ at step 2 differs from best/)."""
    from drivekd.trainer.loop import train

    out = tmp_path / "run"
    res = train(_cfg(tiny_models, demo_data, out, recipe="sft", lora=True, lora_rank=4, max_steps=2, save_every=0,
                     eval_data=eval_file, eval_every=1, save_best="eval/ce", save_best_mode="max"), targets)
    assert json.loads((out / "run.json").read_text())["best"]["step"] == 1
    assert (out / "best" / "adapter" / "adapter_model.safetensors").exists()
    best, final = load_file(str(out / "best" / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    assert not any("lora" in k for k in best) and best.keys() == final.keys()
    assert not all(torch.equal(best[k], final[k]) for k in best)  # step 2 trained the adapters after best/ was written
    ce = [r["eval_ce"] for r in _records(out) if "eval_ce" in r]
    assert ce[0] != ce[1] and res.losses[0] != res.losses[1]
