"""Fixed datasets: prompt/completion pairs from files or the built-in tasks, tokenized and batched.

A record is either ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role", "content"}, ...]}``
(rendered with the tokenizer's chat template; the last assistant message is the completion).
Prompt and padding positions are masked with ``IGNORE_INDEX`` in the labels.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase as Tokenizer

from distill.config import DataConfig
from distill.errors import DistillError
from distill.tasks import Example, get_task

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Record:
    """One (prompt, completion) pair and where it came from (for error messages and metrics).

    For chat records ``prompt`` and ``completion`` are the chat template's rendering (``templated``:
    they already hold the template's special tokens) and ``reference`` is the assistant's text.
    """

    prompt: str
    completion: str
    source: str
    task: str | None = None
    templated: bool = False
    reference: str | None = None
    row: dict | None = field(default=None, repr=False, compare=False)  # the data file's row as read (rewards)

    @property
    def answer(self) -> str:
        """What a generated completion is scored against."""
        return self.completion if self.reference is None else self.reference


def _record_from_row(
    row: object, cfg: DataConfig, tokenizer: Tokenizer | None, where: str, require_completion: bool = True
) -> Record:
    if not isinstance(row, dict):
        raise DistillError(f"{where}: expected a JSON object, got {type(row).__name__}")
    task = row.get(cfg.task_field) if isinstance(row.get(cfg.task_field), str) else None
    if row.get(cfg.messages_field) is not None:
        record = _record_from_messages(row[cfg.messages_field], tokenizer, where, require_completion)
        return replace(record, row=row) if task is None else replace(record, task=task, row=row)
    for key in (cfg.prompt_field, cfg.completion_field):
        if key not in row and (require_completion or key == cfg.prompt_field):
            raise DistillError(f"{where}: missing field {key!r} (or {cfg.messages_field!r})")
        if key in row and not isinstance(row[key], str):
            raise DistillError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}")
    return Record(row[cfg.prompt_field], row.get(cfg.completion_field, ""), where, task, row=row)


def _record_from_messages(
    messages: object, tokenizer: Tokenizer | None, where: str, require_completion: bool = True
) -> Record:
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise DistillError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
    if messages[-1]["role"] != "assistant" and require_completion:
        raise DistillError(f"{where}: the last message must be the assistant's response")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DistillError(f"{where}: chat 'messages' need a tokenizer with a chat template")
    if messages[-1]["role"] != "assistant":  # a prompt only: the template's generation prompt ends it
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return Record(prompt, "", where, task="chat", templated=True, reference="")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise DistillError(f"{where}: the chat template does not render the prompt as a prefix of the conversation")
    return Record(prompt, full[len(prompt):], where, task="chat", templated=True, reference=messages[-1]["content"])


def read_records(
    path: str | Path, cfg: DataConfig, tokenizer: Tokenizer | None = None, *, require_completion: bool = True
) -> list[Record]:
    """Read a local data file; a malformed line is a DistillError naming file and line.

    With ``require_completion=False`` (prompts for generation) a row needs only its prompt (the
    completion is then ""), and chat ``messages`` may end with the user's turn."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"no such data file: {path}")
    records: list[Record] = []
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    # Without its line break: an error at the end of the line is then reported at the
                    # line's last column, not at column 1 of a line that does not exist.
                    row = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    raise DistillError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
                records.append(_record_from_row(row, cfg, tokenizer, where, require_completion))
    else:
        import datasets

        builder = {".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": None}.get(path.suffix)
        if builder is None:
            raise DistillError(f"{path}: unsupported data format {path.suffix!r} (use .jsonl, .json, .csv or .parquet)")
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:  # datasets raises many types for unreadable files
            raise DistillError(f"{path}: cannot read as {builder}: {e}") from None
        records = [_record_from_row(row, cfg, tokenizer, f"{path}: row {i + 1}", require_completion)
                   for i, row in enumerate(ds)]
    if not records:
        raise DistillError(f"{path}: no records")
    return records


def builtin_records(cfg: DataConfig, split: str, n: int) -> list[Record]:
    """``n`` examples of ``split`` spread evenly over the configured built-in tasks."""
    records: list[Record] = []
    for i, name in enumerate(cfg.tasks):
        share = n // len(cfg.tasks) + (1 if i < n % len(cfg.tasks) else 0)
        try:
            records += [_from_example(e) for e in get_task(name, cfg.difficulty).take(split, share, seed=cfg.seed)]
        except RuntimeError as e:  # a small task space (a low difficulty) holds fewer distinct prompts
            raise DistillError(f"data.num_{split}={n}: {e} (it asks for {share}; at data.difficulty="
                               f"{cfg.difficulty}); ask for fewer") from None
    return records


def _from_example(e: Example) -> Record:
    return Record(e.prompt, e.completion, f"builtin:{e.task}", e.task)


def builtin_stream(cfg: DataConfig, seed: int) -> Iterator[Record]:
    """An endless stream of training examples, the tasks interleaved in turn (for pretraining)."""
    streams = [get_task(name, cfg.difficulty).examples("train", seed=seed, distinct=False) for name in cfg.tasks]
    while True:
        for s in streams:
            yield _from_example(next(s))


def load_split(cfg: DataConfig, split: str, tokenizer: Tokenizer | None = None) -> list[Record]:
    """The records of ``split`` from the configured file, or from the built-in tasks."""
    path = getattr(cfg, split)
    if path is not None:
        return read_records(path, cfg, tokenizer)
    if cfg.train is not None:
        return []  # user data without this split: nothing to evaluate on
    sizes = {"train": cfg.num_train, "validation": cfg.num_validation, "test": cfg.num_test}
    return builtin_records(cfg, split, sizes[split])


def prompt_ids(record: Record, tokenizer: Tokenizer) -> list[int]:
    """Token ids of the record's prompt as training and generation see it: a chat template's
    rendering already holds its special tokens (no second BOS), plain text gets the tokenizer's."""
    return tokenizer(record.prompt, add_special_tokens=not record.templated).input_ids


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` for generation."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def encode(
    record: Record, tokenizer: Tokenizer, max_length: int, overlong: str = "error"
) -> tuple[list[int], list[int]] | None:
    """Token ids of prompt and completion; the completion ends with EOS (a chat template's own end
    token, nothing after it) and is cut to fit ``max_length``. A prompt that leaves no room for a
    completion: ``error`` raises naming the record, ``skip`` returns None, ``truncate`` drops the
    prompt's first tokens so that the completion keeps up to half of ``max_length``."""
    return _encode(record, tokenizer, max_length, overlong)[0]


def stop_ids(tokenizer: Tokenizer) -> list[int]:
    """The tokens that end a reply: EOS and, with a chat template, the token that closes an
    assistant turn where it is another (ChatML's ``<|im_end|>`` beside an EOS of ``</s>``)."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end = turn_end_id(tokenizer)
    return stops if end is None or end in stops else [*stops, end]


_SENTINEL = "Sentinel reply 4711."


def turn_end_id(tokenizer: Tokenizer) -> int | None:
    """The special token the tokenizer's chat template puts right after an assistant's reply (its
    end of turn), found by rendering a sentinel reply; None without a template or such a token."""
    template = getattr(tokenizer, "chat_template", None)
    return _turn_end_id(tokenizer, template) if template else None


@functools.lru_cache(maxsize=16)
def _turn_end_id(tokenizer: Tokenizer, template: str) -> int | None:  # template: part of the cache key
    messages = [{"role": "user", "content": "1"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this: no end-of-turn token
        return None
    if _SENTINEL not in rendered:
        return None
    after = tokenizer(rendered[rendered.rindex(_SENTINEL) + len(_SENTINEL):], add_special_tokens=False).input_ids
    special = set(tokenizer.all_special_ids)
    return next((t for t in after if t in special), None)


def _encode(
    record: Record, tokenizer: Tokenizer, max_length: int, overlong: str
) -> tuple[tuple[list[int], list[int]] | None, int, int]:
    """``encode``'s result, the prompt's length before any truncation and the completion's before any cut."""
    prompt = prompt_ids(record, tokenizer)
    prompt_length = len(prompt)
    eos = tokenizer.eos_token_id
    if record.templated:
        # The rendering holds the template's special tokens; tokenize it whole so the completion
        # tokens are exactly those of the conversation, and split where the prompt ends.
        full_ids = tokenizer(record.prompt + record.completion, add_special_tokens=False).input_ids
        if full_ids[: len(prompt)] != prompt:
            raise DistillError(f"{record.source}: the chat template's prompt does not tokenize as a prefix of the chat")
        completion_ids = full_ids[len(prompt):]
        # The reply ends at the template's end-of-turn token (ChatML renders "<|im_end|>\n"), which
        # the model learns to stop at (generation stops at ``stop_ids``): what follows is layout
        # between turns, and an EOS after it would teach the model to say a second end token.
        end = turn_end_id(tokenizer)
        end = end if end in completion_ids else eos if eos in completion_ids else None
        if end is not None:  # its last occurrence: the reply's text may contain the token
            completion_ids = completion_ids[: len(completion_ids) - completion_ids[::-1].index(end)]
    else:
        completion_ids = tokenizer(record.completion, add_special_tokens=False).input_ids
        end = None
    if end is None and (not completion_ids or completion_ids[-1] != eos):
        completion_ids = completion_ids + [eos]
    if len(prompt) >= max_length:
        if overlong == "skip":
            return None, prompt_length, len(completion_ids)
        if overlong != "truncate":
            raise DistillError(
                f"{record.source}: prompt is {len(prompt)} tokens, at least data.max_length={max_length} "
                "(data.overlong=skip or truncate goes on without it)"
            )
        prompt = prompt[len(prompt) - (max_length - min(len(completion_ids), max_length // 2)):]
    return (prompt, completion_ids[: max_length - len(prompt)]), prompt_length, len(completion_ids)


def encode_all(
    records: list[Record], tokenizer: Tokenizer, max_length: int, overlong: str
) -> tuple[list[Record], list[tuple[list[int], list[int]]], dict[str, int]]:
    """``encode`` for every record: the records kept, their token ids, and how many records there
    were, were ``skipped``, had their prompt ``truncated`` or their completion ``cut`` at ``max_length``."""
    kept, pairs = [], []
    counts = {"records": len(records), "skipped": 0, "truncated": 0, "cut": 0}
    for r in records:
        pair, prompt_length, completion_length = _encode(r, tokenizer, max_length, overlong)
        if pair is None:
            counts["skipped"] += 1
            continue
        counts["truncated"] += len(pair[0]) < prompt_length
        counts["cut"] += len(pair[1]) < completion_length
        kept.append(r)
        pairs.append(pair)
    return kept, pairs, counts


def encode_split(cfg: DataConfig, split: str, tokenizer: Tokenizer
                 ) -> tuple[list[Record], list[tuple[list[int], list[int]]], dict[str, int]]:
    """``split``'s records (``load_split``), encoded as ``encode_all`` does under ``cfg``."""
    return encode_all(load_split(cfg, split, tokenizer), tokenizer, cfg.max_length, cfg.overlong)


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # aligned with input_ids; shift before use as next-token targets

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Right-padded training batch with prompt and padding masked out of the labels."""
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (p, c) in enumerate(pairs):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(c)
    return Batch(ids, mask, labels)


# An extra bucket costs a forward and backward call of its own; it must cut the positions computed
# (real and padded) by at least this share to pay for it.
BUCKET_MIN_SAVING = 0.1


def length_buckets(lengths: list[int], max_buckets: int) -> list[list[int]]:
    """Indices of a micro-batch's sequences grouped by length, each group padded to its own longest:
    the split into at most ``max_buckets`` groups of consecutive sorted lengths with the fewest
    positions computed (sequences x longest, summed over groups: the real tokens plus the fewest
    padded ones), taking one more group only when it cuts those positions by at least
    ``BUCKET_MIN_SAVING``. The loss of a step is a sum over its counted tokens, so the split
    changes what is computed on padding and nothing else."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    n = len(order)
    # best[b][j]: fewest positions for the first j sorted sequences in b groups; cut[b][j]: where the last begins.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(max_buckets + 1)]
    cut = [[0] * (n + 1) for _ in range(max_buckets + 1)]
    best[0][0] = 0
    for b in range(1, max_buckets + 1):
        for j in range(1, n + 1):
            for i in range(b - 1, j):
                cost = best[b - 1][i] + (j - i) * sorted_lengths[j - 1]
                if cost < best[b][j]:
                    best[b][j], cut[b][j] = cost, i
    buckets = 1
    while buckets < min(max_buckets, n) and best[buckets + 1][n] <= (1 - BUCKET_MIN_SAVING) * best[buckets][n]:
        buckets += 1
    groups, j = [], n
    for b in range(buckets, 0, -1):
        groups.append(order[cut[b][j]:j])
        j = cut[b][j]
    return groups[::-1]


def split_groups(groups: list[list[int]], lengths: list[int], n: int) -> list[list[int]]:
    """``groups`` (of ``length_buckets``) split until there are ``n``: the group with the most
    sequences is halved by length each time, which adds no padding. Sharded ranks compute in as many
    groups as the rank with the most (their forwards and backwards are collective)."""
    groups = [sorted(g, key=lambda i: lengths[i]) for g in groups]
    while len(groups) < n:
        i = max(range(len(groups)), key=lambda j: len(groups[j]))
        g = groups[i]
        if len(g) < 2:
            raise ValueError(f"cannot split {sum(map(len, groups))} sequences into {n} groups")
        groups[i: i + 1] = [g[: len(g) // 2], g[len(g) // 2:]]
    return groups


class EpochSampler:
    """Shuffled passes over ``n`` items, reproducible from (seed, position) for exact resume."""

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise DistillError("the training set is empty")
        self.n, self.seed, self.position = n, seed, 0
        self._epoch, self._perm = -1, []  # the current epoch's permutation, drawn once

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            epoch, offset = divmod(self.position, self.n)
            order = self._order(epoch)
            chunk = order[offset: offset + k - len(out)]
            out += chunk
            self.position += len(chunk)
        return out

    def peek(self, k: int) -> list[int]:
        """What ``take(k)`` would give, without moving on."""
        position = self.position
        try:
            return self.take(k)
        finally:
            self.position = position

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["n"] != self.n or state["seed"] != self.seed:
            raise DistillError(
                f"resume: the training data changed (checkpoint has {state['n']} examples with seed {state['seed']}, "
                f"now {self.n} with seed {self.seed})"
            )
        self.position = state["position"]


class TrainData:
    """Where the training loop's micro-batches come from: a fixed, shuffled set or a built-in stream.
    ``counts`` says how many training records ``data.overlong`` skipped or truncated."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, seed: int) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.stream_seed = seed
        self.counts: dict[str, int] = {}
        if cfg.stream:
            if cfg.train is not None:
                raise DistillError("data.stream draws from the built-in tasks; unset data.train to use it")
            self.examples: list[tuple[list[int], list[int]]] = []
            self.records: list[Record] = []
            self._stream = builtin_stream(cfg, seed)
            self.position = 0
        else:
            self.records, self.examples, self.counts = encode_split(cfg, "train", tokenizer)
            if not self.examples:
                raise DistillError(
                    f"data.train: all {self.counts['records']} records have prompts of at least data.max_length="
                    f"{cfg.max_length} tokens"
                )
            self.sampler = EpochSampler(len(self.examples), seed)

    def next_pairs(self, size: int) -> list[tuple[list[int], list[int]]]:
        """The next ``size`` (prompt, completion) token-id pairs."""
        return self.next_examples(size)[0]

    def next_examples(self, size: int) -> tuple[list[tuple[list[int], list[int]]], list[Record]]:
        """The next ``size`` pairs and the records they encode (for rewards)."""
        if self.cfg.stream:  # built-in examples are short: max_length is an error, not a filter
            records = [next(self._stream) for _ in range(size)]
            self.position += size
            return [encode(r, self.tokenizer, self.cfg.max_length) for r in records], records
        taken = self.sampler.take(size)
        return [self.examples[i] for i in taken], [self.records[i] for i in taken]

    def peek_pairs(self, size: int) -> list[tuple[list[int], list[int]]] | None:
        """The pairs the next ``next_pairs`` calls will give, ``size`` of them, without moving on;
        None for a stream (it cannot look ahead)."""
        if self.cfg.stream:
            return None
        return [self.examples[i] for i in self.sampler.peek(size)]

    def next_batch(self, size: int) -> Batch:
        return collate(self.next_pairs(size), self.tokenizer.pad_token_id)

    def state_dict(self) -> dict[str, int]:
        return {"stream_position": self.position} if self.cfg.stream else self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self.cfg.stream:
            # The stream is a pure function of the seed: replay it up to the saved position.
            self._stream = builtin_stream(self.cfg, self.stream_seed)
            for _ in range(state["stream_position"]):
                next(self._stream)
            self.position = state["stream_position"]
        else:
            self.sampler.load_state_dict(state)
