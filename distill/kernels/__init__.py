"""Triton kernels of distill (``distill.kernels``; never a top-level ``kernels``, see pyproject.toml).

Each kernel module holds the Triton kernel, its autograd Function, a docstring with the math and
``reference``, the plain-PyTorch function it is tested against (for the divergences, the same
``distill.losses.token_divergence`` the trainer falls back to).
"""
