"""Checkpoint traps caught at load: a silently tied InternVL head, a checkpoint transformers refuses
to build, a folder without a chat template or image settings."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from drivekd.errors import ModelError
from drivekd.families import Family, load_model
from drivekd.families.base import model_config


def _hf_conversion_untied(tiny_models, out):
    """A tiny InternVL checkpoint written like the `-hf` conversions: untied head (its own lm_head
    weights), `tie_word_embeddings: false` in text_config and nothing at the top level."""
    from transformers import InternVLForConditionalGeneration

    shutil.copytree(tiny_models / "internvl-student", out)
    config = model_config(out)
    config.tie_word_embeddings = False
    config.text_config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config)
    with torch.no_grad():
        model.lm_head.weight.normal_()  # unlike the embeddings
    model.save_pretrained(out, safe_serialization=True)
    raw = json.loads((out / "config.json").read_text())
    del raw["tie_word_embeddings"]
    assert raw["text_config"]["tie_word_embeddings"] is False
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    return out, model.lm_head.weight.detach().clone()


def test_silently_untied_internvl_head_is_loaded_untied(tiny_models, tmp_path, caplog):
    from transformers import AutoConfig

    folder, head = _hf_conversion_untied(tiny_models, tmp_path / "ckpt")
    assert AutoConfig.from_pretrained(folder).tie_word_embeddings  # the trap: transformers alone would tie it
    with caplog.at_level(logging.WARNING, logger="drivekd.families.base"):
        model = load_model(folder)
    lines = [r.getMessage() for r in caplog.records if "untied" in r.getMessage()]
    assert len(lines) == 1 and str(folder) in lines[0]
    assert model.config.tie_word_embeddings is False
    emb = model.get_input_embeddings().weight
    assert model.lm_head.weight.data_ptr() != emb.data_ptr()
    assert torch.equal(model.lm_head.weight, head) and not torch.equal(head, emb)
    assert model_config(folder).tie_word_embeddings is False  # the planner's config agrees
    # Saved again (a run's final/), the file now states it at the top level.
    model.save_pretrained(tmp_path / "again", safe_serialization=True)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["tie_word_embeddings"] is False
    assert any("lm_head" in k for k in load_file(str(tmp_path / "again" / "model.safetensors")))


def test_a_tied_checkpoint_is_left_alone(tiny_models, caplog):
    with caplog.at_level(logging.WARNING, logger="drivekd.families.base"):
        model = load_model(tiny_models / "internvl-student")
    assert model.config.tie_word_embeddings is True and not caplog.records


def test_a_checkpoint_transformers_refuses_names_folder_and_reason(tiny_models, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(tiny_models / "qwen2_5_vl-student", folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["text_config"]["hidden_size"] = 48  # the weights are 64 wide
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match=r"bad: transformers cannot build this checkpoint \(its weights' shapes do not match"):
        load_model(folder)


def test_a_pad_id_outside_the_embedding_is_one_error(tiny_models, tmp_path):
    # Once transformers' `AssertionError: Padding_idx must be within num_embeddings` came through raw.
    folder = tmp_path / "padded"
    shutil.copytree(tiny_models / "internvl-student", folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["text_config"]["pad_token_id"] = raw["text_config"]["vocab_size"] + 7
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match=r"padded: transformers cannot build this checkpoint"):
        load_model(folder)


def test_missing_chat_template_and_image_settings_are_named(tiny_models, tmp_path):
    no_template = tmp_path / "no-template"
    shutil.copytree(tiny_models / "internvl-student", no_template)
    (no_template / "chat_template.jinja").unlink()
    for name in ("processor_config.json", "tokenizer_config.json"):
        cfg = json.loads((no_template / name).read_text())
        cfg.pop("chat_template", None)
        (no_template / name).write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="no-template: no chat template"):
        Family.from_pretrained(no_template)

    no_images = tmp_path / "no-images"
    shutil.copytree(tiny_models / "qwen2_5_vl-student", no_images)
    for name in ("processor_config.json", "preprocessor_config.json"):
        (no_images / name).unlink(missing_ok=True)
    with pytest.raises(ModelError, match="no-images: no image-processor settings"):
        Family.from_pretrained(no_images)
