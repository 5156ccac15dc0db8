"""Generating responses from one model: transformers' ``generate``, batched and KV-cached, on
left-padded prompts, deterministic for a seed, with the model's own generation defaults set aside.
The one helper for the sources' samples and evaluation's greedy and sampled completions
(``sample``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import GenerationConfig, PreTrainedModel

from distill.config import SamplingConfig
from distill.data import left_pad
from distill.models import plain_model
from distill.sharding import full_shape


@contextmanager
def generating(*models: PreTrainedModel | None) -> Iterator[None]:
    """Eval mode (dropout off) and no gradient inside; each model's mode is restored after."""
    modes = [(m, m.training) for m in models if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.train(training)


def responses(new_tokens: torch.Tensor, stops: list[int]) -> list[list[int]]:
    """Each row's generated tokens through its first stop token (all of them without one): what the
    loss counts. Padding after a stop is dropped."""
    out = []
    for row in new_tokens.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        out.append(row[:end])
    return out


def sample(model: PreTrainedModel, prompts: list[list[int]], cfg: SamplingConfig, *, pad_id: int,
           stops: list[int], seed: int, vocab: int | None = None, hidden: list | None = None,
           synced: bool = False) -> list[list[int]]:
    """A response per prompt: sampled at ``cfg.temperature`` with top-k / top-p filtering, or greedy;
    up to ``cfg.max_new_tokens``, through the first stop token; never a token id at or above
    ``vocab`` (the model's padding rows). Nothing else shapes the distribution (the model's own
    generation defaults are set aside). The same seed gives the same responses; the global random
    state is left as it was. With ``hidden`` (a list) the model's final hidden states before each
    response token are appended to it, one ``[len(response), H]`` tensor per prompt, taken from the
    decoding steps themselves (the decoder's output at each step's last position). ``synced``: the
    model is sharded and not gathered; every rank decodes until all are done."""
    device = next(model.parameters()).device
    ids, mask = (x.to(device) for x in left_pad(prompts, pad_id))
    kwargs = dict(do_sample=False) if cfg.greedy else dict(
        do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    rows = full_shape(model.get_output_embeddings().weight)[0]
    if vocab is not None and rows > vocab:
        kwargs["suppress_tokens"] = list(range(vocab, rows))
    # Only these settings: the model's own generation_config.json may hold a repetition penalty,
    # min_new_tokens, ..., and then the samples would not come from the model's distribution.
    plain = plain_model(model)
    saved, plain.generation_config = plain.generation_config, GenerationConfig()
    steps: list[torch.Tensor] = []
    hook = None
    if hidden is not None:  # each decoding step's last position predicts that step's token
        hook = plain.get_decoder().register_forward_hook(
            lambda module, args, output: steps.append(output.last_hidden_state[:, -1]))
    try:
        with generating(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens,
                                 eos_token_id=stops, pad_token_id=pad_id, synced_gpus=synced, **kwargs)
    finally:
        plain.generation_config = saved
        if hook is not None:
            hook.remove()
    got = responses(out[:, ids.shape[1]:], stops)
    if hidden is not None:
        per_step = torch.stack(steps[: out.shape[1] - ids.shape[1]], 1)  # [B, new, H]
        hidden += [per_step[i, : len(r)] for i, r in enumerate(got)]
    return got

