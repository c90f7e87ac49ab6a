"""Parameter-efficient students: --freeze GROUPS and --lora (peft) on the tiny models."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drivekd.errors import ConfigError
from drivekd.families import Family, load_model
from drivekd.families.base import family_class
from drivekd.trainer import trainable
from drivekd.trainer.checkpoint import list_checkpoints, load_state
from drivekd.trainer.loop import train
from drivekd.trainer.settings import TrainConfig

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tiny_models, demo_data, out, **kw):
    base = dict(student=tiny_models / "internvl-student", data=demo_data / "train.json", out=out, num_workers=0,
                progress=False, max_steps=2, grad_accum=1, micro_batch=1, save_every=0, warmup_ratio=0.0, lr=1e-2,
                recipe="multi", projection="agp", report_to="none")
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- groups (pure)


def test_group_of_longest_prefix_wins():
    pfx = family_class("internvl").param_groups
    assert trainable.group_of("model.language_model.embed_tokens.weight", pfx) == "embeddings"
    assert trainable.group_of("model.language_model.layers.0.mlp.up_proj.weight", pfx) == "language"
    assert trainable.group_of("model.multi_modal_projector.linear_1.weight", pfx) == "projector"
    pfx = family_class("qwen2_5_vl").param_groups
    assert trainable.group_of("model.visual.merger.mlp.0.weight", pfx) == "projector"
    assert trainable.group_of("model.visual.blocks.0.attn.qkv.weight", pfx) == "vision"
    assert trainable.group_of("something.else", pfx) is None


def _meta_model(config_dir: Path):
    """The real model class built from a config.json on the meta device (names only, no memory)."""
    from drivekd.families.base import detect_family
    from drivekd.planner.plan import student_config

    with torch.device("meta"):
        return family_class(detect_family(config_dir)).model_class()._from_config(student_config(config_dir))


@pytest.mark.parametrize("which", ["internvl-student", "qwen2_5_vl-student", "configs/models/InternVL3-1B-hf",
                                   "configs/models/Qwen2.5-VL-3B-Instruct"])
def test_every_parameter_has_exactly_the_expected_group(tiny_models, which):
    """Each family's groups cover every parameter of the tiny and the real models, none empty, and
    the default LoRA targets are exactly the language model's 7 projections per layer."""
    path = ROOT / which if which.startswith("configs") else tiny_models / which
    model = _meta_model(path)
    fam = family_class(model.config.model_type)
    assert tuple(fam.param_groups) == trainable.PARAM_GROUPS
    found = {}
    for name, p in model.named_parameters():
        g = trainable.group_of(name, fam.param_groups)
        assert g is not None, name
        found[g] = found.get(g, 0) + p.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert set(found) == set(trainable.PARAM_GROUPS) - ({"lm_head"} if tied else set())
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    chosen = trainable.resolve_targets(linear, list(fam.lora_targets))
    L = model.config.get_text_config().num_hidden_layers
    assert len(chosen) == 7 * L and all(n.startswith("model.language_model.layers.") for n in chosen)


def test_bare_and_glob_patterns():
    names = ["model.visual.blocks.0.mlp.up_proj", "model.language_model.layers.0.mlp.up_proj",
             "model.language_model.layers.0.self_attn.q_proj"]
    assert trainable.resolve_targets(names, ["up_proj"]) == names[:2]
    assert trainable.resolve_targets(names, ["model.language_model.*.up_proj", "q_proj"]) == names[1:]
    with pytest.raises(ConfigError, match=r"--lora-targets: 'qkv_proj' match"):
        trainable.resolve_targets(names, ["q_proj", "qkv_proj"])


def test_settings_errors_name_the_flag(tiny_models, demo_data, tmp_path):
    for kw, flag in [(dict(freeze="vision,eyes"), "--freeze"), (dict(freeze=" , "), "--freeze"),
                     (dict(lora=True, freeze="vision"), "--freeze with --lora"), (dict(lora_targets="q_proj"), "--lora-targets"),
                     (dict(lora_rank=8), "--lora-rank applies to LoRA students"),
                     (dict(lora=True, lora_rank=0), "--lora-rank"), (dict(lora=True, lora_alpha=-1.0), "--lora-alpha")]:
        with pytest.raises(ConfigError, match=flag):
            _cfg(tiny_models, demo_data, tmp_path, **kw)


def test_tied_lm_head_must_freeze_with_embeddings(tiny_models):
    model = load_model(tiny_models / "internvl-student")  # ties lm_head to the embeddings
    with pytest.raises(ConfigError, match="freeze embeddings and lm_head together"):
        trainable.freeze_groups(model, ["lm_head"])
    counts = trainable.freeze_groups(model, ["embeddings", "lm_head"])
    assert counts["embeddings"] == counts["lm_head"] == model.get_input_embeddings().weight.numel()
    assert not model.get_output_embeddings().weight.requires_grad
    with pytest.raises(ConfigError, match="every parameter of the student is frozen"):
        trainable.freeze_groups(load_model(tiny_models / "internvl-student"), list(trainable.PARAM_GROUPS))


# ----------------------------------------------------------------------------- training


def test_frozen_groups_stay_bit_identical(tiny_models, demo_data, targets, tmp_path):
    """multi + AGP with the vision tower and projector frozen: their weights come out bit-identical,
    the language model's changed, and the optimizer and gradient rows hold the trainable ones only."""
    cfg = _cfg(tiny_models, demo_data, tmp_path / "run", freeze="vision,projector", dynamic_weights=True, save_every=1)
    res = train(cfg, targets)
    assert all(math.isfinite(x) for x in res.losses)
    # By module name (the files use the checkpoint layout, not the module names).
    before = dict(load_model(tiny_models / "internvl-student").named_parameters())
    after = dict(load_model(tmp_path / "run" / "final").named_parameters())
    pfx = family_class("internvl").param_groups
    frozen = changed = 0
    for k, v in before.items():
        g = trainable.group_of(k, pfx)
        if g in ("vision", "projector"):
            assert torch.equal(v, after[k]), k
            frozen += 1
        elif not torch.equal(v, after[k]):
            changed += 1
    assert frozen > 10 and changed > 10
    state = load_state(list_checkpoints(tmp_path / "run")[-1][1])["optimizer"]
    n_trainable = sum(1 for k in before if trainable.group_of(k, pfx) not in ("vision", "projector"))
    assert len(state["state"]) == n_trainable  # AdamW state for the trainable tensors only
    # A resume restores the optimizer state of the trainable tensors and continues exactly.
    resumed = train(_cfg(tiny_models, demo_data, tmp_path / "resumed", freeze="vision,projector", dynamic_weights=True,
                         resume_from=tmp_path / "run" / "step-000001"), targets)
    assert resumed.losses == pytest.approx(res.losses[1:], rel=1e-6, abs=0)


def test_lora_without_matches_names_the_flag(tiny_models, demo_data, targets, tmp_path):
    with pytest.raises(ConfigError, match="--lora-targets: 'qkv' match"):
        train(_cfg(tiny_models, demo_data, tmp_path / "run", lora=True, lora_targets="qkv"), targets)


def _peft_logits(tiny_models, adapter: Path, inputs):
    model = trainable.from_adapter(load_model(tiny_models / "internvl-student"), adapter).eval()
    with torch.no_grad():
        return model(**inputs.tensors).logits


@pytest.mark.slow
def test_lora_multi_agp_trains_resumes_and_merges(tiny_models, demo_data, targets, samples, tmp_path):
    """A LoRA student, multi + AGP with re-weighting: the adapters learn (through CE and the
    captured attention of LoRA-wrapped layers), a resume from step 1 gives step 2 exactly (one step
    before the checkpoint and one after; was 2 of 4), step checkpoints hold only the adapter, and
    final/'s merged model equals base + adapter."""
    kw = dict(lora=True, lora_rank=4, lora_alpha=8.0, max_steps=2, save_every=1, grad_accum=2, dynamic_weights=True,
              grad_engine="rows")
    full = train(_cfg(tiny_models, demo_data, tmp_path / "full", **kw), targets)
    run = tmp_path / "full"
    # Every teacher term's gradient reached the adapters (the capture found the wrapped layers).
    for rec in full.metrics:
        assert all(v > 0 for v in rec["grad_norms"].values()), rec["grad_norms"]
    step1 = run / "step-000001"
    assert not (step1 / "model.safetensors").exists()  # the frozen base is --student, not copied per step
    adapter1 = load_file(str(step1 / trainable.ADAPTER_WEIGHTS))
    assert adapter1 and all("lora_" in k for k in adapter1)
    assert any(v.abs().max() > 0 for k, v in adapter1.items() if "lora_B" in k)  # B starts at 0: it trained

    resumed = train(_cfg(tiny_models, demo_data, tmp_path / "resumed", resume_from=step1, **kw), targets)
    assert resumed.steps == 2
    assert resumed.losses == pytest.approx(full.losses[1:], rel=1e-6, abs=0)
    a = load_file(str(run / "final" / trainable.ADAPTER_DIR / trainable.ADAPTER_WEIGHTS))
    b = load_file(str(tmp_path / "resumed" / "final" / trainable.ADAPTER_DIR / trainable.ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() == adapter1.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)

    # final/: the merged model loads like any checkpoint and gives the PeftModel's logits.
    fam = Family.from_pretrained(run / "final")
    inputs = fam.build_inputs(samples[:2])
    merged = load_model(run / "final").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(**inputs.tensors).logits
    want = _peft_logits(tiny_models, run / "final" / trainable.ADAPTER_DIR, inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    base = load_model(tiny_models / "internvl-student").eval()
    with torch.no_grad():
        assert (base(**inputs.tensors).logits - got).abs().max() > 1e-3  # the merge is not the base


def test_lora_gram_engine_trains_the_adapters(tiny_models, demo_data, targets, tmp_path):
    """The Gram engine's K-batched backward (torch.func over the trainable params) runs through the
    LoRA layers: every row's gradient reaches the adapters and B moves off its zero start."""
    res = train(_cfg(tiny_models, demo_data, tmp_path / "run", lora=True, lora_rank=4, max_steps=1, grad_accum=2,
                     dynamic_weights=True, grad_engine="gram"), targets)
    assert all(v > 0 for v in res.metrics[-1]["grad_norms"].values())
    a = load_file(str(tmp_path / "run" / "final" / trainable.ADAPTER_DIR / trainable.ADAPTER_WEIGHTS))
    assert all(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)


@pytest.mark.slow
def test_resume_refuses_other_lora_settings(tiny_models, demo_data, targets, tmp_path):
    kw = dict(lora=True, lora_rank=4, max_steps=2, save_every=1)
    train(_cfg(tiny_models, demo_data, tmp_path / "run", **kw), targets)
    with pytest.raises(ConfigError, match="--lora-rank: checkpoint 4, now 8"):
        train(_cfg(tiny_models, demo_data, tmp_path / "run", resume=True, **{**kw, "lora_rank": 8}), targets)


# ----------------------------------------------------------------------------- planner and CLI


@pytest.mark.slow
def test_planner_counts_trainable_params_only(tiny_models, tmp_path):
    """--dry-run: gradients, rows and AdamW state scale with the trainable parameters; the
    weights category still holds every weight (frozen base + adapters). On a two-layer copy of the
    tiny student's config: the point is per parameter."""
    from conftest import config_copy
    from drivekd.planner import plan as P
    from drivekd.trainer.plan import student_depth

    student = config_copy(tiny_models / "internvl-student", tmp_path / "shallow", text=2, vision=1)
    family, L = student_depth(student)
    config = P.student_config(student)
    shapes = P.shapes_for(family, config, student, 6, 512)
    for kw in (dict(freeze="vision,projector"), dict(lora=True, lora_rank=4)):
        cfg = TrainConfig(student=student, dtype="float32", recipe="multi", projection="agp", grad_engine="rows", **kw)
        c = P.count_step(cfg, P.dry_plan(cfg, L, family), shapes, config)
        model = trainable.setup(P.build_student(student, family, config), cfg)
        params = list(model.parameters())
        train_ps = [p for p in params if p.requires_grad]
        n = sum(p.numel() for p in train_ps)
        assert (c.params, c.trainable) == (sum(p.numel() for p in params), n) and n < c.params
        assert c.categories["weights"] == 4 * c.params
        assert c.categories["gradients"] == 4 * n
        assert c.categories["grad_rows"] == 4 * 4 * n  # K = 4 fp32 rows
        assert c.categories["optimizer_state"] == 8 * n + 4 * len(train_ps)


def test_cli_lora_error_is_one_line(tiny_models, demo_data, tmp_path):
    """A LoRA target matching nothing: one clear error naming the flag, no traceback (through the CLI,
    in process: an exception escaping it would be r.exception, not exit code 2)."""
    from click.testing import CliRunner

    from drivekd.cli.train import main

    r = CliRunner().invoke(main, ["--student", str(tiny_models / "internvl-student"), "--data", str(demo_data / "train.json"),
                                  "--out", str(tmp_path / "run"), "--recipe", "sft", "--lora", "--lora-targets", "nothing_here",
                                  "--max-steps", "1", "--no-progress", "--report-to", "none", "--num-workers", "0"])
    assert r.exit_code == 2, r.output[-2000:]
    assert "--lora-targets: 'nothing_here' match" in r.output and "Traceback" not in r.output, r.output[-2000:]
