"""distill: a knowledge-distillation compiler for large language models."""

from distill.errors import DistillError
from distill.fused_loss import fused_linear_divergence
from distill.losses import cross_entropy, divergence

__version__ = "0.1.0"
__all__ = ["DistillError", "cross_entropy", "divergence", "fused_linear_divergence", "__version__"]
