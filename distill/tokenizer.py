"""A SentencePiece tokenizer for the built-in tasks, saved in Hugging Face format."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

SPECIAL = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 256) -> PreTrainedTokenizerBase:
    """Train a BPE SentencePiece model on ``texts`` and save it as a Hugging Face tokenizer.

    Digits are split into single tokens so numbers are spelled digit by digit,
    which is what lets small models learn arithmetic.
    """
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "tokenizer")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)),
            model_prefix=prefix,
            vocab_size=vocab_size,
            model_type="bpe",
            split_digits=True,
            character_coverage=1.0,
            hard_vocab_limit=False,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            pad_piece=SPECIAL["pad"], unk_piece=SPECIAL["unk"],
            bos_piece=SPECIAL["bos"], eos_piece=SPECIAL["eos"],
            minloglevel=2,
        )
        staging = Path(tmp) / "hf"
        staging.mkdir()
        shutil.copy(prefix + ".model", staging / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(staging, pad_token=SPECIAL["pad"], add_bos_token=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)
