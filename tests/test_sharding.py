"""The model layer on ZeRO-3 partitioned parameters (DeepSpeed, one gloo rank on the CPU).

Under ZeRO-3 a parameter read outside its module's forward is an empty partition. Every reader in
``distill.models`` (the LM head for the fused loss, the fp32 head wrapper, checkpoints, the export
with LoRA merged, parameter counts and vocabulary checks) goes through ``distill.sharding``; here
they run on partitioned copies of the test models and must give what the unsharded models give.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_model_layer_on_zero3_partitions(teacher_dir, student_dir, tmp_path):
    """A Llama with a separate head and a Qwen2 with tied embeddings, each partitioned."""
    script = Path(__file__).with_name("zero3_seam.py")
    proc = subprocess.run([sys.executable, str(script), str(_free_port()), str(tmp_path), str(teacher_dir),
                           str(student_dir)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "zero3 ok" in proc.stdout, proc.stderr[-4000:]


def test_gathered_is_free_without_sharding():
    import torch

    from distill.sharding import full_numel, full_shape, gathered, is_sharded

    p = torch.nn.Parameter(torch.ones(3, 2))
    with gathered([p], modify=True):
        p.data.mul_(2)
    assert not is_sharded(p) and full_shape(p) == (3, 2) and full_numel(p) == 6 and float(p.sum()) == 12
