"""The trainer's side of a served teacher: ``RemoteTeacher`` sends token ids to the workers of
``teacher.remote=NAME`` and receives the final hidden states at the positions the loss counts (or
SeqKD samples); the LM head, read from ``teacher.path`` alone, is applied here. At connect every
worker's teacher is checked against this run's (weights, tokenizer, dtype)."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid

import torch
from transformers import PreTrainedTokenizerBase as Tokenizer

from distill.config import DistillConfig, SamplingConfig
from distill.errors import DistillError
from distill.fingerprint import default_root, mismatch, tokenizer_fingerprint, weights_fingerprint
from distill.models import fp32_linear
from distill.placement import DTYPES
from distill.remote.cluster import find_workers, init, ray_module
from distill.speculative import Verifier, rollback_window
from distill.teacher import HeadTeacher

IDENTITY = ("teacher", "tokenizer", "dtype")


class RemoteTeacher(HeadTeacher):
    """A teacher served by ``workers`` (Ray actor handles); this rank sends to ``workers[rank % n]``.
    With ``overlap`` the loop asks it a step ahead and runs the student's decoder while it computes
    (``prefetches``); without, each forward is asked for when the loss needs it."""

    def __init__(self, workers: list, weight: torch.Tensor, bias: torch.Tensor | None, config, *, name: str,
                 wire: str = "float32", rank: int = 0, overlap: bool = True) -> None:
        super().__init__(weight, bias, config, name)
        self.worker, self.wire = workers[rank % len(workers)], wire
        self.prefetches = overlap
        self.caller = uuid.uuid4().hex  # the workers share a forward among callers, never within one
        self.pending: dict[bytes, object] = {}  # requests sent ahead (prefetch), by their inputs
        self.prefetched = 0  # answers that were asked for ahead

    def _request(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, bf16: bool):
        return self.worker.forward.remote(input_ids.cpu(), attention_mask.cpu(), positions.cpu(), bf16, self.wire,
                                          self.caller)

    def prefetch(self, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], bf16: bool = False) -> None:
        for b in batches:  # added to what is asked already; a batch asked twice is sent once
            key = _key(*b, bf16)
            if key not in self.pending:
                self.pending[key] = self._request(*b, bf16)

    def _get(self, ref, what: str):
        """The answer of a request; DistillError in one line where its worker died for good (Ray
        restarts a worker and sends the request again ``cluster.RESTARTS`` times first)."""
        ray = ray_module()
        try:
            return ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            raise DistillError(f"teacher.remote={self.name}: a worker died and did not come back during {what} "
                               f"({type(e).__name__}); the run stops at its last checkpoint: serve the teacher again "
                               "and resume") from None

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, bf16: bool = False,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            positions = attention_mask[:, 1:].bool()
        ref = self.pending.pop(_key(input_ids, attention_mask, positions, bf16), None) if self.pending else None
        self.prefetched += ref is not None
        if ref is None:
            ref = self._request(input_ids, attention_mask, positions, bf16)
        rows = self._get(ref, "a forward")
        if rows.shape != (int(positions.sum()), self.weight.shape[1]):
            raise DistillError(f"teacher.remote={self.name}: a worker answered {tuple(rows.shape)} hidden states for "
                               f"{int(positions.sum())} positions of {self.weight.shape[1]}")
        return self.scatter(rows, positions.to(input_ids.device))

    def generate(self, prompts: list[list[int]], cfg: SamplingConfig, *, pad_id: int, stops: list[int], seed: int,
                 vocab: int | None = None, hidden: list | None = None, synced: bool = False) -> list[list[int]]:
        ref = self.worker.generate.remote(prompts, dataclasses.asdict(cfg), pad_id, stops, seed, vocab,
                                          hidden is not None, self.wire)
        responses, states = self._get(ref, "a generation")
        if hidden is not None:
            hidden.extend(h.to(self.weight.dtype) for h in states)
        return responses

    def verifier(self) -> Verifier:
        return RemoteVerifier(self)


class RemoteVerifier(Verifier):
    """SKD's verification rounds on the worker: it keeps this generation's KV cache (a session)
    and sends the final hidden states of each drafted block; the logits are the LM head's, here.
    A session the worker lost (restarted, or evicted) is rebuilt by sending the prefix again."""

    def __init__(self, teacher: RemoteTeacher) -> None:
        self.teacher, self.config = teacher, teacher.config
        self.window = rollback_window(teacher.config)
        self.session = uuid.uuid4().hex
        self.length = 0

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, upto: int, hidden: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        t = self.teacher
        start = self.length
        h = t._get(t.worker.verify.remote(self.session, tokens[:, start:upto].cpu(), mask[:, :upto].cpu(), start,
                                          t.wire), "an SKD verification")
        if h is None:  # the worker lost this session: the whole prefix again
            h = t._get(t.worker.verify.remote(self.session, tokens[:, :upto].cpu(), mask[:, :upto].cpu(), 0, t.wire),
                       "an SKD verification")[:, start:]
        if h.shape != (tokens.shape[0], upto - start, t.weight.shape[1]):
            raise DistillError(f"teacher.remote={t.name}: a worker answered {tuple(h.shape)} hidden states for "
                               f"{upto - start} positions of {tokens.shape[0]} sequences")
        self.length = upto
        h = h.to(tokens.device, t.weight.dtype)
        with t.head() as (w, b):
            logits = fp32_linear(h, w, b)
        return (logits, h) if hidden else logits

    def close(self) -> None:
        self.teacher.worker.close.remote(self.session)  # not waited for
        self.length = 0


def _key(input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, bf16: bool) -> bytes:
    """What a forward's answer depends on, as bytes."""
    h = hashlib.blake2b(digest_size=16)
    for t in (input_ids, attention_mask, positions):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(bytes([bf16]))
    return h.digest()


def remote_teacher(cfg: DistillConfig, tokenizer: Tokenizer, device: torch.device, rank: int = 0) -> RemoteTeacher:
    """Connect to the workers of ``teacher.remote`` and check that they serve this run's teacher."""
    t = cfg.teacher
    ray = init(t.remote_address)
    workers = find_workers(t.remote)
    if not workers:
        raise DistillError(f"teacher.remote={t.remote}: no workers of that name in the Ray cluster "
                           f"({t.remote_address}); start them with distill serve-teacher teacher.remote={t.remote}")
    want = {"teacher": weights_fingerprint(t.path, default_root()),
            "tokenizer": tokenizer_fingerprint(tokenizer, template=False), "dtype": t.dtype}
    identities = ray.get([w.identity.remote() for w in workers])
    for i, have in enumerate(identities):
        if said := mismatch(have, want, IDENTITY):
            raise DistillError(f"teacher.remote={t.remote}: worker {i} serves another teacher than teacher.path="
                               f"{t.path} ({said}, from {have.get('path')})")
    weight, bias, config = HeadTeacher.head_of(t.path, DTYPES[t.dtype], device, len(tokenizer))
    overlap = overlaps(t.remote_overlap, device, identities[rank % len(workers)],
                       ray.get_runtime_context().get_node_id())
    return RemoteTeacher(workers, weight, bias, config, name=t.remote, wire=t.remote_dtype, rank=rank,
                         overlap=overlap)


def overlaps(setting: bool | None, device: torch.device, worker: dict, node: str | None) -> bool:
    """Whether a rank on ``device`` (on Ray node ``node``) asks ``worker`` (its identity) a step
    ahead: as ``teacher.remote_overlap`` says, or where that is null, unless both compute on the
    CPU of one machine. There the worker's forward could only take the trainer's cores, and two
    processes' threads contending for them make both slower than taking turns."""
    if setting is not None:
        return setting
    return not (device.type == "cpu" and worker.get("device") == "cpu" and worker.get("node") == node)
