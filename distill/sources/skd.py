"""The ``skd`` source, speculative KD: the student proposes, the teacher replaces what it would not say.

At each position the student draws y_t ~ q; if y_t is not among the teacher's top-K tokens there
(or outside its top-p nucleus) it is replaced by a draw from the teacher's p. K = the vocabulary
is on-policy sampling from the student; K = 1 with a greedy teacher is the teacher's greedy
decoding. Done block-wise on ``distill.speculative``'s propose-and-verify loop with the
``teacher_top_k`` rule: the student drafts gamma tokens, the teacher scores them in one forward,
the longest accepted prefix is kept and the first rejected token replaced. This is distributed
exactly as token-by-token SKD (tested by a chi-square test), at about one teacher forward per
accepted run instead of one per token.
"""

from __future__ import annotations

import functools

import torch
from transformers import PreTrainedModel

from distill.config import SourcesConfig
from distill.data import left_pad
from distill.errors import DistillError
from distill.generation import generating, responses
from distill.schedule import value_at
from distill.sources.base import Generated, GeneratingSource, Round, SourceContext, SourceStats
from distill.speculative import SpeculativeOutput, propose_and_verify, teacher_top_k
from distill.teacher import Teacher, as_teacher


def skd_generate(
    student: PreTrainedModel,
    teacher: Teacher | PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    k: int | None = None,
    top_p: float | None = None,
    gamma: int = 4,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    teacher_greedy: bool = False,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    vocab: int | None = None,
    keep_teacher_hidden: bool = False,
) -> SpeculativeOutput:
    """SKD sequences for left-padded prompts: the student samples at ``temperature``, the teacher
    keeps its top ``k`` (or its ``top_p`` nucleus at ``teacher_temperature``) and replaces the
    first token outside with a sample at ``teacher_temperature`` (its argmax with
    ``teacher_greedy``). ``vocab``: the tokens both may emit (default: the teacher's vocabulary, which
    the student must embed). The statistics count teacher forwards (``rounds``) and accepted drafts.
    ``keep_teacher_hidden``: the output's ``target_hidden`` holds the teacher's final hidden states
    before each new token, from its verification forwards, for the loss (no second teacher forward).
    ``teacher``: a ``distill.teacher.Teacher`` (its ``verifier`` runs the rounds) or a model."""
    teacher = as_teacher(teacher)
    limit = teacher.config.vocab_size if vocab is None else vocab
    if (k is None) == (top_p is None):
        raise ValueError("SKD takes k (top-K) or top_p (nucleus), not both")
    if k is not None and not 1 <= k <= limit:
        raise ValueError(f"k must lie in [1, {limit}] (the vocabulary); got {k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1]; got {top_p}")
    if not teacher_temperature > 0:
        raise ValueError(f"teacher_temperature must be > 0; got {teacher_temperature}")
    rule = functools.partial(teacher_top_k, k=k, top_p=top_p, temperature=teacher_temperature,
                             greedy_teacher=teacher_greedy)
    verifier = teacher.verifier()
    try:
        return propose_and_verify(verifier, student, input_ids, rule, attention_mask=attention_mask, gamma=gamma,
                                  max_new_tokens=max_new_tokens, temperature=temperature, do_sample=True,
                                  eos_token_id=eos_token_id, pad_token_id=pad_token_id, generator=generator,
                                  vocab=vocab, keep_target_hidden=keep_teacher_hidden)
    finally:
        verifier.close()  # a served teacher's worker lets go of this generation's cache


class SKDSource(GeneratingSource):
    name = "skd"
    what = "speculative KD (student drafts, teacher top-k)"
    needs_teacher = True
    runs_teacher = True

    def models(self, ctx: SourceContext) -> tuple[torch.nn.Module, ...]:
        return (ctx.student, *ctx.teacher.generation_models())

    def generation_round(self, cfg: SourcesConfig) -> Round:
        return Round("SKD", ("student", "teacher"), cfg.skd.max_new_tokens + cfg.skd.gamma)

    def generate(self, prompts: list[list[int]], ctx: SourceContext, *, step: int, seed: int,
                 synced: bool) -> Generated:
        if synced:
            raise DistillError("SKD generates with student and teacher gathered whole on every rank, and they do "
                               "not both fit (distill plan); lower sources.weights.skd to 0 or use more ranks")
        s = ctx.cfg.skd
        device = next(ctx.student.parameters()).device
        ids, mask = (x.to(device) for x in left_pad(prompts, ctx.pad_id))
        k = None if s.top_p is not None else round(value_at(s.k, step, ctx.total_steps))
        with generating(ctx.student, ctx.teacher.module):
            out = skd_generate(
                ctx.student, ctx.teacher, ids, attention_mask=mask, k=k, top_p=s.top_p, gamma=s.gamma,
                max_new_tokens=s.max_new_tokens, temperature=s.temperature, teacher_temperature=s.teacher_temperature,
                teacher_greedy=s.teacher_greedy, eos_token_id=ctx.stops, pad_token_id=ctx.pad_id,
                generator=torch.Generator(device).manual_seed(seed), vocab=ctx.vocab,
                keep_teacher_hidden=ctx.keep_teacher_hidden,
            )
        got = responses(out.sequences[:, ids.shape[1]:], ctx.stops)
        hidden = ([h[: len(r)] for h, r in zip(out.target_hidden, got, strict=True)]
                  if ctx.keep_teacher_hidden else None)
        stats = SourceStats(generated=sum(map(len, got)), teacher_forwards=out.stats.sequence_rounds,
                            drafted=out.stats.drafted, accepted=out.stats.accepted)
        return Generated(got, s.max_new_tokens, stats, hidden)
