"""Speculative decoding: a draft model proposes, the target verifies (Leviathan et al. 2023).

Lossless speculative sampling, per round and per sequence of the batch:
  1. the draft proposes x_1..x_gamma, x_i ~ q_i, with its KV cache;
  2. the target scores the prefix and all gamma drafts in one forward: p_1..p_{gamma+1};
  3. x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection a token
     is drawn from norm(max(0, p_i - q_i)) and the round ends; if all gamma are accepted, a bonus
     token is drawn from p_{gamma+1}.
The emitted sequence is distributed exactly as sampling from the target alone (tested with a
chi-square test). Greedy decoding accepts while the draft equals the target's argmax and emits
the target's argmax at the first mismatch, so it returns the target's greedy output exactly.

Rolling back needs each layer's whole history, so models whose caches cannot be cropped
(linear attention, state-space layers) are refused; sliding-window layers keep a full cache and
the attention mask applies the window.

Batches: sequences accept different numbers of drafts. Both KV caches are cropped to the
longest accepted run of the batch (the rollback). In shorter runs the positions of rejected
drafts become holes: masked out of attention and skipped by the position ids, so their stale
keys and values can stay in the cache and nothing is computed twice. Every sequence keeps its
own accepted tokens and all share one cache length.

``lenience`` (lossy, off by default) accepts with min(1, p / (lenience q)) and draws rejections
from norm(max(0, p - lenience q)); the output is then NOT the target's distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel


@dataclass
class SpeculativeStats:
    """Acceptance statistics of one ``speculative_generate`` call."""

    gamma: int
    rounds: int = 0  # target forwards (one per round)
    emitted: int = 0  # tokens emitted over all sequences (through EOS, capped at max_new_tokens)
    # accepted_at[k] / reached_at[k]: acceptance of the (k+1)-th draft of a round, given that
    # the k drafts before it were accepted.
    reached_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)
    sequence_rounds: int = 0  # rounds summed over sequences (a finished sequence stops counting)

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
        """tau: tokens a round produces per sequence (its accepted drafts plus one), counted before
        EOS or max_new_tokens cut a sequence's last round short, as in Leviathan et al."""
        return 1.0 + self.accepted / max(self.sequence_rounds, 1)

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / max(r, 1) for a, r in zip(self.accepted_at, self.reached_at, strict=True)]

    def to_dict(self) -> dict[str, object]:
        return {"gamma": self.gamma, "rounds": self.rounds, "emitted": self.emitted, "drafted": self.drafted,
                "accepted": self.accepted, "acceptance_rate": self.acceptance_rate,
                "block_efficiency": self.block_efficiency, "acceptance_by_position": self.acceptance_by_position}


@dataclass
class SpeculativeOutput:
    sequences: torch.Tensor  # [B, prompt + new], right-padded with pad_token_id after EOS / the end
    stats: SpeculativeStats


class _Model:
    """A causal LM with a KV cache over the shared token buffer."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        # Rolling back needs every layer's full history: plain full-attention cache layers, also for
        # sliding-window layers (the attention mask applies their window; a sliding cache layer
        # would have dropped what a rollback needs).
        layers = DynamicCache(config=model.config).layers
        kinds = {type(layer).__name__ for layer in layers} - {"DynamicLayer", "DynamicSlidingWindowLayer"}
        if kinds:
            raise ValueError(
                f"speculative decoding rolls KV caches back on rejection; {model.config.model_type} has "
                f"{', '.join(sorted(kinds))} cache layers, which cannot be rolled back"
            )
        windows = [layer.sliding_window for layer in layers if hasattr(layer, "sliding_window")]
        self.window: int | None = min(windows) if windows else None
        self.cache = DynamicCache()
        self.length = 0  # positions of the buffer held in the cache

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, upto: int) -> torch.Tensor:
        """Feed buffer positions [length, upto); return the logits of those positions. Position ids
        count real tokens only, so holes and left padding take no position."""
        positions = (mask[:, :upto].cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=tokens[:, self.length: upto], attention_mask=mask[:, :upto],
            position_ids=positions[:, self.length:], past_key_values=self.cache, use_cache=True,
        )
        self.length = upto
        return out.logits

    def crop(self, length: int) -> None:
        if length < self.length:
            self.cache.crop(length - self.length)  # transformers 5: a negative count removes tokens
            self.length = length


def check_draft_vocab(target: PreTrainedModel, draft: PreTrainedModel) -> None:
    """The draft reads every token the target emits: it needs at least the target's vocabulary rows."""
    rows = draft.get_input_embeddings().weight.shape[0]
    if rows < target.config.vocab_size:
        raise ValueError(
            f"the draft embeds {rows} tokens but the target can emit {target.config.vocab_size}: "
            "pad the draft's vocabulary first (distill export-draft)"
        )


@torch.no_grad()
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
    """Generate up to ``max_new_tokens`` per sequence from ``target`` with ``draft`` proposing
    ``gamma`` tokens per round. ``input_ids`` may be left-padded (``attention_mask``).

    ``do_sample=False`` is greedy (exactly the target's greedy output). ``lenience`` in (0, 1]
    turns on LOSSY speculative sampling (1.0 is the lossless rule). ``eos_token_id`` and
    ``pad_token_id`` default to the target's generation config; ``eos_token_id=[]`` never stops
    early. Draft vocabulary rows beyond the target's are never proposed. Returns the sequences
    (prompt then new tokens, right-padded with ``pad_token_id`` after EOS) and acceptance statistics.
    """
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1; got {gamma}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if lenience is not None and not do_sample:
        raise ValueError("lenience applies to sampling; greedy decoding (do_sample=False) has no acceptance test")
    if lenience is not None and not 0 < lenience <= 1:
        raise ValueError(f"lenience must lie in (0, 1] (lossy speculative sampling); got {lenience}")
    check_draft_vocab(target, draft)
    vocab = target.config.vocab_size
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.long)
    if not bool(mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: the attention mask has padding in the last column")
    gen_cfg = target.generation_config
    if eos_token_id is None:
        eos_token_id = gen_cfg.eos_token_id
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    pad = next(x for x in (pad_token_id, gen_cfg.pad_token_id, *eos, 0) if x is not None)
    device = input_ids.device
    bsz, prompt_len = input_ids.shape
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
    t_model, d_model = _Model(target), _Model(draft)
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

        # 2. The target scores the last accepted token and all drafts in one forward.
        t_logits = t_model.forward(tokens, full_mask, length + gamma)[:, -(gamma + 1):, :vocab]
        stats.rounds += 1

        # 3. Accept per sequence; then the token after the accepted prefix: a residual sample at a
        # rejection, the bonus token from p_{gamma+1} otherwise.
        if do_sample:
            q_all = torch.stack(q_all, 1)  # [B, gamma, V]
            p_all = torch.softmax(t_logits.float() / temperature, dim=-1)  # [B, gamma + 1, V]
            p_x = p_all[:, :gamma].gather(-1, drafts[..., None]).squeeze(-1)
            q_x = q_all.gather(-1, drafts[..., None]).squeeze(-1)
            scale = 1.0 if lenience is None else lenience
            u = torch.rand(drafts.shape, generator=generator, device=device)
            ok = u * scale * q_x < p_x  # u < p / (scale q), without dividing by q = 0
            n_ok = torch.cumprod(ok.long(), 1).sum(1)  # accepted prefix length, [B]
            p_next = p_all[rows, n_ok]
            q_next = torch.cat([q_all, torch.zeros_like(q_all[:, :1])], 1)[rows, n_ok]
            residual = (p_next - scale * q_next).clamp(min=0)
            # Where the residual vanishes (p == q up to rounding) sample from p itself.
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
            nxt = torch.multinomial(residual, 1, generator=generator).squeeze(1)
        else:
            target_pick = t_logits.argmax(-1)  # [B, gamma + 1]
            n_ok = torch.cumprod((drafts == target_pick[:, :gamma]).long(), 1).sum(1)
            nxt = target_pick[rows, n_ok]

        # 4. Count, emit (up to the first EOS and max_new_tokens), roll back, punch holes.
        judged = n_ok.clamp(max=gamma - 1) + 1  # drafts the target got to judge, per sequence
        j = j_round[:, :gamma]
        counts = torch.stack([(j < judged[:, None]) & live[:, None], (j < n_ok[:, None]) & live[:, None]]).sum(1)
        stats.record(*counts.tolist())  # one device sync for both counts
        stats.sequence_rounds += int(live.sum())
        round_tokens = torch.cat([drafts, drafts[:, :1]], 1)
        round_tokens[rows, n_ok] = nxt  # the accepted drafts, then the next token
        valid = j_round <= n_ok[:, None]
        is_eos = torch.isin(round_tokens, eos_ids) & valid
        ends_at = torch.where(is_eos.any(1), is_eos.long().argmax(1) + 1, n_ok + 1)  # through the first EOS
        take = torch.minimum(ends_at, max_new_tokens - n_new) * live
        put = j_round < take[:, None]
        new[rows[:, None].expand_as(put)[put], (n_new[:, None] + j_round)[put]] = round_tokens[put]
        done |= live & ((n_new + take == max_new_tokens) | (is_eos & put).any(1))
        n_new += take
        # Buffer: accepted drafts stay where they are; the next token goes to the end of the
        # longest accepted run, so that every sequence's last real token is the buffer's last
        # position; in between, the rejected drafts of shorter runs become holes. The caches keep
        # every position before the next token: each is an accepted draft or a (masked) hole.
        if bool(live.any()):
            longest = int(n_ok[live].max())
            jj = j_round[:, : longest + 1]
            keep = (jj < n_ok[:, None]) & live[:, None]
            region = slice(length, length + longest + 1)
            tokens[:, region] = torch.where(keep, tokens[:, region], pad)
            tokens[:, length + longest] = torch.where(live, nxt, pad)
            full_mask[:, region] = (keep | ((jj == longest) & live[:, None])).long()
            full_mask[:, length + longest + 1: length + gamma + 1] = 0
            t_model.crop(length + longest)
            d_model.crop(min(d_model.length, length + longest))
            length += longest + 1
        if length + gamma + 1 > tokens.shape[1]:  # holes used up the room: grow the buffer
            grow = gamma + 1 + max_new_tokens
            tokens = torch.cat([tokens, tokens.new_full((bsz, grow), pad)], 1)
            full_mask = torch.cat([full_mask, full_mask.new_zeros((bsz, grow))], 1)

    stats.emitted = int(n_new.sum())
    width = int(n_new.max())
    return SpeculativeOutput(torch.cat([input_ids, new[:, :width]], 1), stats)
