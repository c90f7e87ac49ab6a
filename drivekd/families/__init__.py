"""Model families (HF-native InternVL3 and Qwen2.5-VL): loading, inputs, attention capture."""

from drivekd.families.base import (
    FAMILIES,
    Family,
    ModelInputs,
    TokenLayout,
    check_same_family,
    detect_family,
    load_model,
    token_fingerprint,
)
from drivekd.families.capture import capture_attention, head_mean_attention, num_decoder_layers

__all__ = [
    "FAMILIES", "Family", "ModelInputs", "TokenLayout", "capture_attention", "check_same_family",
    "detect_family", "head_mean_attention", "load_model", "num_decoder_layers", "token_fingerprint",
]
