"""What the benchmark scripts record beside their numbers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from environment import environment  # noqa: E402


def test_every_result_names_its_packages_device_and_commit():
    env = environment()
    assert env["packages"]["torch"] == torch.__version__ and env["packages"]["transformers"]
    assert env["device"] == ("cuda" if torch.cuda.is_available() else "cpu") and env["cpu"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if head:  # a checkout (CI's is one); the commit is HEAD, marked dirty when tracked files changed
        assert env["git_commit"].removesuffix("-dirty") == head
