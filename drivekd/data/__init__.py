"""Data: the Sample type, loaders for the Drive-KD and DriveBench formats, synthetic demo data.

The demo generator (`drivekd.data.demo.make_demo_data`) is imported from its module, so importing
this package stays light.
"""

from drivekd.data.loaders import (
    CAPABILITY_ALIASES,
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
