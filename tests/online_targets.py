"""Test helper: the tiny teachers' layers per role. Targets computed on the fly come from the
package (drivekd.teacher.online.compute_targets), re-exported here for the tests that import it."""

from drivekd.teacher.online import compute_targets  # noqa: F401 - re-exported for the tests

# The tiny teachers have 6 decoder layers: perception reads layer 0, reasoning 0..L-2, planning L-2.
TEACHER_LAYERS = {"perception": [0], "reasoning": [0, 1, 2, 3, 4], "planning": [4]}
