"""A model's LM head read from its checkpoint alone: the weight (tied to the input embedding or
not) and the bias if it has one, by a partial safetensors read that never loads the body.

What a trainer needs beside a teacher that runs elsewhere (served, or cached on disk): with the
teacher's final hidden states and this head, the fused loss computes the exact full-vocabulary
divergence. A config that transforms the logits after the head (soft-capping, scaling) is refused
by name, as the fused loss refuses it for an in-process teacher.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from distill.errors import DistillError
from distill.models import logit_transforms

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass
class LMHead:
    """The head's weight ``[V, H]`` and bias ``[V]`` (or None), and the checkpoint names read."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    names: list[str]


def _head_names(config) -> tuple[list[str], str | None]:
    """The checkpoint names that may hold the head's weight (the head's own, then the tied input
    embedding's), and its bias's name; from the architecture built on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    weight_names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is head.weight]
    if not weight_names:  # a head whose weight is not a parameter of the model (never seen)
        raise DistillError(f"{type(model).__name__}: cannot find its LM head's weight among its parameters")
    bias = next((n for n, p in model.named_parameters(remove_duplicate=False)
                 if head.bias is not None and p is head.bias), None)
    prefix = getattr(model, "base_model_prefix", "")
    # Older checkpoints store the base model's parameters without its prefix (``transformer.`` ...).
    weight_names += [n.removeprefix(prefix + ".") for n in weight_names if prefix and n.startswith(prefix + ".")]
    return weight_names, bias


def _files(model_dir: Path) -> dict[str, Path]:
    """Checkpoint name -> the safetensors file holding it (a sharded checkpoint's index, or the one file)."""
    if (model_dir / INDEX).is_file():
        try:
            weight_map = json.loads((model_dir / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise DistillError(f"{model_dir / INDEX}: not a safetensors index ({e})") from None
        return {name: model_dir / file for name, file in weight_map.items()}
    if (model_dir / SINGLE).is_file():
        with safe_open(str(model_dir / SINGLE), "pt") as f:
            return dict.fromkeys(f.keys(), model_dir / SINGLE)
    raise DistillError(f"{model_dir}: no {SINGLE} or {INDEX}; the head is read from safetensors checkpoints")


def load_lm_head(model_dir: str | Path, dtype: torch.dtype | None = None) -> LMHead:
    """The LM head of the causal LM saved in ``model_dir``, reading only its own tensors (cast to
    ``dtype`` when given). DistillError, by name, for a config that transforms the logits after
    the head, and for a checkpoint without the head's weight."""
    model_dir = Path(model_dir)
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise DistillError(f"{model_dir}: cannot read a model config: {e}") from None
    if transforms := logit_transforms(config):
        raise DistillError(f"{model_dir}: its config transforms the logits after the LM head "
                           f"({', '.join(transforms)}); its hidden states and head are not its logits")
    weight_names, bias_name = _head_names(config)
    files = _files(model_dir)
    found = next((n for n in weight_names if n in files), None)
    if found is None:
        raise DistillError(f"{model_dir}: the checkpoint holds none of {', '.join(dict.fromkeys(weight_names))} "
                           "(the LM head's weight)")
    names = [found] + ([bias_name] if bias_name else [])
    tensors = {}
    for name in names:
        if name not in files:
            raise DistillError(f"{model_dir}: the checkpoint lacks the LM head's bias {name}")
        with safe_open(str(files[name]), "pt") as f:
            tensors[name] = f.get_tensor(name)
    weight, bias = tensors[found], tensors.get(bias_name)
    if dtype is not None:
        weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    return LMHead(weight, bias, names)
