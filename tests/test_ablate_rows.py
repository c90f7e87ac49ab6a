"""Every row of the paper's Table 4 and Appendix E trains from ONE store on the demo data: the shipped
configs/ablations/demo.toml, one seed and one optimizer step per run, against a store holding the
attention maps, logits and hidden states of the tiny teacher (no row unavailable, none failed)."""

import json
from pathlib import Path

import pytest

from drivekd.ablate import load_ablation, run_ablation

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
ROOT = Path(__file__).resolve().parents[1]
# The rows the paper's Table 4 and Appendix E name: each must be one of the shipped demo file's rows.
PAPER_ROWS = {"CE", "CE + KL", "CE + Hidden (1)", "CE + Hidden (mid)", "CE + Hidden (L-2)", "Ours (single-teacher)",
              "Multi-teacher", "Multi-teacher (G1)", "Multi-teacher (G2)", "Ours (multi-teacher)"}


def test_every_table4_and_appendix_e_row_trains_from_one_store(tiny_models, demo_data, tmp_path):
    from drivekd.teacher.build import BuildConfig, build

    records = json.loads((demo_data / "train.json").read_text())
    train = [next(r for r in records if r["question_type"] == cap) for cap in ("perception", "reasoning", "planning")]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "bench.json").write_text(json.dumps(json.loads((demo_data / "drivebench.json").read_text())[:3]))
    t = tiny_models / "internvl-teacher"
    build(BuildConfig(teachers={"perception": t, "reasoning": t, "planning": t}, data=tmp_path / "train.json",
                      images=demo_data, out=tmp_path / "cache", progress=False, signals=("attention", "logits", "hidden")))
    (tmp_path / "drivekd.toml").write_text(f"""
[data]
train = "{tmp_path / 'train.json'}"
images = "{demo_data}"
eval = "{tmp_path / 'bench.json'}"

[train]
student = "{tiny_models / 'internvl-student'}"
cache = "{tmp_path / 'cache'}"
""")
    text = (ROOT / "configs" / "ablations" / "demo.toml").read_text()
    for old, new in (("seeds = [1, 2]", "seeds = [1]"), ("max_steps = 2", "max_steps = 1"), ("grad_accum = 2", "grad_accum = 1"),
                     ("save_every = 1", "save_every = 0")):
        assert old in text, f"demo.toml no longer sets {old!r}: update this test"
        text = text.replace(old, new)
    (tmp_path / "abl.toml").write_text(text)

    abl = load_ablation(tmp_path / "abl.toml", out=tmp_path / "out", project=tmp_path / "drivekd.toml")
    assert not [r.name for r in abl.runs if r.unavailable]
    rows = set(abl.rows)
    assert PAPER_ROWS <= rows, sorted(PAPER_ROWS - rows)
    assert sum(r.startswith("App. E") for r in rows) >= 4
    result = run_ablation(abl, evaluate=False)
    assert not result.failed, [(o.key, o.error) for o in result.failed]
    assert len(result.outcomes) == len(abl.runs) >= 20 and all(o.trained for o in result.outcomes)
    for run in abl.runs:
        for job in run.jobs:
            assert (abl.run_dir(job) / "final" / "model.safetensors").is_file(), job.key
