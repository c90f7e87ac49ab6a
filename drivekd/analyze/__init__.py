"""`drivekd-analyze`: the paper's pre-studies (METHOD.md section 10) that choose signals and layers.

measure.py    what one sample's forward contributes (pure functions + the forward)
sampling.py   the sampled set; question rewordings (`rewording_of`)
aggregate.py  the four analyses and the suggested [train] layers (pure functions)
figures.py    one PNG per analysis
run.py        the pass: resumable per sample, sharded under torchrun
settings.py   AnalyzeConfig, checked when built
"""

from drivekd.analyze.run import analyze
from drivekd.analyze.settings import AnalyzeConfig

__all__ = ["AnalyzeConfig", "analyze"]
