"""Model families: selected-layer attention capture vs eager, token layouts, loading errors."""

import json
from pathlib import Path

import pytest
import torch

from drivekd.data.sample import Sample
from drivekd.errors import ModelError
from drivekd.families import Family, capture_attention, detect_family, load_model, num_decoder_layers

FAMILIES = ["qwen2_5_vl", "internvl"]



def _eager_head_mean(model_dir, inputs, grad=False):
    m = load_model(model_dir, capture=False, attn="eager")
    with torch.set_grad_enabled(grad):
        out = m(**inputs.tensors, output_attentions=True)
    return m, [a.float().mean(1) for a in out.attentions]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_capture_equals_eager_on_padded_batch(tiny_models, padded_pair, family, side):
    path = tiny_models / f"{family}-teacher"
    fam = Family.from_pretrained(path)
    inputs = fam.build_inputs(list(padded_pair), padding_side=side)
    am = inputs.tensors["attention_mask"].bool()
    assert not am.all(), "the batch must contain padding"
    model = load_model(path)
    L = num_decoder_layers(model)
    selected = [0, L - 2]
    with torch.no_grad(), capture_attention(model, selected, attention_mask=am) as maps:
        out = model(**inputs.tensors)
    # Only the selected layers' maps are held.
    assert sorted(maps) == selected
    _, ref = _eager_head_mean(path, inputs)
    valid = am[:, :, None] & am[:, None, :]
    for layer in selected:
        assert maps[layer].shape == (2, am.shape[1], am.shape[1])
        diff = ((maps[layer] - ref[layer]).abs() * valid).max().item()
        assert diff < 1e-5, (layer, diff)
        # Padding query rows carry no signal; valid rows sum to one over keys.
        assert maps[layer][~am].abs().max().item() == 0.0
        assert maps[layer].transpose(1, 2)[~am].abs().max().item() == 0.0
        assert torch.allclose(maps[layer][am].sum(-1), torch.ones(int(am.sum())), atol=1e-5)
    # Capturing does not change the model's output.
    plain = load_model(path)
    with torch.no_grad():
        logits = plain(**inputs.tensors).logits
    assert ((out.logits - logits).abs() * am[..., None]).max().item() < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_gradient_matches_eager(tiny_models, padded_pair, family):
    path = tiny_models / f"{family}-student"
    fam = Family.from_pretrained(path)
    inputs = fam.build_inputs(list(padded_pair))
    layer = 1
    w = torch.rand(inputs.tensors["input_ids"].shape[1], inputs.tensors["input_ids"].shape[1], generator=torch.Generator().manual_seed(0))
    model = load_model(path)
    am = inputs.tensors["attention_mask"].bool()
    valid = (am[:, :, None] & am[:, None, :]).float()
    with capture_attention(model, [layer], grad=True, attention_mask=am) as maps:
        model(**inputs.tensors)
    (maps[layer] * w).sum().backward()
    q = model.model.language_model.layers[layer].self_attn.q_proj.weight.grad.clone()
    eager, ref = _eager_head_mean(path, inputs, grad=True)
    (ref[layer] * w * valid).sum().backward()
    q_ref = eager.model.language_model.layers[layer].self_attn.q_proj.weight.grad
    assert q.abs().max() > 0
    torch.testing.assert_close(q, q_ref, rtol=1e-4, atol=1e-6)


def test_capture_rejects_bad_layers(tiny_models):
    model = load_model(tiny_models / "qwen2_5_vl-student")
    with pytest.raises(ValueError, match="out of range"):
        with capture_attention(model, [99]):
            pass
    eager = load_model(tiny_models / "qwen2_5_vl-student", capture=False, attn="eager")
    with pytest.raises(RuntimeError, match="capture=True"):
        with capture_attention(eager, [0]):
            pass


def _expected_vision_tokens(family, fam: Family, size=(224, 112)) -> int:
    """Per-image vision tokens computed from first principles, not from the processor's output."""
    w, h = size
    if family == "qwen2_5_vl":
        ip = fam.processor.image_processor
        unit = ip.patch_size * ip.merge_size  # 28 px per merged token; 224x112 is already a multiple
        return (w // unit) * (h // unit)
    # InternVL tiling: a 2:1 image with max_patches=2 becomes a 2x1 grid plus a thumbnail.
    return (2 + 1) * fam.processor.image_seq_length


@pytest.mark.parametrize("family", FAMILIES)
def test_token_layout(tiny_models, padded_pair, family):
    fam = Family.from_pretrained(tiny_models / f"{family}-teacher")
    a, b = padded_pair
    inputs = fam.build_inputs([a, b])
    per_image = _expected_vision_tokens(family, fam)
    for s, lay in zip((a, b), inputs.layouts):
        assert int(lay.vision.sum()) == per_image * len(s.images)
        assert fam.vision_tokens_per_image(s) == [per_image] * len(s.images)
        # Vision and text sets are disjoint; no special token in the text set.
        assert not (lay.vision & lay.text).any()
        specials = {i for i, t in fam.tokenizer.added_tokens_decoder.items() if t.special}
        assert specials and not (set(lay.input_ids[lay.text].tolist()) & specials)
        text = fam.tokenizer.decode(lay.input_ids[lay.text])
        assert s.question in text and s.answer in text and "<|" not in text
        # Answer span: the answer and the end-of-turn token, nothing of the prompt.
        labelled = lay.labels[lay.labels != -100]
        assert fam.tokenizer.decode(labelled) == s.answer + fam.tokenizer.eos_token
        assert lay.answer_start == int((lay.labels != -100).nonzero()[0])
    # Padded views line up with input_ids.
    ids = inputs.tensors["input_ids"]
    v = inputs.padded("vision")
    assert v.shape == ids.shape and (ids[v] == fam.image_token_id).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_and_student_tokens_identical(tiny_models, padded_pair, family):
    t = Family.from_pretrained(tiny_models / f"{family}-teacher")
    s = Family.from_pretrained(tiny_models / f"{family}-student")
    assert t.fingerprint() == s.fingerprint()
    for smp in padded_pair:
        assert t.encode(smp)[1].fingerprint == s.encode(smp)[1].fingerprint
    # A different image setting changes the fingerprint (it would change the tokens).
    if family == "qwen2_5_vl":
        other = Family.from_pretrained(tiny_models / f"{family}-student", image_processing={"max_pixels": 28 * 28 * 8})
        assert other.fingerprint() != t.fingerprint()


def test_generation_prompt_has_no_answer(tiny_models, padded_pair):
    fam = Family.from_pretrained(tiny_models / "internvl-student")
    inputs = fam.build_inputs(list(padded_pair), with_answer=False, padding_side="left")
    for s, lay in zip(padded_pair, inputs.layouts):
        assert (lay.labels == -100).all()
        assert s.answer not in fam.tokenizer.decode(lay.input_ids)


def test_detect_family_errors(tmp_path, tiny_models):
    assert detect_family(tiny_models / "internvl-teacher") == "internvl"
    assert detect_family(tiny_models / "qwen2_5_vl-student") == "qwen2_5_vl"
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "internvl_chat", "architectures": ["InternVLChatModel"]}))
    with pytest.raises(ModelError, match="conversion script"):
        detect_family(remote)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ModelError, match="unsupported model_type"):
        detect_family(other)
    with pytest.raises(ModelError, match="no config.json"):
        detect_family(tmp_path)
    # A folder with a config but pickled weights only is refused (safetensors only).
    pt = tmp_path / "pt"
    pt.mkdir()
    (pt / "config.json").write_text((tiny_models / "internvl-student" / "config.json").read_text())
    with pytest.raises(ModelError, match="safetensors"):
        load_model(pt)


def test_unreadable_image_names_sample(tiny_models, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    fam = Family.from_pretrained(tiny_models / "qwen2_5_vl-student")
    s = Sample("broken-1", "perception", (Path(bad),), "q?", "a.")
    from drivekd.errors import DataError

    with pytest.raises(DataError, match="broken-1.*bad.png"):
        fam.encode(s)


@pytest.mark.parametrize("family", FAMILIES)
def test_questions_on_one_image_group_process_its_images_once(tiny_models, padded_pair, family):
    """The group memo: a second question on the same images reuses the processed pixels (the image
    processor runs once), and gives exactly the tensors of a fresh, un-memoised processing."""
    a, _ = padded_pair
    q2 = Sample("s-a2", "reasoning", a.images, "Is the road clear?", "Yes.")
    fam = Family.from_pretrained(tiny_models / f"{family}-student")
    calls = []
    ip = fam.processor.image_processor
    orig = type(ip).__call__
    type(ip).__call__ = lambda self, *x, **k: calls.append(1) or orig(self, *x, **k)
    try:
        fam.encode(a)
        enc2, _ = fam.encode(q2)
    finally:
        type(ip).__call__ = orig
    assert len(calls) == 1
    fresh, _ = Family.from_pretrained(tiny_models / f"{family}-student").encode(q2)
    assert enc2.keys() == fresh.keys() and all(torch.equal(enc2[k], fresh[k]) for k in fresh)
    assert fam.processor._memo_key is None  # outside an encode nothing is memoised
