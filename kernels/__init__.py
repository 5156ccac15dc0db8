"""Triton kernels of distill, installed as ``distill.kernels``.

Each kernel module holds the Triton kernel, its autograd Function and a docstring with the math;
the plain-PyTorch reference it is tested against lives in ``distill.losses``.
"""
