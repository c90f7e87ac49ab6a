"""config.json folders (no weights) of the paper's models, for the planner's tests and table.

Used until configs/models/<name>/ (the published configs, with sources) lands on main; these repeat
the published hyper-parameters that fix every tensor shape (the planner reads nothing else).
"""

from __future__ import annotations

from pathlib import Path

INTERNVL_VISION = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       image_size=[448, 448], patch_size=[14, 14])
QWEN_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
MODELS = {
    "InternVL3-1B-hf": ("internvl", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                         num_key_value_heads=2, vocab_size=151674, tie_word_embeddings=True)),
    "InternVL3-8B-hf": ("internvl", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                         num_key_value_heads=4, vocab_size=151674, tie_word_embeddings=False)),
    "Qwen2.5-VL-3B-Instruct": ("qwen2_5_vl", dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                                  num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                                                  tie_word_embeddings=True)),
    "Qwen2.5-VL-7B-Instruct": ("qwen2_5_vl", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                                  num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                                  tie_word_embeddings=False)),
}


def write_config(name: str, root: Path) -> Path:
    """root/name/config.json for one of MODELS; returns the folder."""
    from transformers import InternVLConfig, Qwen2_5_VLConfig

    family, text = MODELS[name]
    out = Path(root) / name
    out.mkdir(parents=True, exist_ok=True)
    tie = text["tie_word_embeddings"]
    if family == "internvl":
        cfg = InternVLConfig(text_config=dict(model_type="qwen2", max_position_embeddings=32768, rope_theta=1e6, **text),
                             vision_config=INTERNVL_VISION, image_token_id=151667, image_seq_length=256,
                             downsample_ratio=0.5, tie_word_embeddings=tie)
    else:
        cfg = Qwen2_5_VLConfig(
            text_config=dict(max_position_embeddings=128000,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}, **text),
            vision_config=dict(out_hidden_size=text["hidden_size"], **QWEN_VISION),
            image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
            tie_word_embeddings=tie)
    cfg.save_pretrained(out)
    return out
