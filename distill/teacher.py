"""The teacher: everything training asks of it, behind one interface, wherever it runs.

The loop, the sources and the objective see a ``Teacher``:

- ``hidden_states``: its final hidden states (after the last norm) at the positions that predict a
  next token, and ``head``, its LM head: together what the fused loss needs (``logits`` where the
  loss runs on full logits; ``head_problem`` says when hidden states and head cannot stand in for
  its logits; ``top_k`` where only its top-k log-probabilities are known);
- ``generate``: sampled responses to prompts (SeqKD), with the sources' sampling semantics;
- ``verifier``: a KV-cached forward over drafted blocks (SKD's verification rounds).

``LocalTeacher`` is the in-process teacher, sharded by ZeRO-3 or not, and the student's own base
weights (``teacher.student_base``); ``distill.offline.teacher.CachedTeacher`` reads it from disk;
``distill.remote.teacher.RemoteTeacher`` asks Ray workers. ``Teachers`` teaches with several:
the objective asks every teacher for its ``parts`` of a batch (``distill.objective.Part``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from distill.config import SamplingConfig
from distill.data import Record
from distill.errors import DistillError
from distill.generation import sample
from distill.lm_head import load_lm_head
from distill.models import final_hidden, fp32_linear, fused_head_problem, lm_head, lm_logits
from distill.objective import Part
from distill.speculative import CachedForward, Verifier
from distill.top_k_loss import TopK

Head = tuple[torch.Tensor | None, torch.Tensor | None]  # the LM head's weight and bias (or None)


class Teacher(ABC):
    """What the loop, the sources and the objective ask of a teacher (see the module docstring)."""

    name: str
    config: PretrainedConfig  # its model config: vocabulary rows, transforms after the LM head
    prefetches: bool = False  # whether ``prefetch`` starts anything (a teacher that runs elsewhere)

    @property
    def module(self) -> torch.nn.Module | None:
        """The model itself where it runs in this process (its own evaluation rows, the placement
        report); None where it runs elsewhere."""
        return None

    def generation_models(self) -> tuple[torch.nn.Module, ...]:
        """The modules a generation round gathers on this rank (none where it runs elsewhere)."""
        return ()

    def parts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> list[Part]:
        """Who teaches which rows of a batch: this teacher, every row."""
        return [Part("", self, 1.0, None)]

    @abstractmethod
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, bf16: bool = False,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states ``[B, T - 1, H]`` at the positions that predict a next token;
        ``positions`` (bool ``[B, T - 1]``): those the loss counts; others may be anything."""

    def top_k(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> TopK | None:
        """Where the teacher is known only by its top-k log-probabilities and tail mass (a compact
        cache): those at ``positions``, row-major; None where ``hidden_states`` gives it whole."""
        return None

    def prefetch(self, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], bf16: bool = False) -> None:
        """Start computing the hidden states of ``batches`` ((input_ids, attention_mask, positions)
        each) that ``hidden_states`` will be asked for soon, where the teacher runs elsewhere and
        can work while this process trains; added to what was asked before. By default nothing."""
        return

    @abstractmethod
    def head(self, vocab: int | None = None) -> AbstractContextManager[Head]:
        """The LM head's weight and bias (rows beyond ``vocab`` dropped), whole inside the block."""

    @abstractmethod
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, bf16: bool = False,
               vocab: int | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits ``[B, T - 1, V]`` in fp32 (the unfused loss); ``positions`` as for
        ``hidden_states``."""

    @abstractmethod
    def head_problem(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str | None:
        """Why ``head(hidden_states)`` would not be its logits (soft-capping, ...); None when it is."""

    @abstractmethod
    def generate(self, prompts: list[list[int]], cfg: SamplingConfig, *, pad_id: int, stops: list[int], seed: int,
                 vocab: int | None = None, hidden: list | None = None, synced: bool = False) -> list[list[int]]:
        """A response per prompt, as ``distill.generation.sample`` draws it; with ``hidden`` the
        final hidden states before each response token are appended, one tensor per prompt."""

    @abstractmethod
    def verifier(self) -> Verifier:
        """A fresh KV-cached forward for one SKD generation (``distill.speculative``)."""


class LocalTeacher(Teacher):
    """The teacher in this process: a model (ZeRO-3 sharded or whole), or a LoRA student's base
    weights (``models.AdaptersDisabled``)."""

    def __init__(self, model: PreTrainedModel, name: str = "teacher") -> None:
        self.model, self.name, self.config = model, name, model.config

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def generation_models(self) -> tuple[torch.nn.Module, ...]:
        return (self.model,)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, bf16: bool = False,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        return final_hidden(self.model, input_ids, attention_mask, bf16)

    def head(self, vocab: int | None = None) -> AbstractContextManager[Head]:
        return lm_head(self.model, vocab)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, bf16: bool = False,
               vocab: int | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        return lm_logits(self.model, input_ids, attention_mask, bf16, vocab)

    def head_problem(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str | None:
        return fused_head_problem(self.model, input_ids, attention_mask)

    def generate(self, prompts: list[list[int]], cfg: SamplingConfig, *, pad_id: int, stops: list[int], seed: int,
                 vocab: int | None = None, hidden: list | None = None, synced: bool = False) -> list[list[int]]:
        return sample(self.model, prompts, cfg, pad_id=pad_id, stops=stops, seed=seed, vocab=vocab, hidden=hidden,
                      synced=synced)

    def verifier(self) -> Verifier:
        return CachedForward(self.model)


class HeadTeacher(Teacher):
    """A teacher that runs elsewhere (an offline cache, a served model) and sends hidden states:
    this process holds its LM head alone, read from its checkpoint (``distill.lm_head``), and
    applies it where full logits are asked for."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, config: PretrainedConfig,
                 name: str = "teacher") -> None:
        self.weight, self.bias, self.config, self.name = weight, bias, config, name

    @classmethod
    def head_of(cls, path: str, dtype: torch.dtype, device: torch.device, vocab: int
                ) -> tuple[torch.Tensor, torch.Tensor | None, PretrainedConfig]:
        """The LM head of the checkpoint at ``path`` on ``device``, checked to cover ``vocab``, and its config."""
        head = load_lm_head(path, dtype)
        if head.weight.shape[0] < vocab:
            raise DistillError(f"teacher {path}: its LM head has {head.weight.shape[0]} rows for a vocabulary of "
                               f"{vocab}")
        return head.weight.to(device), None if head.bias is None else head.bias.to(device), \
            AutoConfig.from_pretrained(path)

    def head(self, vocab: int | None = None) -> AbstractContextManager[Head]:
        return nullcontext((self.weight[:vocab], None if self.bias is None else self.bias[:vocab]))

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, bf16: bool = False,
               vocab: int | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.hidden_states(input_ids, attention_mask, bf16=bf16, positions=positions)
        with self.head(vocab) as (w, b):
            return fp32_linear(hidden, w, b)

    def head_problem(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str | None:
        return None  # a head whose logits are transformed after it is refused when it is read

    def scatter(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[N, H]`` of the counted ``positions`` (bool ``[B, T - 1]``, row-major)
        laid out as ``hidden_states`` returns them, zeros elsewhere, in the head's dtype."""
        out = torch.zeros((*positions.shape, self.weight.shape[1]), dtype=self.weight.dtype, device=positions.device)
        out[positions] = rows.to(out.device, out.dtype)
        return out


class Teachers:
    """Several teachers (``teachers``), each a ``Teacher`` of any kind, as the objective's one
    teacher. ``combine=sum``: each teaches every row, and the objective is the weighted sum of the
    divergences (weights normalised to sum to 1, so cross-entropy keeps its share).
    ``combine=route``: each row is taught by the teacher its record's task is routed to; a row is
    known by its prompt's token ids (``learn``), so the sources need not carry the task along."""

    prefetches: bool
    module = None  # none of them is "the" model in this process

    def __init__(self, members: dict[str, Teacher], *, weights: dict[str, float] | None = None,
                 routes: dict[str, str] | None = None, in_step: bool = False) -> None:
        """``weights`` (combine=sum) or ``routes`` (combine=route: task -> member name). ``in_step``:
        the members' forwards are collective across ranks (ZeRO-3), so every rank runs every
        member's, in the same order, also one with no rows on this rank (on one row, unused)."""
        if (weights is None) == (routes is None):
            raise ValueError("Teachers: give weights (combine=sum) or routes (combine=route)")
        self.members, self.routes, self.in_step = members, routes, in_step
        total = sum(weights.values()) if weights else 0.0
        self.weights = {n: w / total for n, w in weights.items()} if weights else None
        self.prefetches = any(t.prefetches for t in members.values())
        self._by_prompt: dict[tuple[int, ...], tuple[str, str]] = {}  # prompt ids -> (member, where)

    def learn(self, records: list[Record], pairs: list[tuple[list[int], list[int]]]) -> None:
        """Route the prompts of ``records`` (encoded as ``pairs``) by their tasks; an unrouted task, or
        one prompt under two teachers, is refused naming the record."""
        if self.routes is None:
            return
        for r, (prompt, _) in zip(records, pairs, strict=True):
            member = self.routes.get(r.task or "")
            if member is None:
                raise DistillError(f"{r.source}: its task {r.task!r} is routed to no teacher (the routes: "
                                   f"{', '.join(f'{k} -> {v}' for k, v in self.routes.items())})")
            had = self._by_prompt.setdefault(tuple(prompt), (member, r.source))
            if had[0] != member:
                raise DistillError(f"{r.source}: the same prompt as {had[1]}, routed to teachers.{had[0]}, is "
                                   f"routed to teachers.{member}")

    def parts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> list[Part]:
        """Each member's weight and rows (combine=route: rows with no counted position are nobody's)."""
        if self.weights is not None:
            return [Part(n, t, self.weights[n], None) for n, t in self.members.items()]
        # A member with no rows here is left out, unless its forward is collective (in_step): then
        # it comes with no rows, and the objective runs its forward (and head) on one row, unused.
        none = torch.zeros(0, dtype=torch.long, device=input_ids.device)
        return [Part(n, self.members[n], 1.0, none if rows is None else rows)
                for n, rows in self._routed(input_ids, positions).items() if rows is not None or self.in_step]

    def prefetch(self, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], bf16: bool = False) -> None:
        """Each member's share of ``batches``, as ``parts`` will ask for it, in one call per member."""
        shares: dict[str, list] = {n: [] for n, t in self.members.items() if t.prefetches}
        for ids, mask, positions in batches:
            routed = None if self.routes is None else self._routed(ids, positions)
            for n, mine in shares.items():
                rows = slice(None) if routed is None else routed[n]
                if rows is not None:
                    mine.append((ids[rows], mask[rows], positions[rows]))
        for n, mine in shares.items():
            self.members[n].prefetch(mine, bf16=bf16)

    def _routed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """The rows routed to each member (None: none), by their prompts."""
        rows: dict[str, list[int]] = {n: [] for n in self.members}
        first = positions.int().argmax(dim=1) + 1  # the prompt ends where the first counted label is
        for i in positions.any(dim=1).nonzero().flatten().tolist():
            prompt = tuple(input_ids[i, : int(first[i])].tolist())
            if prompt not in self._by_prompt:
                raise DistillError("several teachers (combine=route): a prompt that no record of the data holds "
                                   "reached the loss; the sources must keep the dataset's prompts")
            rows[self._by_prompt[prompt][0]].append(i)
        return {n: torch.tensor(r, device=input_ids.device) if r else None for n, r in rows.items()}

    def head_problem(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str | None:
        """The first member whose head cannot stand in for its logits, named."""
        for n, t in self.members.items():
            if problem := t.head_problem(input_ids, attention_mask):
                return f"teachers.{n}: {problem}"
        return None


def as_teacher(teacher: Teacher | PreTrainedModel | None) -> Teacher | None:
    """A ``Teacher`` for a model given directly (tests, benchmarks, the Python API)."""
    return teacher if teacher is None or isinstance(teacher, Teacher) else LocalTeacher(teacher)
