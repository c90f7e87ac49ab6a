"""User image settings ([images] / image flags): validation, token counts, and the store check."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from drivekd.data.sample import Sample
from drivekd.errors import AlignmentError, ConfigError
from drivekd.families import Family, InternVLFamily, Qwen25VLFamily, family_class
from drivekd.images import ImageSettings

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


# ----------------------------------------------------------------------------- the settings object


@pytest.mark.parametrize("kw, named", [
    (dict(max_patches=0), "--max-patches"),
    (dict(min_pixels="big"), "--min-pixels"),
    (dict(max_pixels=100), "--max-pixels"),
    (dict(tiling="no"), "--tiling"),
    (dict(tiling=False, max_patches=4), "--no-tiling with --max-patches 4"),
    (dict(min_pixels=5000, max_pixels=4000), "--min-pixels 5000 is above --max-pixels 4000"),
])
def test_bad_settings_name_the_flag(kw, named):
    with pytest.raises(ConfigError, match=named):
        ImageSettings(**kw)


def test_table_and_flags_merge_flags_win():
    cfg = {"images": {"tiling": True, "max_patches": 6}, "_path": "drivekd.toml"}
    s = ImageSettings.from_sources({"max_patches": 2, "min_pixels": None}, cfg)
    assert s == ImageSettings(tiling=True, max_patches=2)
    with pytest.raises(ConfigError, match=r"drivekd.toml: unknown key\(s\) in \[images\]: max_tiles"):
        ImageSettings.from_sources({}, {"images": {"max_tiles": 2}, "_path": "drivekd.toml"})


def test_setting_of_the_other_family_is_refused():
    with pytest.raises(ConfigError, match="--max-pixels.*applies to Qwen2.5-VL models, but this model is InternVL"):
        InternVLFamily.processor_overrides(ImageSettings(max_pixels=200704))
    with pytest.raises(ConfigError, match="--no-tiling|--tiling"):
        Qwen25VLFamily.processor_overrides(ImageSettings(tiling=False))


def test_each_family_owns_its_settings():
    """Every [images] key belongs to exactly one family, and a family's own settings become its
    processor's arguments (no tiling = one tile)."""
    owners = {k: [c.name for c in (InternVLFamily, Qwen25VLFamily) if k in c.image_keys] for k in ImageSettings.keys()}
    assert all(len(v) == 1 for v in owners.values()), owners
    assert InternVLFamily.processor_overrides(ImageSettings(tiling=False)) == {"max_patches": 1}
    assert InternVLFamily.processor_overrides(ImageSettings(max_patches=4)) == {"max_patches": 4}
    assert Qwen25VLFamily.processor_overrides(ImageSettings(min_pixels=3136, max_pixels=200704)) == \
        {"min_pixels": 3136, "max_pixels": 200704}
    assert Qwen25VLFamily.processor_overrides({"max_pixels": 5}) == {"max_pixels": 5}  # raw kwargs pass through


# ----------------------------------------------------------------------------- token counts


@pytest.fixture(scope="module")
def wide_sample(tmp_path_factory):
    """A 1600x900 camera image (nuScenes size), one sample."""
    d = tmp_path_factory.mktemp("cam")
    p = d / "cam.jpg"
    Image.new("RGB", (1600, 900), (90, 120, 150)).save(p)
    return Sample(id="s0", capability="perception", images=(p,), question="What is ahead?", answer="A car.")


def _encoded_vision(folder, settings, sample) -> int:
    fam = Family.from_pretrained(folder, image_processing=settings)
    _, lay = fam.encode(sample)
    return int(lay.vision.sum())


@pytest.mark.parametrize("family, settings, expected", [
    # tiny InternVL: 64-px tiles of 16 tokens, max_patches 2 -> 2 tiles + thumbnail for a wide image
    ("internvl", None, 48),
    ("internvl", ImageSettings(tiling=False), 16),
    ("internvl", ImageSettings(max_patches=1), 16),
    # tiny Qwen: max_pixels 28*28*1024 by default; capped at 16 tokens -> at most 16
    ("qwen2_5_vl", None, 966),  # 46 x 84 patches / 4
    ("qwen2_5_vl", ImageSettings(max_pixels=28 * 28 * 16), 10),  # 4 x 10 patches / 4
])
def test_settings_change_the_token_count(tiny_models, wide_sample, family, settings, expected):
    folder = tiny_models / f"{family}-student"
    n = _encoded_vision(folder, settings, wide_sample)
    assert n == expected
    # the tokenizer-free arithmetic the planner uses agrees with the real processor
    assert family_class(family).image_tokens(folder, settings, (1600, 900)) == n


def test_real_configs_token_counts():
    """Published settings vs the recommended six-camera ones (configs/models/README.md)."""
    internvl = CONFIGS / "InternVL3-1B-hf"
    assert InternVLFamily.image_tokens(internvl) == 2304  # 8 tiles + thumbnail, 256 each
    assert InternVLFamily.image_tokens(internvl, ImageSettings(tiling=False)) == 256
    assert InternVLFamily.image_tokens(internvl, ImageSettings(max_patches=4)) == 3 * 256  # 2 x 1 tiles + thumbnail
    qwen = CONFIGS / "Qwen2.5-VL-3B-Instruct"
    assert Qwen25VLFamily.image_tokens(qwen) == 1824
    assert Qwen25VLFamily.image_tokens(qwen, ImageSettings(max_pixels=200704)) == 231


def test_settings_change_the_processor_fingerprint(tiny_models):
    folder = tiny_models / "internvl-student"
    a = Family.from_pretrained(folder)
    b = Family.from_pretrained(folder, image_processing=ImageSettings(tiling=False))
    assert a.fingerprint() != b.fingerprint()
    assert a.image_settings()["max_patches"] == 2 and b.image_settings() == {"tiling": False, "max_patches": 1, "tile_size": [64, 64]}


# ----------------------------------------------------------------------------- cache -> train


@pytest.fixture(scope="module")
def no_tiling_store(tiny_models, demo_data, tmp_path_factory):
    """A perception store built by the CLI with --no-tiling, on three demo samples."""
    from drivekd.cli.cache import main

    recs = json.loads((demo_data / "train.json").read_text())
    recs = [r for r in recs if r.get("question_type", r.get("type")) == "perception"][:3] or recs[:3]
    for r in recs:
        r["question_type"] = "perception"
        r["images"] = [str(demo_data / p) for p in r["images"]]
    d = tmp_path_factory.mktemp("imgstore")
    (d / "train.json").write_text(json.dumps(recs))
    res = CliRunner().invoke(main, [
        "build", "--teacher", "perception", "--model", str(tiny_models / "internvl-teacher"), "--data", str(d / "train.json"),
        "--out", str(d / "cache"), "--device", "cpu", "--no-progress", "--no-tiling",
    ])
    assert res.exit_code == 0, res.output
    return d


def test_store_records_the_settings(no_tiling_store):
    from drivekd.store import TeacherStore

    meta = TeacherStore(no_tiling_store / "cache").role_meta("perception")
    assert meta["image_settings"] == {"tiling": False, "max_patches": 1, "tile_size": [64, 64]}


def test_train_with_other_settings_is_refused_naming_them(tiny_models, no_tiling_store, tmp_path):
    from drivekd.trainer.plan import validate
    from drivekd.trainer.settings import TrainConfig, config_from_sources

    base = dict(student=str(tiny_models / "internvl-student"), data=str(no_tiling_store / "train.json"),
                cache=str(no_tiling_store / "cache"), out=str(tmp_path / "run"), recipe="perception")
    with pytest.raises(AlignmentError, match=r"--max-patches \(\[images\].max_patches\): the perception store's 1, this run 2"):
        validate(TrainConfig.from_dict(base))
    # the same settings from the [images] table of drivekd.toml: accepted
    toml = tmp_path / "drivekd.toml"
    toml.write_text("[images]\ntiling = false\n")
    cfg = config_from_sources(base, toml)
    assert cfg.image_settings == ImageSettings(tiling=False)
    plan = validate(cfg)
    assert plan.samples
    # or from the flag (max_patches = 1 is the same effective setting)
    assert validate(config_from_sources({**base, "max_patches": 1})).samples


def test_train_cli_flag_reaches_the_check(tiny_models, no_tiling_store, tmp_path):
    from drivekd.cli.train import main

    args = ["--student", str(tiny_models / "internvl-student"), "--data", str(no_tiling_store / "train.json"),
            "--cache", str(no_tiling_store / "cache"), "--out", str(tmp_path / "run"), "--recipe", "perception",
            "--max-patches", "2", "--max-steps", "1", "--num-workers", "0", "--no-progress"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "--max-patches ([images].max_patches): the perception store's 1, this run 2" in res.output
