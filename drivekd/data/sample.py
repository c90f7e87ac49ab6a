"""The one sample type every part of drivekd works on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivekd.roles import CAPABILITIES  # noqa: F401  (re-exported: a Sample's capability is one of these)

# The six nuScenes cameras in the order Drive-KD lists them for a six-view sample.
CAMERA_ORDER = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT")


@dataclass(frozen=True)
class Sample:
    """One question about one image or one six-camera group.

    `question` is the user text with any `<image>` tags removed: every family places the images
    first in the user turn, in `images` order, then the question. Samples that share images thus
    share a token prefix (the prefix-shared teacher pass relies on this).
    """

    id: str  # stable, storage-safe: [A-Za-z0-9._-], never derived from list position
    capability: str  # one of CAPABILITIES
    images: tuple[Path, ...]  # resolved, ordered image paths
    question: str
    answer: str
    question_type: str = ""  # the label as written in the source (e.g. DriveBench "behavior")
    record: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # original record
    source: str = ""  # the file format: "drivekd", "drivebench", "drivelm" or "robosense"

    @property
    def group_key(self) -> tuple[str, ...]:
        """Samples with the same group key ask about the same images."""
        return tuple(str(p) for p in self.images)
