"""skelemix: SkeleMixCLR pretraining and evaluation of skeleton action encoders, with fused kernels."""
__version__ = "0.1.0"

# Order matters: _extension loads the compiled ops (if built) before ops/ registers their Python parts.
from . import _extension  # noqa: E402,F401
from . import ops  # noqa: E402,F401
