"""Model families (HF-native InternVL3 and Qwen2.5-VL): loading, inputs, attention capture, and
everything else that depends on the family (image tokens, image settings, depth, layer kinds).

A family is one module (internvl.py, qwen2_5_vl.py) holding one `Family` subclass; importing it
registers the class, so this package imports every family module.
"""

from drivekd.families.base import (
    FAMILIES,
    Depth,
    Family,
    ModelInputs,
    TokenLayout,
    check_same_family,
    checkpoint_depth,
    detect_family,
    family_class,
    load_model,
    token_fingerprint,
)
from drivekd.families.capture import capture_attention, head_mean_attention, num_decoder_layers
from drivekd.families.internvl import InternVLFamily
from drivekd.families.qwen2_5_vl import Qwen25VLFamily

__all__ = [
    "FAMILIES", "Depth", "Family", "InternVLFamily", "ModelInputs", "Qwen25VLFamily", "TokenLayout", "capture_attention",
    "check_same_family", "checkpoint_depth", "detect_family", "family_class", "head_mean_attention", "load_model",
    "num_decoder_layers", "token_fingerprint",
]
