"""The shipped teacher and student: loadable, sharing a tokenizer, and as good as recorded."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.config import ASSETS, DataConfig
from distill.data import builtin_records
from distill.evaluation import evaluate
from distill.models import check_same_tokenizer, count_parameters, load_tokenizer


@pytest.fixture(scope="module")
def recorded():
    return json.loads((ASSETS / "accuracy.json").read_text())


def test_shipped_models_share_tokenizer_and_are_small():
    check_same_tokenizer(load_tokenizer(ASSETS / "teacher"), load_tokenizer(ASSETS / "student"), "teacher", "student")
    teacher = AutoModelForCausalLM.from_pretrained(ASSETS / "teacher")
    student = AutoModelForCausalLM.from_pretrained(ASSETS / "student")
    assert count_parameters(teacher.parameters()) >= 5 * count_parameters(student.parameters())
    size = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert size < 25e6


def test_teacher_accuracy_as_recorded(recorded):
    """Re-measure the teacher on the default test split (100 examples of each task)."""
    teacher = AutoModelForCausalLM.from_pretrained(ASSETS / "teacher", dtype=torch.float32)
    tok = load_tokenizer(ASSETS / "teacher")
    records = builtin_records(DataConfig(), "test", 200)
    metrics = evaluate(teacher, tok, records, metric="auto", max_new_tokens=64, batch_size=100, max_length=128)
    assert metrics["accuracy"] >= 0.9
    assert metrics["accuracy"] == pytest.approx(recorded["teacher"]["accuracy"], abs=0.02)
