"""A teacher worker: one process holding the whole teacher, answering forwards (hidden states at
given positions, several callers' requests batched into one forward), generations (SeqKD
samples) and SKD's verification forwards (hidden states of drafted blocks, each caller's KV cache
kept between its rounds). ``serve`` runs it as a Ray actor (an asynchronous one: ``forward`` is a
coroutine)."""

from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict

import torch
import torch.nn.functional as F

from distill.config import ModelConfig, SamplingConfig
from distill.fingerprint import default_root, tokenizer_fingerprint, weights_fingerprint
from distill.generation import sample
from distill.memory import peak_rss_bytes, rss_bytes
from distill.models import final_hidden, load_model, load_tokenizer, resolve_device
from distill.placement import DTYPES
from distill.speculative import CachedForward

# How long a forward waits for more requests to join it (from several ranks or jobs), in seconds;
# only while more than one caller has asked within CALLERS_SEEN seconds: a trainer alone never waits.
BATCH_WINDOW = 0.002
CALLERS_SEEN = 10.0
# SKD verification sessions (KV caches) a worker keeps: one per caller generating now, closed at
# the end of its generation; beyond this many (callers that died mid-generation) the least
# recently used go, and a caller whose session went sends its prefix again.
MAX_SESSIONS = 16


class TeacherWorker:
    """The teacher at ``path`` (its tokenizer at ``tokenizer``) in ``dtype`` on ``device``, with
    ``threads`` torch threads on the CPU (None: every core); ``batching``: several callers'
    requests share a forward."""

    def __init__(self, path: str, tokenizer: str | None, dtype: str, device: str, threads: int | None = None,
                 batching: bool = True) -> None:
        self.batching = batching
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
        self._queue: list = []  # forward requests waiting for the next forward
        self._sessions: OrderedDict[str, CachedForward] = OrderedDict()  # SKD verification KV caches
        self._draining = False
        self._callers: dict[str, float] = {}  # when each caller last asked for a forward
        self.stats = {"forwards": 0, "requests": 0, "forward_seconds": 0.0}

    def identity(self) -> dict:
        """What the trainer checks at connect (weights, tokenizer, dtype), and what this worker holds
        and where (its resident memory now, its Ray node)."""
        import ray

        return {**self._identity, "pid": os.getpid(), "rss_bytes": rss_bytes(),
                "node": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None}

    async def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                      bf16: bool, wire: str, caller: str = "") -> torch.Tensor:
        """The final hidden states at ``positions`` (bool ``[B, T - 1]``), row-major ``[N, H]``.
        Requests of several callers (ranks, jobs) that arrive while a forward runs are answered by
        one forward together (with batching on), at most one of each caller's: a caller alone (its
        next step's request sent ahead and this one's) gets every answer as from its own forward,
        bit for bit; answers shared with other callers' equal it to float rounding."""
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self._callers[caller] = time.monotonic()
        self._queue.append((input_ids, attention_mask, positions, bf16, wire, caller, answer))
        if not self._draining:
            self._draining = True
            loop.create_task(self._drain())
        return await answer

    async def _drain(self) -> None:
        try:
            while self._queue:
                if self.batching and self._several_callers():
                    await asyncio.sleep(BATCH_WINDOW)  # requests sent meanwhile join this forward
                group, callers = [], set()
                for r in self._queue:  # the oldest request of each caller, of the oldest's precision
                    if r[5] not in callers and r[3] == self._queue[0][3] and (self.batching or not group):
                        group.append(r)
                        callers.add(r[5])
                self._queue = [r for r in self._queue if all(r is not g for g in group)]
                if group:
                    bf16 = group[0][3]
                    try:
                        for r, rows in zip(group, self._forward_together(group, bf16), strict=True):
                            r[-1].set_result(rows)
                    except Exception as e:  # every caller of the failed forward gets its error
                        for r in group:
                            if not r[-1].done():
                                r[-1].set_exception(e)
        finally:
            self._draining = False

    def _several_callers(self) -> bool:
        """Whether more than one caller asked within ``CALLERS_SEEN`` seconds (older ones forgotten)."""
        now = time.monotonic()
        self._callers = {c: t for c, t in self._callers.items() if now - t < CALLERS_SEEN}
        return len(self._callers) > 1

    @torch.no_grad()
    def _forward_together(self, requests: list, bf16: bool) -> list[torch.Tensor]:
        """One forward over the requests' sequences, right-padded to the longest (masked)."""
        started = time.perf_counter()
        width = max(r[0].shape[1] for r in requests)
        ids = torch.cat([F.pad(r[0], (0, width - r[0].shape[1])) for r in requests])
        mask = torch.cat([F.pad(r[1], (0, width - r[1].shape[1])) for r in requests])
        hidden = final_hidden(self.model, ids.to(self.device), mask.to(self.device), bf16)
        self.stats["forwards"] += 1
        self.stats["requests"] += len(requests)
        out, row = [], 0
        for input_ids, _, positions, _, wire, _, _ in requests:
            b, t = input_ids.shape
            out.append(hidden[row: row + b, : t - 1][positions.to(self.device)].to(DTYPES[wire]).cpu())
            row += b
        self.stats["forward_seconds"] += time.perf_counter() - started
        return out

    def verify(self, session: str, tokens: torch.Tensor, mask: torch.Tensor, start: int, wire: str
               ) -> torch.Tensor | None:
        """SKD's verification forward in ``session``'s KV cache: feed ``tokens`` (buffer positions
        [start, upto), upto = ``mask``'s width) after rolling the cache back to ``start``; the final
        hidden states there. None where the session is gone (a restarted worker, an evicted cache)
        and ``start`` > 0: the caller sends its prefix again, from 0."""
        cached = self._sessions.pop(session, None)
        if start == 0:  # a generation's first round, or its prefix sent again
            cached = CachedForward(self.model)
        elif cached is None or start > cached.length:  # gone, or positions this cache never saw
            return None
        cached.crop(start)
        self._sessions[session] = cached
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        hidden = cached.hidden_only(tokens.to(self.device), mask.to(self.device))
        self.stats["verifications"] = self.stats.get("verifications", 0) + 1
        return hidden.to(DTYPES[wire]).cpu()

    def close(self, session: str) -> None:
        """The caller's generation is over: its cache goes."""
        self._sessions.pop(session, None)

    def counts(self) -> dict[str, float]:
        """Forwards run, requests answered (several callers' requests share a forward), the forwards'
        seconds, and this process's peak memory (the device's allocator peak on CUDA, else its peak
        resident memory)."""
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else peak_rss_bytes()
        return {**self.stats, "peak_bytes": peak}

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: dict, pad_id: int, stops: list[int], seed: int,
                 vocab: int | None, with_hidden: bool, wire: str) -> tuple[list[list[int]], list | None]:
        """``distill.generation.sample`` here: the same responses a local teacher draws for ``seed``."""
        hidden = [] if with_hidden else None
        responses = sample(self.model, prompts, SamplingConfig(**sampling), pad_id=pad_id, stops=stops, seed=seed,
                           vocab=vocab, hidden=hidden)
        return responses, None if hidden is None else [h.to(DTYPES[wire]).cpu() for h in hidden]
