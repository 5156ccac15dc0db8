"""distill: a knowledge-distillation compiler for large language models."""

import os

# torch's OpenMP threads (GNU libgomp) spin up to 300,000 times after each parallel region before
# they sleep. Where processes share the cores (a served teacher or a generation worker beside the
# trainer, DeepSpeed's CPU ranks), a waiting process's spinning threads take the cores the working
# one needs (docs/teachers.md, "Overlap"). 10,000 still covers the gaps between one process's own
# ops. libgomp reads it when torch is first imported: set here, before that, unless the user has.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from distill.errors import DistillError  # noqa: E402
from distill.fused_loss import fused_linear_divergence  # noqa: E402
from distill.losses import cross_entropy, divergence  # noqa: E402

__version__ = "0.1.0"
__all__ = ["DistillError", "cross_entropy", "divergence", "fused_linear_divergence", "__version__"]
