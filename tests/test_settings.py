"""Settings check themselves when built; the CLI is derived from them; config tables are checked."""

from dataclasses import fields, replace

import pytest
import torch
from click.testing import CliRunner

from drivekd.config import load_config
from drivekd.errors import ConfigError
from drivekd.layers import LayerSpecError, check_spec, recipe_layers, resolve_layers, spec_of
from drivekd.trainer.settings import TrainConfig, config_from_sources, flag


@pytest.mark.parametrize("kw,message", [
    (dict(lr=0), "--lr must be > 0"),
    (dict(grad_accum=0), "--grad-accum must be > 0"),
    (dict(grad_accum=1.5), "--grad-accum must be an integer"),
    (dict(w_planning=-1), "--w-planning must be >= 0"),
    (dict(projection="pcgrad"), "--projection must be one of agp, g1, g2, none"),
    (dict(warmup_ratio=1.0), "--warmup-ratio must be in"),
    (dict(lr=float("nan")), "--lr must be a finite number"),
    (dict(dynamic_weights="yes"), "--dynamic-weights must be true or false"),
    (dict(resume=True, resume_from="x"), "--resume"),
    (dict(device="tpu"), "--device must be auto, cpu or cuda"),
])
def test_an_invalid_config_cannot_be_built(kw, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kw)
    with pytest.raises(ConfigError, match=message):  # replace() re-checks too
        replace(TrainConfig(), **kw)


def test_paths_become_paths_and_defaults_are_valid():
    cfg = TrainConfig(student="a", data="b.json")
    assert cfg.student.name == "a" and cfg.data.suffix == ".json"
    assert TrainConfig().to_json()["recipe"] == "multi"


def test_every_setting_is_a_flag_with_its_default_and_help():
    from drivekd.cli.train import main

    by_name = {p.name: p for p in main.params}
    for f in fields(TrainConfig):
        if not f.metadata.get("cli", True):  # image_settings: its own flags (drivekd.images)
            assert {"tiling", "max_patches", "min_pixels", "max_pixels"} <= set(by_name)
            continue
        assert f.name in by_name, f"{f.name} has no CLI option"
        assert flag(f.name) in by_name[f.name].opts[0] or by_name[f.name].opts[0].startswith(flag(f.name))
    out = CliRunner().invoke(main, ["--help"], terminal_width=200).output
    assert "Distillation options" in out and "Optimisation options" in out
    assert "[default: 5e-05]" in out and "[default: agp]" in out  # defaults come from TrainConfig


def test_toml_tables_are_checked_and_paths_resolved(tmp_path):
    p = tmp_path / "drivekd.toml"
    p.write_text('[cache]\nout = "c"\nkeep_bits = 6\n')
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in \[cache\]: keep_bits"):
        load_config(p)
    p.write_text('[teachers]\nperceptoin = "t"\n')
    with pytest.raises(ConfigError, match=r"\[teachers\]: perceptoin"):
        load_config(p)
    p.write_text('[data]\ntrain = "d/train.json"\n[cache]\nout = "c"\n[train]\nstudent = "s"\nlr = 1e-3\n')
    cfg = config_from_sources({"lr": 2e-3}, p)
    assert cfg.lr == 2e-3 and cfg.student == tmp_path / "s"
    assert cfg.data == tmp_path / "d" / "train.json" and cfg.cache == tmp_path / "c"
    p.write_text("[train]\nlearning_rate = 1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        config_from_sources({}, p)


def test_one_layer_grammar():
    assert resolve_layers("0..L-2", 6) == [0, 1, 2, 3, 4] == recipe_layers("reasoning", 6)
    assert resolve_layers(spec_of([0, 3]), 6) == [0, 3] and resolve_layers(spec_of("L-2"), 6) == [4]
    assert recipe_layers("planning", 28) == [26] and recipe_layers("perception", 28) == [0]
    for bad in ("0-26", "x", "", "1..y"):
        with pytest.raises(LayerSpecError):
            check_spec(bad)


def test_cache_build_takes_the_trainer_layer_grammar(tiny_models, demo_data, tmp_path):
    """`drivekd-cache build --layers L-2` resolves against the teacher's depth (it crashed with a
    traceback before: the cache parsed '0-26'); a bad spec is refused naming --layers."""
    import json

    from drivekd.cli.cache import main as cache_cli
    from drivekd.store import TeacherStore

    recs = [r for r in json.loads((demo_data / "train.json").read_text()) if len(r["images"]) == 1][:1]
    data = tmp_path / "one.json"
    data.write_text(json.dumps(recs))
    base = ["build", "--teacher", "planning", "--model", str(tiny_models / "internvl-teacher"), "--data", str(data),
            "--images", str(demo_data), "--no-progress", "--device", "cpu"]
    r = CliRunner().invoke(cache_cli, [*base, "--out", str(tmp_path / "c"), "--layers", "L-2,0..1"])
    assert r.exit_code == 0, r.output
    L = json.loads((tiny_models / "internvl-teacher" / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert TeacherStore(tmp_path / "c").role_info("planning").layers == (0, 1, L - 2)
    r = CliRunner().invoke(cache_cli, [*base, "--out", str(tmp_path / "d"), "--layers", "0-26"])
    assert r.exit_code == 2 and "--layers" in r.output and "Traceback" not in r.output, r.output


def test_mixing_rows_are_normalised_like_the_reference():
    from drivekd.trainer.plan import parse_mix

    m = parse_mix("8,1,1;1,8,1;2,2,16")
    assert torch.allclose(m.sum(1), torch.ones(3))
    assert torch.allclose(m[0], torch.tensor([0.8, 0.1, 0.1]))
    with pytest.raises(ConfigError, match="--mix: the reasoning row is all zeros"):
        parse_mix("1,0,0;0,0,0;0,0,1")


def test_no_clipping_by_default_as_the_paper():
    # AGP sums ~K-1 copies of the CE gradient: a 1.0 default clipped every step.
    assert TrainConfig().max_grad_norm == 0.0
    with pytest.raises(ConfigError, match="--split applies to --recipe sft"):
        TrainConfig(recipe="multi", split="planning")
