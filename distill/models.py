"""Loading teacher and student: any causal LM from a local Hugging Face directory, or a fresh one."""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from distill.chat_template import use_one_chat_template
from distill.config import ArchConfig, LoraConfig, ModelConfig
from distill.errors import DistillError
from distill.sharding import full_numel, full_shape, gathered, is_sharded

log = logging.getLogger(__name__)

SPECIAL_TOKEN_ATTRS = ("bos_token", "eos_token", "pad_token", "unk_token")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DistillError(f"trainer.device={name} but no CUDA device is available")
    return torch.device(name)


def load_tokenizer(path: str | Path, role: str = "model", *, set_pad: bool = True) -> Tokenizer:
    """Load a tokenizer from a local directory and (``set_pad``) make sure it can pad."""
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a bad tokenizer.json
        cause = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise DistillError(f"{role}: cannot load a tokenizer from {path}: {cause}") from None
    if set_pad and tok.pad_token is None:
        # Padding positions are always masked, so reusing EOS as the pad token is safe.
        tok.pad_token = tok.eos_token
    return tok


def check_same_tokenizer(a: Tokenizer, b: Tokenizer, a_path: str, b_path: str) -> None:
    """Raise DistillError unless both tokenizers map every token to the same id and share special tokens."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only_a = sorted(set(va) - set(vb))[:3]
        only_b = sorted(set(vb) - set(va))[:3]
        moved = sorted(t for t in set(va) & set(vb) if va[t] != vb[t])[:3]
        detail = (
            f"only in the first: {only_a}" if only_a else f"only in the second: {only_b}" if only_b
            else f"different ids for {moved}"
        )
        raise DistillError(
            f"tokenizers differ ({len(va)} vs {len(vb)} tokens; {detail}): {a_path} and {b_path}. "
            "Distillation needs teacher and student to share one tokenizer."
        )
    for attr in SPECIAL_TOKEN_ATTRS:
        ia, ib = getattr(a, attr + "_id"), getattr(b, attr + "_id")
        if ia != ib:
            raise DistillError(f"tokenizers differ in {attr} ({ia} vs {ib}): {a_path} and {b_path}")


def match_teacher_tokenizer(teacher: ModelConfig, tokenizer: Tokenizer, path: str, chat_template: str | None
                            ) -> None:
    """Before any compute: the teacher's tokenizer must be the student's ``tokenizer`` (from
    ``path``), token by token, and both render chat alike (``data.chat_template``:
    ``use_one_chat_template``). Without a teacher, only the chat-template choice applies."""
    teacher_path = teacher.tokenizer or teacher.path
    teacher_tok = load_tokenizer(teacher_path, "teacher") if teacher.path else None
    if teacher_tok is not None:
        check_same_tokenizer(teacher_tok, tokenizer, str(teacher_path), path)
    use_one_chat_template(teacher_tok, tokenizer, str(teacher_path), path, chat_template)


def check_vocab_rows(model: PreTrainedModel, tokenizer: Tokenizer, where: str) -> None:
    """Every token of the tokenizer needs an embedding row (extra rows are padding)."""
    rows = full_shape(model.get_output_embeddings().weight)[0]
    if rows < len(tokenizer):
        raise DistillError(
            f"{where}: the model has {rows} vocabulary rows but the tokenizer has {len(tokenizer)} tokens"
        )


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_config(arch: ArchConfig, vocab: int, tokenizer: Tokenizer | None = None) -> LlamaConfig:
    """The Llama-layout config of ``arch`` for a vocabulary of ``vocab`` tokens (rows padded up to
    ``arch.vocab_multiple``), with ``tokenizer``'s special tokens."""
    m = arch.vocab_multiple
    special = {} if tokenizer is None else dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaConfig(
        vocab_size=(vocab + m - 1) // m * m,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings,
        **special,
    )


def build_from_arch(arch: ArchConfig, tokenizer: Tokenizer) -> PreTrainedModel:
    """A freshly initialised Llama-layout model sized for ``tokenizer``."""
    return LlamaForCausalLM(build_config(arch, len(tokenizer), tokenizer))


def apply_lora(model: PreTrainedModel, lora: LoraConfig) -> PreTrainedModel:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    target: str | list[str] = lora.target_modules
    if target != "all-linear":
        target = [t.strip() for t in target.split(",")]
    peft_cfg = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, peft_cfg)


def load_model(
    cfg: ModelConfig, role: str, device: torch.device, tokenizer: Tokenizer | None = None, seed: int | None = None
) -> PreTrainedModel:
    """Load (or build) the model described by ``cfg``; a teacher is frozen and in eval mode. LoRA
    adapters are initialised from ``seed`` when given (the same whether or not the weights were
    partitioned as they were read, which draws random numbers of its own)."""
    if cfg.arch is not None:
        if tokenizer is None:
            raise DistillError(f"{role}.arch needs a tokenizer")
        model = build_from_arch(cfg.arch, tokenizer)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=_dtype(cfg.dtype))
        except (OSError, ValueError) as e:
            raise DistillError(f"{role}.path: cannot load a causal LM from {cfg.path}: {e}") from None
    if not any(is_sharded(p) for p in model.parameters()):  # ZeRO-3 placed the partitions already
        model = model.to(device=device, dtype=_dtype(cfg.dtype))
    if role == "teacher":
        model.eval()
        model.requires_grad_(False)
        return model
    if cfg.lora.enabled:
        if seed is not None:
            torch.manual_seed(seed)
        model = apply_lora(model, cfg.lora)
    model.train()
    return model


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Keep only each decoder layer's input for backward and recompute the rest. Non-reentrant:
    no input needs to require grad (LoRA, frozen embeddings). transformers 5.25 renamed the method."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class AdaptersDisabled(torch.nn.Module):
    """A LoRA student's base model as a teacher (``teacher.student_base``): one copy of the weights.

    Every call of the model, of its decoder and of ``generate`` runs with the adapters disabled and
    the model in eval mode (no dropout), then puts both back; the student itself is untouched
    between calls. Its parameters are the student's frozen ones (not a submodule of this module, so
    nothing is registered twice); everything else is the student's (config, LM head, ...)."""

    def __init__(self, student: torch.nn.Module) -> None:
        super().__init__()
        self.__dict__["lora_student"] = student  # the model whose weights this is (not a submodule)

    @contextmanager
    def _base(self) -> Iterator[None]:
        student = self.lora_student
        was_training = student.training
        student.eval()
        try:
            with student.disable_adapter():
                yield
        finally:
            student.train(was_training)

    def forward(self, *args, **kwargs):
        with self._base():
            return self.lora_student(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self._base():
            return self.lora_student.generate(*args, **kwargs)

    def get_decoder(self) -> torch.nn.Module:
        view = self

        class _Decoder(torch.nn.Module):  # the student's decoder, called with the adapters disabled
            def forward(self, *args, **kwargs):
                with view._base():
                    return view.lora_student.get_decoder()(*args, **kwargs)

        return _Decoder()

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        """The student's frozen (base) parameters."""
        return (p for p in self.lora_student.parameters() if not p.requires_grad)

    def train(self, mode: bool = True) -> AdaptersDisabled:
        self.training = mode  # the student's mode is its own; calls run in eval mode anyway
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["lora_student"], name)


@contextmanager
def head_forward(model: PreTrainedModel, forward: Callable[..., Any]) -> Iterator[torch.nn.Module]:
    """Within the block, calling the model's LM head (the module yielded) runs ``forward(head, *args)``
    in place of the head's own forward. It is still a call of the module, so its hooks run: a sharded
    engine (ZeRO-3) gathers the head for this forward and again for its backward, where code reading
    ``head.weight`` outside the module's forward would find an empty partition."""
    head = model.get_output_embeddings()
    if getattr(head, "_distill_head_forward", False):
        raise RuntimeError("head_forward: the LM head is already running another forward (nested use)")
    prior = head.__dict__.get("forward")  # a forward set on the instance (accelerate's hooks): put back after
    head.forward = types.MethodType(forward, head)  # an instance attribute shadows the class's forward
    head._distill_head_forward = True
    try:
        yield head
    finally:
        del head._distill_head_forward
        if prior is None:
            del head.forward
        else:
            head.forward = prior


def fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` in fp32 (inputs, weights, accumulation) whatever the autocast or dtypes."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


def _fp32_linear(head: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return fp32_linear(x, head.weight, head.bias)


@contextmanager
def fp32_logits(model: PreTrainedModel, needed: bool = True) -> Iterator[None]:
    """Within the block ``model(...).logits`` are fp32 (fp32 inputs, weights and accumulation)
    whatever the autocast or weight dtype: rounding logits to bf16 before the softmax skews the
    gradient."""
    if not needed or not isinstance(model.get_output_embeddings(), torch.nn.Linear):
        yield
        return
    with head_forward(model, _fp32_linear):
        yield


def lm_logits(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    bf16: bool = False,
    vocab: int | None = None,
) -> torch.Tensor:
    """Next-token logits ``[B, T-1, V]``: fp32 from an fp32 LM head, also when the body runs in
    bf16 autocast (``bf16``) or holds bf16 weights. With ``vocab`` (the tokenizer's length) the
    padding rows beyond it are dropped, so they take no probability mass in either model."""
    head = model.get_output_embeddings()
    low_precision = bf16 or (head is not None and head.weight.dtype != torch.float32)
    autocast = torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=bf16)
    with autocast, fp32_logits(model, needed=low_precision):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1, :vocab]


# Config attributes that change the logits after the LM head (soft-capping, scaling), and the
# value of each that leaves them unchanged; also looked for in a nested text or decoder config.
LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,  # Gemma 2/3, tanh soft-capping
    "logit_scale": 1.0,  # Cohere
    "logits_scaling": 1.0,  # Granite (divides), HyperCLOVA X (multiplies)
    "lm_head_multiplier": 1.0,  # Falcon-H1
    "output_multiplier": 1.0,
}


def logit_transforms(config) -> list[str]:
    """``name=value`` of every config attribute that transforms the logits after the LM head."""
    found = []
    for sub in (config, getattr(config, "text_config", None), getattr(config, "decoder_config", None)):
        for name, neutral in LOGIT_TRANSFORMS.items():
            value = getattr(sub, name, None) if sub is not None else None
            if value is not None and value != neutral:
                found.append(f"{name}={value}")
    return found


def fused_head_problem(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str | None:
    """Why the fused loss cannot stand in for ``model(...).logits`` (None when it can).

    The fused loss takes the decoder's final hidden state and the LM head's weight and bias, so
    the model's logits must be exactly ``head(decoder(x))``: a plain ``nn.Linear`` head (no LoRA on
    it) and no soft-capping or scaling after it. Refused by the config attributes that do that
    (``LOGIT_TRANSFORMS``: a freshly initialised Gemma 2's logits are too small for its tanh cap of
    30 to show), then checked on a probe batch for anything no attribute announces."""
    transforms = logit_transforms(model.config)
    if transforms:
        return f"its config transforms the logits after the LM head ({', '.join(transforms)})"
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"the LM head is a {type(head).__name__}, not a plain Linear"
    was_training = model.training
    model.eval()  # no dropout in the comparison
    try:
        with torch.no_grad():
            logits = lm_logits(model, input_ids, attention_mask).float()
            hidden = final_hidden(model, input_ids, attention_mask)  # what the fused loss gets
            with lm_head(model) as (weight, bias):
                fused = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    finally:
        model.train(was_training)
    if not torch.allclose(logits, fused, rtol=1e-4, atol=1e-4 * float(fused.abs().max()) + 1e-6):
        return "its logits are not head(decoder(x)) (soft-capping or scaling after the LM head?)"
    return None


def final_hidden(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, bf16: bool = False
) -> torch.Tensor:
    """The decoder's final hidden states at positions ``[:, :-1]`` (those that predict a next
    token), in bf16 autocast with ``bf16``: what the fused loss takes in place of ``lm_logits``."""
    autocast = torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=bf16)
    with autocast:
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return hidden[:, :-1]


@contextmanager
def lm_head(
    model: PreTrainedModel | None, vocab: int | None = None
) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """The LM head's weight and bias (rows beyond ``vocab`` dropped), whole inside the block also
    when the model is sharded; (None, None) without a model. They are not cast: the fused loss
    applies the head at the weight's precision, like ``lm_logits``' fp32 head, and returns the
    weight gradient from its fp32 accumulator without rounding. For reading the head without a
    gradient (a teacher, a probe): a loss that trains the head runs inside ``head_forward``."""
    if model is None:
        yield None, None
        return
    head = model.get_output_embeddings()
    with gathered(head.parameters()):
        yield head.weight[:vocab], None if head.bias is None else head.bias[:vocab]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters a checkpoint must hold (all of a full fine-tune, only the adapters of LoRA),
    copied to the CPU one tensor at a time."""
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            with gathered([p]):
                state[name] = p.detach().to("cpu", copy=True)
    return state


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise DistillError(f"{where}: checkpoint does not match the model (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for n, t in state.items():
            if tuple(t.shape) != tuple(full_shape(params[n])):
                raise DistillError(f"{where}: {n} has shape {tuple(t.shape)} in the checkpoint, "
                                   f"{tuple(full_shape(params[n]))} in the model")
            with gathered([params[n]], modify=True):
                params[n].copy_(t)


@contextmanager
def picklable(*models: torch.nn.Module | None) -> Iterator[None]:
    """Inside, ``models`` pickle for another process: transformers installs its output-capturing
    hooks on a model's first call for hidden states, and they close over a context variable of
    this process; they are taken off here (with the mark that they are on) and put back after, and
    the other process installs its own on first use."""
    taken = []
    for model in models:
        for module in [] if model is None else model.modules():
            hooks = {k: h for k, h in module._forward_hooks.items()
                     if getattr(h, "__name__", "") == "output_capturing_hook"}
            marked = vars(module).pop("_output_capturing_hooks_installed", None)
            for k in hooks:
                del module._forward_hooks[k]
            if hooks or marked is not None:
                taken.append((module, hooks, marked))
    try:
        yield
    finally:
        for module, hooks, marked in taken:
            module._forward_hooks.update(hooks)
            if marked is not None:
                module._output_capturing_hooks_installed = marked


def unpickled(*models: torch.nn.Module | None) -> None:
    """What a model's ``__init__`` registers and unpickling skips: transformers records each model
    class's capturable outputs (hidden states) in a registry of the process when one is built;
    without it a model unpickled here returns no hidden states."""
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

    for model in models:
        for module in [] if model is None else model.modules():
            if isinstance(module, PreTrainedModel):
                _CAN_RECORD_REGISTRY[module] = module._can_record_outputs


def plain_model(model: PreTrainedModel) -> PreTrainedModel:
    """The transformers model under a PEFT wrapper (its LoRA layers still inside), or the model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def export_state_dict(model: PreTrainedModel, keep: bool = True) -> dict[str, torch.Tensor]:
    """The state dict of the plain transformers model on the CPU, LoRA adapters merged into their
    base weights, gathered and copied one module at a time: the model itself is neither copied nor
    changed on its device. Tied parameters stay one tensor, so ``save_pretrained`` ties them.
    Every rank of a sharded model takes part in the gathering; ranks with ``keep=False`` copy
    nothing and get an empty dict."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, torch.Tensor] = {}
    copies: dict[int, torch.Tensor] = {}  # id(parameter) -> its CPU copy

    def cpu(p: torch.Tensor) -> torch.Tensor:
        if id(p) not in copies:
            with gathered([p]):
                copies[id(p)] = p.detach().to("cpu", copy=True) if keep else None
        return copies[id(p)]

    merged_prefixes: list[str] = []
    for name, module in plain_model(model).named_modules():
        if any(name.startswith(prefix) for prefix in merged_prefixes):
            continue  # inside a LoRA layer: its base layer and adapters were merged into one weight
        key = f"{name}." if name else ""
        if isinstance(module, LoraLayer):
            merged_prefixes.append(key)
            base = module.get_base_layer()
            with torch.no_grad(), gathered(module.parameters()):
                weight = base.weight.detach()
                if keep and not module.merged:
                    for adapter in module.active_adapters:
                        if adapter in module.lora_A or adapter in getattr(module, "lora_embedding_A", {}):
                            weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
                if keep:
                    out[key + "weight"] = weight.to("cpu", copy=True)
                    if getattr(base, "bias", None) is not None:
                        out[key + "bias"] = base.bias.detach().to("cpu", copy=True)
            continue
        for pname, p in module.named_parameters(recurse=False):
            copy = cpu(p)
            if keep:
                out[key + pname] = copy
        for bname, b in module.named_buffers(recurse=False) if keep else ():
            if bname not in module._non_persistent_buffers_set:
                out[key + bname] = b.detach().to("cpu", copy=True)
    return out


def save_model(model: PreTrainedModel, out_dir: str | Path, eos_token_ids: list[int] | None = None,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``save_pretrained`` of the plain transformers model (LoRA merged) from ``export_state_dict``
    (or ``state_dict``, its result taken already: on several ranks all of them gather it).
    ``eos_token_ids`` go into its generation config (where a chat template ends turns with a token
    other than EOS, so that a plain ``generate()`` stops where the model learnt to)."""
    plain = plain_model(model)
    if eos_token_ids:
        plain.generation_config.eos_token_id = eos_token_ids[0] if len(eos_token_ids) == 1 else list(eos_token_ids)
    plain.save_pretrained(out_dir, state_dict=export_state_dict(model) if state_dict is None else state_dict)


def count_parameters(params: Iterable[torch.nn.Parameter]) -> int:
    return sum(full_numel(p) for p in params)
