"""Triton kernels of skelemix and their launchers: ``skelemix.kernels.<op>`` for each fused op.

Importing a submodule imports triton, so :mod:`skelemix.ops` imports them only when a Triton op first runs. The
kernels live inside the package (not in a top-level ``kernels/``) so that an install, an editable install and a
source checkout on ``PYTHONPATH`` all import them the same way, with no import machinery of our own and no
clash with PyPI's ``kernels``.
"""
