"""The teacher-term registry (drivekd.terms): recipes and kinds agree, and the paths the registry
made shared (a store-signal term choosing its role, layer flags with no term to read them, one
owner of trainable state) behave as the trainer's checks did before."""

from types import SimpleNamespace

import pytest

from drivekd import terms
from drivekd.errors import ConfigError, DriveKDError
from drivekd.losses.recipes import TermPlan
from drivekd.roles import ROLES
from drivekd.store.memory import InMemoryTargets
from drivekd.store.targets import RoleInfo
from drivekd.trainer.settings import RECIPES, TrainConfig


def test_every_recipe_is_made_of_registered_kinds():
    assert RECIPES == tuple(terms.RECIPES)  # --recipe's choices are the registry's
    assert RECIPES[:7] == (*ROLES, "multi", "sft", "kl", "hidden")  # a new kind's recipe comes after these
    names = [t.name for t in terms.TERMS]
    assert len(set(names)) == len(names)
    for r in terms.RECIPES.values():
        assert all(n in names for n in r.terms), r
    signals = [s for t in terms.TERMS for s in t.signals]
    assert len(set(signals)) == len(signals)  # a resolved term has one kind
    for t in terms.TERMS:
        assert all(terms.term_of(TermPlan("planning", s, "mse", ())) is t for s in t.signals)
    assert terms.recipe("multi").mixes and terms.recipe("planning").split == "planning"
    assert terms.flag_recipes("split_flag")[:3] == ["sft", "kl", "hidden"]
    with pytest.raises(KeyError, match="recipes are perception"):
        terms.recipe("nope")


def _source(**hidden_layers):
    infos = {r: RoleInfo(r, (0, 4), 6, "t", "internvl", "p",
                         signals={"hidden": {"layers": ls, "hidden_size": 96}, "logits": {}}) for r, ls in hidden_layers.items()}
    return InMemoryTargets(infos, {})


@pytest.mark.parametrize("layers,role", [("L-2", "planning"), ("0", "perception"), (None, "perception")])
def test_hidden_term_reads_the_first_role_storing_its_layers(layers, role):
    cfg = TrainConfig(recipe="hidden", layers=layers)
    src = _source(perception=[0], planning=[4])
    assert terms.HIDDEN.roles(cfg, terms.recipe("hidden"), src, 4) == [role]
    # No role stores layer 1: the first holding the signal, whose resolution then names the layers.
    cfg = TrainConfig(recipe="hidden", layers="1")
    role = terms.HIDDEN.roles(cfg, terms.recipe("hidden"), src, 4)
    assert role == ["perception"]
    with pytest.raises(ConfigError, match=r"hidden states of layers \[1\].*perception role holds only \[0\]"):
        terms.HIDDEN.resolve(cfg, role, {"perception": src.role_info("perception")}, 4)


def test_store_signal_term_role_errors_name_the_flag():
    src = _source(perception=[0])
    kl = terms.recipe("kl")
    assert terms.LOGITS.roles(TrainConfig(recipe="kl"), kl, src, 4) == ["perception"]
    with pytest.raises(ConfigError, match="--teacher-role planning: the store has no such role"):
        terms.LOGITS.roles(TrainConfig(recipe="kl", teacher_role="planning"), kl, src, 4)
    empty = InMemoryTargets({"planning": RoleInfo("planning", (0,), 6, "t", "internvl", "p")}, {})
    with pytest.raises(ConfigError, match="--teacher-role planning: its store role holds no logits"):
        terms.LOGITS.roles(TrainConfig(recipe="kl", teacher_role="planning"), kl, empty, 4)
    with pytest.raises(ConfigError, match="--recipe kl reads the teacher's logits.*--signals logits"):
        terms.LOGITS.roles(TrainConfig(recipe="kl"), kl, empty, 4)
    with pytest.raises(ConfigError, match="--recipe kl compares next-token distributions"):
        terms.LOGITS.resolve(TrainConfig(recipe="kl", mid_range="mid2"), ["perception"], {}, 4)


@pytest.mark.parametrize("kw,match", [
    (dict(recipe="sft", mid_range="mid2"), "--mid-range applies to the reasoning term; recipe 'sft' has none"),
    (dict(recipe="kl", w_kd=0.0, layers="perception=0"), "--layers 'perception=0': role 'perception' is not a teacher term"),
    (dict(recipe="multi", w_perception=0.0, w_reasoning=0.0, w_planning=0.0, mid_range="mid2"), "--mid-range applies"),
])
def test_layer_flags_with_no_term_to_read_them_are_refused(tiny_models, demo_data, tmp_path, kw, match):
    """A run with no teacher term on (CE only) refuses --layers / --mid-range, without a store."""
    from drivekd.trainer.plan import validate

    cfg = TrainConfig(student=tiny_models / "internvl-student", data=demo_data / "train.json", out=tmp_path / "run", **kw)
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


def test_one_term_owns_trainable_state():
    from drivekd.trainer.step import hidden_projection

    model = SimpleNamespace(config=SimpleNamespace(hidden_size=64))
    term = TermPlan("planning", "hidden", "mse", ((2, (4,)),), 96, row="hidden")
    proj = hidden_projection(SimpleNamespace(terms=[term]), model, "cpu")
    assert proj.maps["2"].weight.shape == (96, 64)
    assert hidden_projection(SimpleNamespace(terms=[TermPlan("planning", "t2v", "mse", ((2, (4,)),))]), model, "cpu") is None
    with pytest.raises(DriveKDError, match="2 teacher terms own trainable state"):
        hidden_projection(SimpleNamespace(terms=[term, term]), model, "cpu")
