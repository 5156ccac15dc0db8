"""Propose and verify: a draft model proposes gamma tokens, a target model judges them in one
forward (Leviathan et al. 2023). One loop, two kinds of acceptance rule:

Lossless speculative sampling (``lossless``), per round and per sequence of the batch:
  1. the draft proposes x_1..x_gamma, x_i ~ q_i, with its KV cache;
  2. the target scores the prefix and all gamma drafts in one forward: p_1..p_{gamma+1};
  3. x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection a token
     is drawn from norm(max(0, p_i - q_i)) and the round ends; if all gamma are accepted, a bonus
     token is drawn from p_{gamma+1}.
The emitted sequence is distributed exactly as sampling from the target alone (tested with a
chi-square test). Greedy decoding (``greedy``) accepts while the draft equals the target's argmax
and emits the target's argmax at the first mismatch: exactly the target's greedy output.

Block-wise speculative KD (``teacher_top_k``; the student drafts, the teacher verifies): x_i is
accepted while it is among the teacher's top-K tokens at its position (or inside its top-p
nucleus); at the first rejection a token is drawn from the teacher's p_i and the round ends; a
fully accepted block gets no bonus token. Drafts after a rejection were conditioned on a token
that is no longer there, so dropping them gives exactly token-by-token SKD (tested).

A rule sees the drafts, the draft's distributions q and the target's logits, and returns a
``Verdict``: the round's tokens and how many are emitted. Rules are pure functions of tensors
(tested without models); the loop below is the same for all of them.

Rolling back needs each layer's whole history, so models whose caches cannot be cropped
(linear attention, state-space layers) are refused; sliding-window layers keep a full cache and
the attention mask applies the window.

Batches: sequences emit different numbers of tokens per round. Both KV caches are cropped to the
longest run of the batch (the rollback). In shorter runs the positions of rejected drafts become
holes: masked out of attention and skipped by the position ids, so their stale keys and values
can stay in the cache and nothing is computed twice. Every sequence keeps its own tokens and all
share one cache length.

``lenience`` (lossy, off by default) accepts with min(1, p / (lenience q)) and draws rejections
from norm(max(0, p - lenience q)); the output is then NOT the target's distribution.
"""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, GenerationConfig, PretrainedConfig, PreTrainedModel


@dataclass
class SpeculativeStats:
    """Acceptance statistics of one ``propose_and_verify`` call (``speculative_generate``, SKD)."""

    gamma: int
    rounds: int = 0  # target forwards (one per round)
    emitted: int = 0  # tokens emitted over all sequences (through EOS, capped at max_new_tokens)
    # accepted_at[k] / reached_at[k]: acceptance of the (k+1)-th draft of a round, given that
    # the k drafts before it were accepted.
    reached_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)
    sequence_rounds: int = 0  # rounds summed over sequences (a finished sequence stops counting)
    produced: int = 0  # tokens the rounds produced, before EOS or max_new_tokens cut a round short

    def __post_init__(self) -> None:
        self.reached_at = self.reached_at or [0] * self.gamma
        self.accepted_at = self.accepted_at or [0] * self.gamma

    def record(self, reached: list[int], accepted: list[int]) -> None:
        """Add one round's judged and accepted drafts by position (summed over sequences)."""
        self.reached_at = [a + b for a, b in zip(self.reached_at, reached, strict=True)]
        self.accepted_at = [a + b for a, b in zip(self.accepted_at, accepted, strict=True)]

    def merge(self, other: SpeculativeStats) -> None:
        """Add the counts of another call with the same gamma (e.g. the next batch of prompts)."""
        self.rounds += other.rounds
        self.emitted += other.emitted
        self.sequence_rounds += other.sequence_rounds
        self.produced += other.produced
        self.record(other.reached_at, other.accepted_at)

    @property
    def drafted(self) -> int:
        """Drafts the target judged, over all sequences and rounds."""
        return sum(self.reached_at)

    @property
    def accepted(self) -> int:
        return sum(self.accepted_at)

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / proposed drafts."""
        return self.accepted / max(self.drafted, 1)

    @property
    def block_efficiency(self) -> float:
        """tau: tokens a round produces per sequence (lossless: its accepted drafts plus one), counted
        before EOS or max_new_tokens cut a sequence's last round short, as in Leviathan et al."""
        return self.produced / max(self.sequence_rounds, 1)

    @property
    def target_forwards_per_token(self) -> float:
        """Target forwards per produced token of a sequence: 1 / tau."""
        return self.sequence_rounds / max(self.produced, 1)

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / max(r, 1) for a, r in zip(self.accepted_at, self.reached_at, strict=True)]


@dataclass
class SpeculativeOutput:
    sequences: torch.Tensor  # [B, prompt + new], right-padded with pad_token_id after EOS / the end
    stats: SpeculativeStats
    # With keep_target_hidden: [B, new, H_target], the target's final hidden state at the position
    # that predicts each new token (what a loss on the target's distributions needs); 0 after the end.
    target_hidden: torch.Tensor | None = None


class Verifier(ABC):
    """The target's side of the propose-and-verify loop: forwards over the loop's shared token
    buffer with a KV cache that rolls back (``crop``). ``CachedForward`` runs a model here; a
    served teacher's runs on its worker (``distill.remote.teacher``). A teacher hands one over for
    SKD's verification rounds (``distill.teacher.Teacher.verifier``)."""

    config: PretrainedConfig  # the target's model config (vocabulary, attention window)
    length: int = 0  # positions of the buffer held in the cache
    window: int | None = None  # the smallest sliding attention window, if any

    @abstractmethod
    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, upto: int, hidden: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Feed buffer positions [length, upto); return the logits of those positions (and with
        ``hidden`` the final hidden states there, after the last norm). Position ids count real
        tokens only, so holes and left padding take no position."""

    def crop(self, length: int) -> None:
        """Forget the cached positions from ``length`` on (rejected drafts)."""
        self.length = min(self.length, length)

    def close(self) -> None:
        """The generation is over: let go of the cache."""
        self.length = 0

    @property
    def generation_config(self) -> GenerationConfig | None:
        return None


def rollback_window(config: PretrainedConfig) -> int | None:
    """The smallest sliding attention window of a model whose KV cache can roll back (every layer
    keeps its full history); ValueError for cache layers that cannot."""
    # Rolling back needs every layer's full history: plain full-attention cache layers, also for
    # sliding-window layers (the attention mask applies their window; a sliding cache layer
    # would have dropped what a rollback needs).
    layers = DynamicCache(config=config).layers
    kinds = {type(layer).__name__ for layer in layers} - {"DynamicLayer", "DynamicSlidingWindowLayer"}
    if kinds:
        raise ValueError(
            f"speculative decoding rolls KV caches back on rejection; {config.model_type} has "
            f"{', '.join(sorted(kinds))} cache layers, which cannot be rolled back"
        )
    windows = [layer.sliding_window for layer in layers if hasattr(layer, "sliding_window")]
    return min(windows) if windows else None


class CachedForward(Verifier):
    """A causal LM's forwards in this process, with a rolling-back KV cache: how the loop calls the
    draft and the target (and a served teacher's worker, ``hidden_only``)."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model, self.config = model, model.config
        self.window = rollback_window(model.config)
        self.cache = DynamicCache()
        self.length = 0

    @property
    def generation_config(self) -> GenerationConfig | None:
        return self.model.generation_config

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, upto: int, hidden: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        positions = (mask[:, :upto].cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=tokens[:, self.length: upto], attention_mask=mask[:, :upto],
            position_ids=positions[:, self.length:], use_cache=True, output_hidden_states=hidden,
            **cache_kwargs(self.model, self.cache),
        )
        self.length = upto
        return (out.logits, out.hidden_states[-1]) if hidden else out.logits

    @torch.no_grad()
    def hidden_only(self, block: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The final hidden states (the decoder without the LM head; equal to those ``forward``
        returns with ``hidden``) of ``block``, the buffer's positions [length, upto) where upto is
        ``mask``'s width: a served teacher's worker gets the new positions alone."""
        upto = mask.shape[1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        decoder = self.model.get_decoder()
        out = decoder(input_ids=block, attention_mask=mask, position_ids=positions[:, self.length:], use_cache=True,
                      **cache_kwargs(decoder, self.cache))
        self.length = upto
        return out.last_hidden_state

    def crop(self, length: int) -> None:
        if length < self.length:
            self.cache.crop(length - self.length)  # transformers 5: a negative count removes tokens
            self.length = length

    def close(self) -> None:
        self.cache = DynamicCache()
        self.length = 0


def cache_kwargs(model: PreTrainedModel, cache: DynamicCache) -> dict[str, DynamicCache]:
    """The KV cache as the model's forward takes it: ``cache`` (newer transformers 5, where
    ``past_key_values`` is deprecated) or ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper passes kwargs on
    return {_cache_argument(type(base)): cache}


@functools.cache
def _cache_argument(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def check_draft_vocab(target: PreTrainedModel | PretrainedConfig, draft: PreTrainedModel) -> None:
    """The draft reads every token the target emits: it needs at least the target's vocabulary rows."""
    rows = draft.get_input_embeddings().weight.shape[0]
    config = target if isinstance(target, PretrainedConfig) else target.config
    if rows < config.vocab_size:
        raise ValueError(
            f"the draft embeds {rows} tokens but the target can emit {config.vocab_size}: "
            "pad the draft's vocabulary first (distill export-draft)"
        )


@dataclass
class Verdict:
    """A round's outcome per sequence: ``tokens[:, :n_emit]`` are emitted and ``n_ok`` drafts were
    accepted. Tokens before the last emitted one must be the drafts themselves (the KV caches keep
    what was drafted); the last may be a new token."""

    tokens: torch.Tensor  # [B, gamma + 1]
    n_emit: torch.Tensor  # [B], in 1 .. gamma + 1
    n_ok: torch.Tensor  # [B], in 0 .. gamma


# rule(drafts [B, gamma], q [B, gamma, V] or None (a greedy draft), target logits [B, gamma + 1, V],
# generator) -> Verdict. The target's logits at i score drafts[:, i]; the last position follows a
# fully accepted block.
Rule = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Generator | None], Verdict]


def _accepted_prefix(ok: torch.Tensor) -> torch.Tensor:
    """Per row, how many leading entries of ``ok`` are True."""
    return torch.cumprod(ok.long(), 1).sum(1)


def _drafts_then(drafts: torch.Tensor, at: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """[B, gamma + 1]: the drafts with ``token`` at position ``at`` of each row."""
    tokens = torch.cat([drafts, drafts[:, :1]], 1)
    tokens[torch.arange(len(drafts), device=drafts.device), at] = token
    return tokens


def lossless(drafts: torch.Tensor, q: torch.Tensor, t_logits: torch.Tensor, generator: torch.Generator | None = None,
             *, temperature: float = 1.0, lenience: float | None = None) -> Verdict:
    """Speculative sampling's ratio test, a residual sample at the first rejection, else a bonus
    token from the last position (lossy with ``lenience``)."""
    gamma, rows = drafts.shape[1], torch.arange(len(drafts), device=drafts.device)
    p = torch.softmax(t_logits.float() / temperature, dim=-1)  # [B, gamma + 1, V]
    p_x = p[:, :gamma].gather(-1, drafts[..., None]).squeeze(-1)
    q_x = q.gather(-1, drafts[..., None]).squeeze(-1)
    scale = 1.0 if lenience is None else lenience
    u = torch.rand(drafts.shape, generator=generator, device=drafts.device)
    n_ok = _accepted_prefix(u * scale * q_x < p_x)  # u < p / (scale q), without dividing by q = 0
    p_next = p[rows, n_ok]
    q_next = torch.cat([q, torch.zeros_like(q[:, :1])], 1)[rows, n_ok]
    residual = (p_next - scale * q_next).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)  # p == q up to rounding
    nxt = torch.multinomial(residual, 1, generator=generator).squeeze(1)
    return Verdict(_drafts_then(drafts, n_ok, nxt), n_ok + 1, n_ok)


def greedy(drafts: torch.Tensor, q: torch.Tensor | None, t_logits: torch.Tensor,
           generator: torch.Generator | None = None) -> Verdict:
    """Accept while the draft is the target's argmax; then the target's argmax (a bonus after a
    fully accepted block)."""
    pick = t_logits.argmax(-1)  # [B, gamma + 1]
    n_ok = _accepted_prefix(drafts == pick[:, : drafts.shape[1]])
    return Verdict(_drafts_then(drafts, n_ok, pick[torch.arange(len(drafts), device=drafts.device), n_ok]),
                   n_ok + 1, n_ok)


def teacher_top_k(drafts: torch.Tensor, q: torch.Tensor | None, t_logits: torch.Tensor,
                  generator: torch.Generator | None = None, *, k: int | None = None, top_p: float | None = None,
                  temperature: float = 1.0, greedy_teacher: bool = False) -> Verdict:
    """SKD: accept while the draft is among the teacher's top ``k`` tokens (ties: fewer than k
    tokens score strictly higher) or, with ``top_p``, inside its nucleus (the mass of tokens
    strictly more probable than the draft is below top_p); at the first rejection a token from the
    teacher (a sample at ``temperature``, or its argmax with ``greedy_teacher``). No bonus token."""
    if (k is None) == (top_p is None):
        raise ValueError("teacher_top_k takes k or top_p")
    gamma, rows = drafts.shape[1], torch.arange(len(drafts), device=drafts.device)
    z = t_logits[:, :gamma].float()
    above = z > z.gather(-1, drafts[..., None])  # tokens the teacher ranks strictly higher than the draft
    mass_above = above.sum(-1) if top_p is None else (torch.softmax(z / temperature, dim=-1) * above).sum(-1)
    ok = mass_above < (k if top_p is None else top_p)
    n_ok = _accepted_prefix(ok)
    rejected = n_ok < gamma
    at = n_ok.clamp(max=gamma - 1)
    z_at = z[rows, at]
    if greedy_teacher:
        replacement = z_at.argmax(-1)
    else:
        replacement = torch.multinomial(torch.softmax(z_at / temperature, dim=-1), 1, generator=generator).squeeze(1)
    tokens = _drafts_then(drafts, at, torch.where(rejected, replacement, drafts[rows, at]))
    return Verdict(tokens, n_ok + rejected.long(), n_ok)


@torch.no_grad()
def propose_and_verify(
    target: PreTrainedModel | CachedForward,
    draft: PreTrainedModel,
    input_ids: torch.Tensor,
    rule: Rule,
    *,
    attention_mask: torch.Tensor | None = None,
    gamma: int = 4,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    do_sample: bool = True,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    vocab: int | None = None,
    keep_target_hidden: bool = False,
) -> SpeculativeOutput:
    """The loop every rule shares: ``draft`` proposes ``gamma`` tokens a round (sampled at
    ``temperature``, or its argmax without ``do_sample``) with its KV cache, ``target`` scores them
    in one forward, ``rule`` decides what is emitted; both caches are rolled back to it. Up to
    ``max_new_tokens`` per sequence, through the first EOS. ``input_ids`` may be left-padded
    (``attention_mask``). ``eos_token_id`` and ``pad_token_id`` default to the target's generation
    config; ``eos_token_id=[]`` never stops early. Draft vocabulary rows beyond the target's are
    never proposed; ``vocab`` (e.g. a shared tokenizer's length) limits both models to its first
    rows. Returns the sequences (prompt then new tokens, right-padded with the pad id after EOS)
    and acceptance statistics; with ``keep_target_hidden`` also the target's final hidden states
    that predicted each new token, from its verification forwards (no forward of its own).
    ``target`` may come as its ``CachedForward`` (a teacher's verifier)."""
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1; got {gamma}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    t_model = target if isinstance(target, Verifier) else CachedForward(target)
    if vocab is None:
        check_draft_vocab(t_model.config, draft)
        vocab = t_model.config.vocab_size
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.long)
    if not bool(mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: the attention mask has padding in the last column")
    gen_cfg = t_model.generation_config or GenerationConfig()
    if eos_token_id is None:
        eos_token_id = gen_cfg.eos_token_id
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    pad = next(x for x in (pad_token_id, gen_cfg.pad_token_id, *eos, 0) if x is not None)
    device = input_ids.device
    bsz, prompt_len = input_ids.shape
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
    d_model = CachedForward(draft)
    window = min((w for w in (t_model.window, d_model.window) if w is not None), default=None)
    if window is not None and bsz > 1 and prompt_len + (gamma + 1) * max_new_tokens > window:
        # Holes take buffer positions, and a sliding window counts buffer positions.
        raise ValueError(
            f"batched speculative decoding leaves holes in the KV cache, which a sliding attention window "
            f"({window}) would count: decode this model one sequence at a time"
        )

    # The shared buffer: prompt, then each round's tokens; holes (mask 0) where drafts were rejected.
    capacity = prompt_len + max_new_tokens + gamma + 1
    tokens = torch.full((bsz, capacity), pad, dtype=torch.long, device=device)
    full_mask = torch.zeros((bsz, capacity), dtype=torch.long, device=device)
    tokens[:, :prompt_len], full_mask[:, :prompt_len] = input_ids, mask
    length = prompt_len  # used buffer positions
    new = torch.full((bsz, max_new_tokens), pad, dtype=torch.long, device=device)  # emitted tokens
    new_hidden = None  # [B, max_new_tokens, H]: the target's hidden state before each emitted token
    n_new = torch.zeros(bsz, dtype=torch.long, device=device)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    rows = torch.arange(bsz, device=device)
    j_round = torch.arange(gamma + 1, device=device)[None]
    stats = SpeculativeStats(gamma)

    # Prefill both caches with all but the last prompt position.
    if length > 1:
        t_model.forward(tokens, full_mask, length - 1)
        d_model.forward(tokens, full_mask, length - 1)

    while not bool(done.all()):
        live = ~done
        # 1. Draft gamma tokens (finished sequences draft into holes). Draft rows beyond the
        # target's vocabulary are dropped: the renormalised q is still a valid proposal.
        q_all, drafts = [], []
        for i in range(gamma):
            logits = d_model.forward(tokens, full_mask, length + i)[:, -1, :vocab]
            if do_sample:
                q = torch.softmax(logits.float() / temperature, dim=-1)
                x = torch.multinomial(q, 1, generator=generator).squeeze(1)
                q_all.append(q)
            else:
                x = logits.argmax(-1)
            tokens[:, length + i] = torch.where(live, x, pad)
            full_mask[:, length + i] = live.long()
            drafts.append(x)
        drafts = torch.stack(drafts, 1)  # [B, gamma]

        # 2. The target scores the last emitted token and all drafts in one forward; 3. the rule.
        if keep_target_hidden:
            t_logits, t_hidden = t_model.forward(tokens, full_mask, length + gamma, hidden=True)
            t_logits, t_hidden = t_logits[:, -(gamma + 1):, :vocab], t_hidden[:, -(gamma + 1):]
        else:
            t_logits = t_model.forward(tokens, full_mask, length + gamma)[:, -(gamma + 1):, :vocab]
        stats.rounds += 1
        verdict = rule(drafts, torch.stack(q_all, 1) if do_sample else None, t_logits, generator)
        n_emit = verdict.n_emit * live  # nothing from finished sequences

        # 4. Count, emit (up to the first EOS and max_new_tokens), roll back, punch holes.
        judged = verdict.n_ok.clamp(max=gamma - 1) + 1  # drafts the target got to judge, per sequence
        j = j_round[:, :gamma]
        counts = torch.stack([(j < judged[:, None]) & live[:, None], (j < verdict.n_ok[:, None]) & live[:, None]])
        counts = torch.cat([counts.sum(1).flatten(), live.sum()[None], n_emit.sum()[None]]).tolist()  # one sync
        stats.record(counts[:gamma], counts[gamma: 2 * gamma])
        stats.sequence_rounds += counts[-2]
        stats.produced += counts[-1]
        is_eos = torch.isin(verdict.tokens, eos_ids) & (j_round < n_emit[:, None])
        ends_at = torch.where(is_eos.any(1), is_eos.long().argmax(1) + 1, n_emit)  # through the first EOS
        take = torch.minimum(ends_at, max_new_tokens - n_new) * live
        put = j_round < take[:, None]
        at_rows, at_cols = rows[:, None].expand_as(put)[put], (n_new[:, None] + j_round)[put]
        new[at_rows, at_cols] = verdict.tokens[put]
        if keep_target_hidden:  # round position j of the target's forward predicted round token j
            if new_hidden is None:
                new_hidden = t_hidden.new_zeros((bsz, max_new_tokens, t_hidden.shape[-1]))
            new_hidden[at_rows, at_cols] = t_hidden[put]
        done |= live & ((n_new + take == max_new_tokens) | (is_eos & put).any(1))
        n_new += take
        # Buffer: emitted drafts stay where they are; each sequence's last emitted token goes to the
        # end of the longest run, so that every sequence's last real token is the buffer's last
        # position; in between, the rejected drafts of shorter runs become holes. The caches keep
        # every position before that last token: each is an emitted draft or a (masked) hole.
        if bool(live.any()):
            longest = int(n_emit.max())
            jj = j_round[:, :longest]
            keep = (jj < (n_emit - 1)[:, None]) & live[:, None]
            region = slice(length, length + longest)
            last = verdict.tokens[rows, (n_emit - 1).clamp(min=0)]
            tokens[:, region] = torch.where(keep, verdict.tokens[:, :longest], pad)
            tokens[:, length + longest - 1] = torch.where(live, last, pad)
            full_mask[:, region] = (keep | ((jj == longest - 1) & live[:, None])).long()
            full_mask[:, length + longest: length + gamma + 1] = 0
            t_model.crop(length + longest - 1)
            d_model.crop(min(d_model.length, length + longest - 1))
            length += longest
        if length + gamma + 1 > tokens.shape[1]:  # holes used up the room: grow the buffer
            grow = gamma + 1 + max_new_tokens
            tokens = torch.cat([tokens, tokens.new_full((bsz, grow), pad)], 1)
            full_mask = torch.cat([full_mask, full_mask.new_zeros((bsz, grow))], 1)

    stats.emitted = int(n_new.sum())
    width = int(n_new.max())
    return SpeculativeOutput(torch.cat([input_ids, new[:, :width]], 1), stats,
                             None if new_hidden is None else new_hidden[:, :width])


def speculative_generate(
    target: PreTrainedModel,
    draft: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    gamma: int = 4,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    do_sample: bool = True,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    lenience: float | None = None,
    generator: torch.Generator | None = None,
) -> SpeculativeOutput:
    """Generate from ``target`` with ``draft`` proposing ``gamma`` tokens per round: sampling at
    ``temperature`` distributed exactly as the target's own (``lossless``), or with
    ``do_sample=False`` exactly the target's greedy output (``greedy``). ``lenience`` in (0, 1]
    turns on LOSSY speculative sampling (1.0 is the lossless rule). Arguments otherwise as
    ``propose_and_verify``."""
    if lenience is not None and not do_sample:
        raise ValueError("lenience applies to sampling; greedy decoding (do_sample=False) has no acceptance test")
    if lenience is not None and not 0 < lenience <= 1:
        raise ValueError(f"lenience must lie in (0, 1] (lossy speculative sampling); got {lenience}")
    rule = functools.partial(lossless, temperature=temperature, lenience=lenience) if do_sample else greedy
    return propose_and_verify(target, draft, input_ids, rule, attention_mask=attention_mask, gamma=gamma,
                              max_new_tokens=max_new_tokens, temperature=temperature, do_sample=do_sample,
                              eos_token_id=eos_token_id, pad_token_id=pad_token_id, generator=generator)
