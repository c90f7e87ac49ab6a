"""DriveBench-style evaluation: letter parsing, scores, LLM judge, predictions files, reports; and the
DriveLM / RoboSense challenges' submission layouts (`formats`) and scores (`challenge`, `language`).

Nothing here loads a model; generation lives in `drivekd.eval.generate`. Importing this package
is cheap (no torch, no matplotlib).
"""

from drivekd.eval.parse import extract_choice, options_in_question
from drivekd.eval.score import CAPABILITIES, capability_of, record_id, score_predictions

__all__ = ["CAPABILITIES", "capability_of", "extract_choice", "options_in_question", "record_id", "score_predictions"]
