"""Triton kernels of skelemix (pure @triton.jit code, no torch.library side effects).

Installed as ``skelemix.kernels`` (setup.py maps this folder there), never as a top-level ``kernels``.
"""
