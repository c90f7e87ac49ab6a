"""Data: the Sample type and loaders for the Drive-KD, DriveBench, DriveLM and RoboSense formats.

Synthetic demo scenes live in `drivekd.demo` (a fixture, not part of the library).
"""

from drivekd.data.loaders import (
    CAPABILITY_ALIASES,
    DRIVELM_CATEGORIES,
    FORMATS,
    LoadReport,
    SkippedRecord,
    load_samples,
    load_samples_report,
    normalize_capability,
    strip_image_tags,
)
from drivekd.data.sample import CAMERA_ORDER, CAPABILITIES, Sample
from drivekd.ids import is_safe_key, safe_key

__all__ = [
    "CAMERA_ORDER",
    "CAPABILITIES",
    "CAPABILITY_ALIASES",
    "DRIVELM_CATEGORIES",
    "FORMATS",
    "LoadReport",
    "Sample",
    "SkippedRecord",
    "is_safe_key",
    "load_samples",
    "load_samples_report",
    "normalize_capability",
    "safe_key",
    "strip_image_tags",
]
