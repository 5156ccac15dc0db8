"""Speculative decoding: lossless in distribution (chi-square), exact in greedy mode."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from distill.config import ASSETS, DataConfig, ModelConfig
from distill.data import builtin_records, left_pad, prompt_ids
from distill.export import export_draft
from distill.models import load_model
from distill.speculative import speculative_generate

V = 5  # tiny vocabulary: every 3-token continuation is a cell of the test


def tiny_lm(seed: int, sharpness: float, vocab: int = V) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)  # distributions far from uniform, and unlike each other
    return model


def exact_distribution(target, prompt: list[int], new: int, temperature: float, eos: int | None = None,
                       pad: int = 0) -> dict[tuple[int, ...], float]:
    """P_target(continuation | prompt) for every continuation of ``new`` tokens, by enumeration. With
    ``eos``, a continuation ends at its first EOS (then ``pad``): its probability is the sum over
    the full continuations it cuts short."""
    conts = list(itertools.product(range(V), repeat=new))
    ids = torch.tensor([prompt + list(c) for c in conts])
    with torch.no_grad():
        logp = torch.log_softmax(target(ids).logits.double() / temperature, -1)
    n = len(prompt)
    probs: dict[tuple[int, ...], float] = {}
    for row, c in enumerate(conts):
        cell = c if eos not in c else c[: c.index(eos) + 1] + (pad,) * (new - c.index(eos) - 1)
        probs[cell] = probs.get(cell, 0.0) + float(sum(logp[row, n - 1 + i, c[i]] for i in range(new)).exp())
    return probs


def chi_square_p(counts: dict, probs: dict, total: int) -> float:
    """Pearson chi-square p-value, cells with expected count < 5 pooled into one."""
    stat, df, pooled_obs, pooled_exp = 0.0, -1, 0, 0.0
    for cell, p in probs.items():
        exp, obs = p * total, counts.get(cell, 0)
        if exp < 5:
            pooled_obs, pooled_exp = pooled_obs + obs, pooled_exp + exp
            continue
        stat, df = stat + (obs - exp) ** 2 / exp, df + 1
    if pooled_exp > 0:
        stat, df = stat + (pooled_obs - pooled_exp) ** 2 / pooled_exp, df + 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(stat / 2.0)))


def sample_counts(target, draft, prompts, reps: int, lenience=None, gamma=2, new=3, temperature=0.8, seed=0, eos=()):
    """Counts of continuations per prompt from one batched call (prompts left-padded with 0; after
    EOS, continuations are padded with 0)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts for _ in range(reps)])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts for _ in range(reps)])
    out = speculative_generate(target, draft, ids, attention_mask=mask, gamma=gamma, max_new_tokens=new,
                               temperature=temperature, lenience=lenience, eos_token_id=list(eos), pad_token_id=0,
                               generator=torch.Generator().manual_seed(seed))
    counts = [dict() for _ in prompts]
    for row, seq in enumerate(out.sequences[:, width:].tolist()):
        c, cell = counts[row // reps], tuple(seq + [0] * (new - len(seq)))
        c[cell] = c.get(cell, 0) + 1
    return counts, out.stats


def test_speculative_sampling_is_lossless_and_accept_all_is_caught():
    target, draft = tiny_lm(0, 6.0), tiny_lm(1, 6.0)
    prompts = [[1, 2, 3, 4], [3, 1]]  # different lengths: padding, and holes from ragged acceptance
    reps = 3000
    exact = [exact_distribution(target, p, 3, 0.8) for p in prompts]
    counts, stats = sample_counts(target, draft, prompts, reps)
    assert 0.05 < stats.acceptance_rate < 0.95  # both accepts and rejections (and bonus tokens) happen
    for c, e in zip(counts, exact, strict=True):
        assert chi_square_p(c, e, reps) > 1e-3
    # Negative control: lenience -> 0 accepts (almost) every draft, so the draft's distribution
    # comes out instead of the target's; the same test must reject it.
    counts, stats = sample_counts(target, draft, prompts, reps, lenience=1e-9)
    assert stats.acceptance_rate > 0.99
    for c, e in zip(counts, exact, strict=True):
        assert chi_square_p(c, e, reps) < 1e-6


def test_lossless_with_eos_and_a_draft_with_more_rows_than_the_target():
    """Sequences that stop at EOS inside an accepted run, in a batch that goes on; and a draft whose
    extra vocabulary rows are dropped from its proposals (never emitted, still lossless)."""
    target = tiny_lm(0, 6.0)
    draft = tiny_lm(1, 6.0, vocab=V + 3)
    reps, eos = 3000, 2
    exact = [exact_distribution(target, p, 3, 0.8, eos=eos) for p in ([1, 2, 3, 4], [3, 1])]
    assert any(len(cell) == 3 and cell[0] == eos for cell in exact[0])
    counts, stats = sample_counts(target, draft, [[1, 2, 3, 4], [3, 1]], reps, eos=[eos], seed=1)
    ended = sum(n for c in counts for cell, n in c.items() if eos in cell)
    assert ended > 0.1 * 2 * reps  # EOS is common enough to matter
    for c, e in zip(counts, exact, strict=True):
        assert max(max(cell) for cell in c) < V
        assert chi_square_p(c, e, reps) > 1e-3


def test_draft_equal_to_target_accepts_everything():
    target = tiny_lm(0, 6.0)
    counts, stats = sample_counts(target, target, [[1, 2, 3]], 50, gamma=3, new=8)
    assert stats.acceptance_rate > 0.999 and min(stats.acceptance_by_position) > 0.999
    assert stats.block_efficiency == pytest.approx(4.0, abs=0.01)  # gamma + 1 per round: 8 tokens in 2 rounds
    assert stats.emitted == 50 * 8 and stats.sequence_rounds == 50 * 2
    # tau counts whole rounds: 6 tokens also take 2 rounds of 4, the second cut short by max_new_tokens.
    counts, stats = sample_counts(target, target, [[1, 2, 3]], 50, gamma=3, new=6)
    assert stats.block_efficiency == pytest.approx(4.0, abs=0.01)
    assert stats.emitted == 50 * 6 and stats.sequence_rounds == 50 * 2


@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_greedy_speculative_decoding_is_the_targets_greedy_output(teacher_dir, student_dir, gamma, tmp_path):
    """Random tiny teacher (Llama, 24 padding rows) and student (Qwen2, exported as a draft with
    its vocabulary padded): batch of prompts of different lengths, left-padded; token for token
    equal to ``target.generate`` greedy."""
    cpu = torch.device("cpu")
    target = load_model(ModelConfig(path=str(teacher_dir)), "t", cpu)
    with pytest.raises(ValueError, match="export-draft"):
        speculative_generate(target, load_model(ModelConfig(path=str(student_dir)), "s", cpu), torch.tensor([[1]]))
    export_draft(student_dir, teacher_dir, tmp_path / "draft")
    draft = load_model(ModelConfig(path=str(tmp_path / "draft")), "s", cpu).eval()
    tok = AutoTokenizer.from_pretrained(teacher_dir, padding_side="left")
    enc = tok(["Write 66 in words.", "Tom has 5 apples. He eats 2.", "Write 1357"], return_tensors="pt", padding=True)
    ref = target.generate(**enc, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id)
    out = speculative_generate(target, draft, enc.input_ids, attention_mask=enc.attention_mask, gamma=gamma,
                               max_new_tokens=20, do_sample=False, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
    assert torch.equal(out.sequences, ref)
    assert out.stats.rounds >= 20 / (gamma + 1)


@pytest.mark.parametrize("gamma", [2, 4])
def test_greedy_on_the_shipped_models_with_ragged_acceptance(gamma):
    """The trained shipped teacher and student accept runs of very different lengths within one
    batch, so holes appear; their positions and masking must leave the output exactly the
    target's (random tiny models are too flat to catch a wrong position id)."""
    cpu = torch.device("cpu")
    target = load_model(ModelConfig(path=str(ASSETS / "teacher")), "t", cpu).eval()
    draft = load_model(ModelConfig(path=str(ASSETS / "student")), "s", cpu).eval()
    tok = AutoTokenizer.from_pretrained(ASSETS / "teacher")
    prompts = [prompt_ids(r, tok) for r in builtin_records(DataConfig(), "test", 16)]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    ref = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    out = speculative_generate(target, draft, ids, attention_mask=mask, gamma=gamma, max_new_tokens=24,
                               do_sample=False)
    assert torch.equal(out.sequences, ref)
    assert 0.2 < out.stats.acceptance_rate < 0.95  # ragged: some runs accepted, some rejected


def test_sliding_window_target():
    """A Mistral-style sliding window (8) shorter than the output: exact for one sequence; refused
    for a batch, whose holes the window would count."""
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, max_position_embeddings=128, sliding_window=8, eos_token_id=None)
    target = MistralForCausalLM(cfg).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(6.0)
    draft = tiny_lm(1, 6.0)
    ids = torch.tensor([[1, 2, 3, 4]])
    out = speculative_generate(target, draft, ids, gamma=3, max_new_tokens=24, do_sample=False)
    ref = target.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(out.sequences, ref)
    with pytest.raises(ValueError, match="sliding attention window"):
        speculative_generate(target, draft, ids.repeat(2, 1), max_new_tokens=24, do_sample=False)


def test_bad_arguments():
    target = tiny_lm(0, 1.0)
    ids = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="gamma"):
        speculative_generate(target, target, ids, gamma=0)
    with pytest.raises(ValueError, match="lenience"):
        speculative_generate(target, target, ids, lenience=1.5)
    with pytest.raises(ValueError, match="lenience applies to sampling"):
        speculative_generate(target, target, ids, lenience=0.5, do_sample=False)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        speculative_generate(target, target, ids, max_new_tokens=0)
    mamba = MambaForCausalLM(MambaConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, state_size=4))
    with pytest.raises(ValueError, match="mamba has LinearAttentionLayer cache layers, which cannot be rolled back"):
        speculative_generate(mamba, target, ids)
    with pytest.raises(ValueError, match="left-padded"):
        speculative_generate(target, target, torch.tensor([[1, 2], [3, 0]]),
                             attention_mask=torch.tensor([[1, 1], [1, 0]]))
