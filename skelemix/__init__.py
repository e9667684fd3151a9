"""skelemix: SkeleMixCLR pretraining and evaluation of skeleton action encoders, with fused kernels."""
__version__ = "0.1.0"

# Order matters: _extension loads the compiled ops (if built) before ops/ registers their Python parts.
from . import _extension  # noqa: E402,F401
from . import ops  # noqa: E402,F401


def load_encoder(path, device="cpu", impl="auto", config=None, overrides=None):
    """A trained encoder as an ``nn.Module`` in eval mode: prepared sequences ``(N, C, T, V, M)`` in, pooled
    features ``(N, D)`` out (see :func:`skelemix.embed.load_encoder`)."""
    from .embed import load_encoder as load

    return load(path, device=device, impl=impl, config=config, overrides=overrides)
