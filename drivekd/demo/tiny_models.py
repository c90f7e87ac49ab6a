"""Tiny, offline, deterministic teacher/student checkpoints for both families.

No model hub is reachable in tests or CI, so the test suite and `make demo` run on checkpoints
built here from configs: real HF model classes with random weights, saved with `save_pretrained`
and loaded back with the same `from_pretrained` code users run on real checkpoints.

The teacher is deeper and wider than the student, as in real pairs (InternVL3-8B -> 1B), and both
share one tokenizer, chat template and image processor, so their token sequences align.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# A byte-level tokenizer with no merges: ids 0..255 are bytes, specials follow. Small and offline,
# yet a real `PreTrainedTokenizerFast` with a chat template, like the real checkpoints'.
N_BYTES = 256
VOCAB_SIZE = 320  # room for the specials below, as real vocabularies leave room

QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]
INTERNVL_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>",
]

# Chat templates written for drivekd in the shape of each family's own: images first in the user
# turn, then the text; a default system turn. `{% generation %}` is not needed: the answer span is
# located on token ids (see families.base).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful driving assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful driving assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# (layers, hidden, heads, kv heads, intermediate) of the language model.
TEACHER_TEXT = dict(num_hidden_layers=6, hidden_size=96, num_attention_heads=6, num_key_value_heads=2, intermediate_size=192)
STUDENT_TEXT = dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)


def _byte_tokenizer(specials: list[str], chat_template: str, extra: dict):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # The alphabet is a set; sort by the byte each char stands for so ids are deterministic.
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    assert set(b2u.values()) == set(byte_chars)
    vocab = {b2u[b]: b for b in range(N_BYTES)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    # Specials get ids 256.. in list order, before the wrapper assigns eos/pad to them.
    core.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=chat_template,
        extra_special_tokens=extra,
        model_max_length=32768,
    )
    for s in specials:
        assert tok.convert_tokens_to_ids(s) < VOCAB_SIZE
    return tok


def _tok_id(tok, s: str) -> int:
    return int(tok.convert_tokens_to_ids(s))


def make_qwen2_5_vl(out: Path, role: str, seed: int = 0) -> Path:
    """Write a tiny Qwen2.5-VL checkpoint and its processor to `out`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from drivekd.families.processors import Qwen2_5_VLProcessorNoVideo

    tok = _byte_tokenizer(QWEN_SPECIALS, QWEN_CHAT_TEMPLATE, extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    text = dict(TEACHER_TEXT if role == "teacher" else STUDENT_TEXT)
    head_dim = text["hidden_size"] // text["num_attention_heads"]  # 16
    half = head_dim // 2
    # mrope_section must sum to head_dim/2: (temporal, height, width)
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE, max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            bos_token_id=_tok_id(tok, "<|endoftext|>"), eos_token_id=_tok_id(tok, "<|im_end|>"), pad_token_id=_tok_id(tok, "<|endoftext|>"),
            tie_word_embeddings=True, **text,
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
        ),
        image_token_id=_tok_id(tok, "<|image_pad|>"), video_token_id=_tok_id(tok, "<|video_pad|>"),
        vision_start_token_id=_tok_id(tok, "<|vision_start|>"), vision_end_token_id=_tok_id(tok, "<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    # 28 px = one merged token per side: a 224x112 camera view becomes 8x4 = 32 tokens, so a
    # six-camera group is ~200 vision tokens, and max_pixels lets benchmarks ask for more.
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 1024, patch_size=14, merge_size=2, temporal_patch_size=2,
    )
    proc = Qwen2_5_VLProcessorNoVideo(image_processor=image_processor, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    proc.save_pretrained(out)
    return out


def make_internvl(out: Path, role: str, seed: int = 0) -> Path:
    """Write a tiny HF-native InternVL3 checkpoint and its processor to `out`."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from drivekd.families.processors import InternVLProcessorNoVideo

    tok = _byte_tokenizer(
        INTERNVL_SPECIALS, INTERNVL_CHAT_TEMPLATE,
        extra={"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    )
    text = dict(TEACHER_TEXT if role == "teacher" else STUDENT_TEXT)
    image_size, patch = 64, 8  # (64/8)^2 = 64 patches, pixel-shuffle 0.5 -> 16 tokens per tile
    image_seq_length = int((image_size // patch) ** 2 * 0.5**2)
    cfg = InternVLConfig(
        text_config=dict(
            model_type="qwen2", vocab_size=VOCAB_SIZE, max_position_embeddings=8192,
            bos_token_id=_tok_id(tok, "<|endoftext|>"), eos_token_id=_tok_id(tok, "<|im_end|>"), pad_token_id=_tok_id(tok, "<|endoftext|>"),
            tie_word_embeddings=True, **text,
        ),
        vision_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=[image_size, image_size], patch_size=[patch, patch],
        ),
        image_token_id=_tok_id(tok, "<IMG_CONTEXT>"), image_seq_length=image_seq_length, downsample_ratio=0.5,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(cfg).eval()
    # InternVL3 tiles large images into up to max_patches 448px crops plus a thumbnail; the tiny
    # one keeps tiling on with small crops so multi-tile images are exercised too.
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size}, crop_to_patches=True, min_patches=1, max_patches=2,
    )
    proc = InternVLProcessorNoVideo(
        image_processor=image_processor, tokenizer=tok, image_seq_length=image_seq_length, chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    proc.save_pretrained(out)
    return out


BUILDERS = {"internvl": make_internvl, "qwen2_5_vl": make_qwen2_5_vl}


def make_tiny_models(out: Path, families=("internvl", "qwen2_5_vl")) -> dict[str, Path]:
    """Write `{family}-teacher` and `{family}-student` under `out`. Deterministic (fixed seeds)."""
    out = Path(out)
    written = {}
    for fam in families:
        for i, role in enumerate(("teacher", "student")):
            name = f"{fam}-{role}"
            written[name] = BUILDERS[fam](out / name, role, seed=1000 + i)
    (out / "tiny-models.json").write_text(json.dumps({k: str(v) for k, v in written.items()}, indent=2))
    return written


def graft_vision(student_dir: Path, teacher_dir: Path, out: Path) -> list[str]:
    """Copy the teacher's vision tower and the projector's LayerNorm (its input side, in the vision
    tower's width) into the student; the student's language model and projector linears stay.

    Why: real students start from a vision encoder that already knows pixels (InternVL3-1B and -8B
    share InternViT-300M), while the tiny student's was random and never trained on images, so no
    budget of CE or KD could teach it the task. Both tiny configs share the vision config (checked:
    every grafted tensor must have the same shape). Returns the names of the copied tensors.
    """
    from safetensors.torch import load_file, save_file

    student_dir, teacher_dir, out = Path(student_dir), Path(teacher_dir), Path(out)
    s = load_file(student_dir / "model.safetensors")
    t = load_file(teacher_dir / "model.safetensors")
    names = sorted(k for k in s if k.startswith("vision_tower.") or k.startswith("multi_modal_projector.layer_norm."))
    for k in names:
        if k not in t or t[k].shape != s[k].shape:
            raise ValueError(f"cannot graft {k}: the teacher's is {tuple(t[k].shape) if k in t else 'missing'}, "
                             f"the student's {tuple(s[k].shape)}; the two vision configs must be the same")
        s[k] = t[k].clone()
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != student_dir.resolve():
        for f in student_dir.iterdir():
            if f.is_file() and f.name != "model.safetensors":
                (out / f.name).write_bytes(f.read_bytes())
    save_file(s, str(out / "model.safetensors"), metadata={"format": "pt"})
    return names
