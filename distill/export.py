"""Export a distilled student as a draft model that serving stacks take as it is.

What vLLM and transformers' assisted generation require (``docs/algorithms.md``, "Draft export"):
the target's tokenizer files; ``config.vocab_size`` equal to the target's (embedding and LM-head
rows padded when the student's is smaller); the target's eos/bos/pad ids and chat template; a
plain architecture (no remote code), LoRA merged, safetensors; a ``generation_config.json`` with
the target's eos ids and ``num_assistant_tokens``; ``max_position_embeddings`` at least the
target's. Written atomically; checked after writing by loading it back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from distill.checkpoint import export_model
from distill.config import gguf_directory_problem
from distill.errors import DistillError
from distill.models import check_same_tokenizer, load_tokenizer

SPECIAL_IDS = ("eos_token_id", "bos_token_id", "pad_token_id")


@dataclass
class DraftExport:
    out_dir: Path
    vocab_size: int
    padded_rows: int  # rows added to reach the target's vocab_size
    num_assistant_tokens: int

    def usage(self) -> str:
        """How to serve it: vLLM's speculative_config and transformers' assistant_model."""
        k = self.num_assistant_tokens
        return (
            "vLLM:\n"
            f'  LLM(model=TARGET, speculative_config={{"method": "draft_model", "model": "{self.out_dir}", '
            f'"num_speculative_tokens": {k}}})\n'
            "transformers:\n"
            f'  draft = AutoModelForCausalLM.from_pretrained("{self.out_dir}")\n'
            "  target.generate(**inputs, assistant_model=draft)"
            f"  # num_assistant_tokens={k} from the draft's generation_config"
        )


def _adapter_base(student_dir: Path) -> Path | None:
    """The base model directory of a PEFT adapter directory, None for a full model directory."""
    adapter = student_dir / "adapter_config.json"
    if not adapter.exists():
        return None
    base = json.loads(adapter.read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise DistillError(f"{adapter}: base_model_name_or_path {base!r} is not a local directory")
    return Path(base)


def _load_student(student_dir: Path, base: Path | None) -> PreTrainedModel:
    """A merged plain model: a full model directory, or a PEFT adapter directory (merged here)."""
    if base is not None:
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(student_dir).merge_and_unload()
    return AutoModelForCausalLM.from_pretrained(student_dir)


def _student_tokenizer(student_dir: Path, base: Path | None):
    """The student's tokenizer; an adapter directory without tokenizer files uses its base model's."""
    has_own = any((student_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    return load_tokenizer(base if base is not None and not has_own else student_dir, "student", set_pad=False)


def export_draft(
    student_dir: str | Path,
    target_dir: str | Path,
    out_dir: str | Path,
    *,
    num_assistant_tokens: int = 5,
) -> DraftExport:
    """Write ``student_dir`` as a serving-ready draft model for ``target_dir`` into ``out_dir``.

    Refuses (DistillError) a student whose tokenizer differs from the target's, one with more
    vocabulary rows than the target, and one with fewer positions than the target serves.
    """
    student_dir, target_dir, out_dir = Path(student_dir), Path(target_dir), Path(out_dir)
    for role, path in (("student", student_dir), ("target", target_dir)):
        if not path.is_dir():
            raise DistillError(f"{role} directory not found: {path}")
        if problem := gguf_directory_problem(path):
            raise DistillError(f"{role}: {problem}")
    if num_assistant_tokens < 1:
        raise DistillError(f"num_assistant_tokens must be >= 1; got {num_assistant_tokens}")
    # As it is (no pad token added): its files are the draft's.
    target_tok = load_tokenizer(target_dir, "target", set_pad=False)
    base = _adapter_base(student_dir)
    check_same_tokenizer(_student_tokenizer(student_dir, base), target_tok, str(student_dir), str(target_dir))
    target_cfg = AutoConfig.from_pretrained(target_dir)
    model = _load_student(student_dir, base)
    cfg = model.config
    if getattr(cfg, "auto_map", None):
        raise DistillError(
            f"{student_dir} uses remote code (auto_map in its config.json); serving stacks load "
            "drafts as plain transformers architectures"
        )

    rows = model.get_input_embeddings().weight.shape[0]
    if rows > target_cfg.vocab_size:
        raise DistillError(
            f"the student has {rows} vocabulary rows, more than the target's {target_cfg.vocab_size}; "
            "serving stacks need equal sizes"
        )
    target_pos = getattr(target_cfg, "max_position_embeddings", None)
    student_pos = getattr(cfg, "max_position_embeddings", None)
    if target_pos is not None and student_pos is not None and student_pos < target_pos:
        raise DistillError(
            f"the student serves {student_pos} positions, fewer than the target's {target_pos}"
        )
    padded = target_cfg.vocab_size - rows
    if padded:
        # New rows: mean of the existing ones (transformers' mean_resizing), so the draft gives
        # padding tokens about an average logit; both embedding and LM head (tied or not).
        model.resize_token_embeddings(target_cfg.vocab_size, mean_resizing=True)
    for name in SPECIAL_IDS:
        setattr(cfg, name, getattr(target_cfg, name, None))
    gen = GenerationConfig.from_pretrained(target_dir) if (target_dir / "generation_config.json").exists() \
        else GenerationConfig.from_model_config(target_cfg)
    gen.num_assistant_tokens = num_assistant_tokens
    # The count above, every round: no schedule, and no early stop on the draft's confidence
    # (transformers otherwise stops drafting below a default threshold of 0.4).
    gen.num_assistant_tokens_schedule = "constant"
    gen.assistant_confidence_threshold = 0.0
    model.generation_config = gen

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        target_tok.save_pretrained(tmp)  # the target's tokenizer files and chat template
        _verify(tmp, target_cfg)  # before the rename: a rejected draft never replaces a good one

    export_model(out_dir, save)
    return DraftExport(out_dir.resolve(), target_cfg.vocab_size, padded, num_assistant_tokens)


def _verify(out_dir: Path, target_cfg) -> None:
    """Load the written draft back as a plain transformers model and check what serving needs."""
    config = json.loads((out_dir / "config.json").read_text())
    if "auto_map" in config:
        raise DistillError("the draft would need trust_remote_code (auto_map in config.json)")
    if not list(out_dir.glob("*.safetensors")):
        raise DistillError("save_pretrained wrote no safetensors weights")
    draft = AutoModelForCausalLM.from_pretrained(out_dir)
    with torch.no_grad():
        logits = draft(torch.zeros(1, 1, dtype=torch.long)).logits
    if draft.config.vocab_size != target_cfg.vocab_size or logits.shape[-1] != target_cfg.vocab_size:
        raise DistillError(f"the draft has vocab {logits.shape[-1]}, the target {target_cfg.vocab_size}")
