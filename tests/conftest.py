"""Shared fixtures: a tokenizer trained on the built-in tasks and tiny models saved to disk.

Everything is built locally (nothing is downloaded) and loaded back through the real
``from_pretrained`` code paths.
"""

from __future__ import annotations

import json
import os
import shutil

# The Triton kernels run in the interpreter on CPU tensors. This must be set before triton is
# first imported (transformers imports it), because @triton.jit decides at decoration time. The
# "auto" loss backend still takes plain PyTorch on the CPU; kernel tests ask for backend="triton".
# DISTILL_TEST_DEVICE=cuda (make gpu-check) runs the kernel and fused-loss tests on the GPU instead:
# compiled kernels and the CUDA branches of the chunk loop.
if os.environ.get("DISTILL_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)
# Caches (the teacher source's responses) go to a directory of the test session, not the user's.
import tempfile  # noqa: E402

os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="distill-test-cache-")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from distill.config import DataConfig
    from distill.data import builtin_records
    from distill.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    corpus = builtin_records(DataConfig(), "train", 2000)
    train_tokenizer([t for r in corpus for t in (r.prompt, r.completion)], out, vocab_size=200)
    return out


def _save(model, tokenizer_dir: Path, out: Path) -> Path:
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def make_llama(tokenizer_dir: Path, out: Path, hidden: int = 32, layers: int = 2, vocab_pad: int = 0, seed: int = 0):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok) + vocab_pad, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return _save(LlamaForCausalLM(cfg), tokenizer_dir, out)


@pytest.fixture(scope="session")
def teacher_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny random Llama teacher whose vocabulary is padded beyond the tokenizer."""
    return make_llama(tokenizer_dir, tmp_path_factory.mktemp("teacher"), hidden=48, vocab_pad=24, seed=1)


@pytest.fixture(scope="session")
def student_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A smaller random student of a different architecture (Qwen2) and unpadded vocabulary."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(2)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return _save(Qwen2ForCausalLM(cfg), tokenizer_dir, tmp_path_factory.mktemp("student"))


@pytest.fixture
def swapped_student_dir(student_dir, tmp_path) -> Path:
    """A copy of the student whose tokenizer has the same tokens but two ids swapped."""
    other = tmp_path / "swapped"
    shutil.copytree(student_dir, other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(data))
    return other
