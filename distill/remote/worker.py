"""A teacher worker: one process holding the whole teacher, answering forwards (hidden states at
given positions) and generations (SeqKD samples). ``serve`` runs it as a Ray actor."""

from __future__ import annotations

import os

import torch

from distill.config import ModelConfig, SamplingConfig
from distill.fingerprint import default_root, tokenizer_fingerprint, weights_fingerprint
from distill.generation import sample
from distill.models import final_hidden, load_model, load_tokenizer, resolve_device

WIRE = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class TeacherWorker:
    """The teacher at ``path`` (its tokenizer at ``tokenizer``) in ``dtype`` on ``device``, with
    ``threads`` torch threads on the CPU (None: every core)."""

    def __init__(self, path: str, tokenizer: str | None, dtype: str, device: str, threads: int | None = None) -> None:
        self.device = resolve_device(device)
        if self.device.type == "cpu":  # Ray sets OMP_NUM_THREADS=1 for a worker of one CPU
            torch.set_num_threads(threads or os.cpu_count() or 1)
        self.model = load_model(ModelConfig(path=path, dtype=dtype), "teacher", self.device).eval()
        tok = load_tokenizer(tokenizer or path, "teacher")
        params = {id(p): p for p in self.model.parameters()}.values()
        self._identity = {
            "teacher": weights_fingerprint(path, default_root()),
            "tokenizer": tokenizer_fingerprint(tok, template=False), "dtype": dtype, "path": path,
            "device": str(self.device),
            "parameters": sum(p.numel() for p in params), "bytes": sum(p.numel() * p.element_size() for p in params),
        }

    def identity(self) -> dict:
        """What the trainer checks at connect (weights, tokenizer, dtype), and what this worker holds."""
        return {**self._identity, "pid": os.getpid()}

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, bf16: bool,
                wire: str) -> torch.Tensor:
        """The final hidden states at ``positions`` (bool ``[B, T - 1]``), row-major ``[N, H]``."""
        hidden = final_hidden(self.model, input_ids.to(self.device), attention_mask.to(self.device), bf16)
        return hidden[positions.to(self.device)].to(WIRE[wire]).cpu()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: dict, pad_id: int, stops: list[int], seed: int,
                 vocab: int | None, with_hidden: bool, wire: str) -> tuple[list[list[int]], list | None]:
        """``distill.generation.sample`` here: the same responses a local teacher draws for ``seed``."""
        hidden = [] if with_hidden else None
        responses = sample(self.model, prompts, SamplingConfig(**sampling), pad_id=pad_id, stops=stops, seed=seed,
                           vocab=vocab, hidden=hidden)
        return responses, None if hidden is None else [h.to(WIRE[wire]).cpu() for h in hidden]
