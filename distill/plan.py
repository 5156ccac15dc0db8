"""The plan of a run, from its config and the models' ``config.json`` alone: what each step draws
from, what it minimises and by which kernel path, how the models are placed on the ranks, and the
memory each rank will need at its peak, for every ZeRO stage.

Model sizes are exact: each model is built on PyTorch's meta device (no memory, no weights), so
its parameters, LoRA adapters and tied weights are counted as loaded. The activations a training
forward saves for backward are measured on the meta device too (a forward of the student's decoder
over one micro-batch of ``data.max_length`` tokens, with autograd's saved-tensor hooks), so they
follow the architecture and its attention path. The rest is arithmetic, per rank:

- weights: parameters x bytes, divided by the ranks where ZeRO-3 shards them;
- gradients and optimizer state as DeepSpeed accounts for them (its estimate_zero*_mem_needs):
  from stage 1 an fp32 gradient partition and an fp32 master copy beside AdamW's two fp32
  moments, whatever the weights' dtype, divided by the ranks (the optimizer's share on the CPU
  with offload); the model's own gradients are divided from stage 2; without ZeRO, torch's AdamW
  keeps its moments in the weights' dtype;
- ZeRO buffers: the reduce (and, stages 1-2, all-gather) buckets; ZeRO-3's parameters gathered
  into full-size buffers (up to its live-parameter bound) and the copies its gradient
  reduce-scatter makes of the bucket;
- backward: one layer's share of the saved activations (the gradients of the layer it is in);
- the loss: the fused loss's chunk of ``[rows x vocab]`` buffers and its fp32 head-gradient
  accumulator, or the full logits without it;
- generation: the models of a round gathered whole (ZeRO-3) and their KV caches for the prompts
  and the new tokens, the student's for evaluation's greedy decoding too.

The peak is the resident state plus the larger of a training micro-batch and a generation round.
On the CPU, where glibc keeps freed pages, a source's round between steps (on-policy, SKD) is
planned beside the training step, and the runtime is the process's memory at planning time plus
what a run adds to it (``RUNTIME_CPU_RUN``). On a GPU the runtime is an allowance for the CUDA
context (``RUNTIME_CUDA``); allocator fragmentation is not counted there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AttentionInterface

from distill.config import DistillConfig, ModelConfig, member_configs, weights_at
from distill.draft_eval import DraftEvalConfig
from distill.errors import DistillError
from distill.fused_loss import CHUNK_BUDGET_BYTES, auto_chunk_size, chunk_entry_bytes
from distill.memory import GIB, fmt, rss_bytes
from distill.objective import objective_name
from distill.placement import DTYPES, Placement, device_type, head_only, launch_env, local_world_size
from distill.sources import check as check_sources

# A serve-teacher worker's runtime beyond a process like the one planning it: Ray's core worker
# (measured here: 75 MiB more resident memory than the CLI's process, with the same libraries).
RAY_WORKER_RUNTIME = 96 * 2**20
RUNTIME_CUDA = 1 * GIB  # CUDA context, cuBLAS workspaces: outside torch's allocator statistics
# What a CPU run's process adds after planning besides the planned parts: the tokenizer's thread
# pool and arenas, the encoded data, logging (measured here: about 60 MiB beyond the planned parts).
RUNTIME_CPU_RUN = 64 * 2**20
# DeepSpeed's defaults that bound its buffers (elements).
ZERO3_MAX_LIVE = 1_000_000_000
ZERO12_BUCKET = 500_000_000


@dataclass
class ModelShape:
    """What the plan needs of a model, read from its config."""

    name: str
    parameters: int
    trainable: int
    bytes_per_weight: int
    largest_block: int  # parameters of its largest repeated block (a decoder layer)
    hidden: int
    rows: int  # LM head rows (the vocabulary, padded)
    kv_bytes_per_token: int  # K and V of every layer for one token
    trainable_head: bool
    activations: int = 0  # bytes saved for backward by one training micro-batch (student only)
    layer_activations: int = 0  # one decoder layer's share of them


def _meta_model(m: ModelConfig, role: str, vocab: int | None):
    """The model of ``m`` on the meta device (LoRA applied to a student), and its HF config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill.models import apply_lora, build_config

    if m.arch is not None:
        config = build_config(m.arch, vocab or m.arch.tokenizer_vocab_size)
    else:
        try:
            config = AutoConfig.from_pretrained(m.path)
        except (OSError, ValueError) as e:
            raise DistillError(f"{role}.path: cannot read a model config from {m.path}: {e}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[m.dtype], attn_implementation=META_ATTENTION)
        if role == "teacher":
            model.requires_grad_(False)
        elif m.lora.enabled:
            model = apply_lora(model, m.lora)
    return model, config


def _largest_block(model: torch.nn.Module) -> int:
    blocks = [sum(p.numel() for p in child.parameters())
              for module in model.modules() if isinstance(module, torch.nn.ModuleList) for child in module]
    return max(blocks, default=max(p.numel() for p in model.parameters()))


def _kv_bytes_per_token(config, bytes_per: int) -> int:
    text = getattr(config, "text_config", None) or config
    layers = text.num_hidden_layers
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * layers * heads * head_dim * bytes_per


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (flash, memory-efficient, PyTorch's CPU flash) keeps for
    backward: q, k, v, the output and the row log-sum-exp; never the [length x length] scores,
    which the meta device's own attention (the unfused math) would count. Only measured: its
    backward is never taken."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        return None, None, None


# The meta models' attention, registered with transformers' public attention interface. It has no
# mask function: mask creation then returns None without reading values (which meta tensors lack).
META_ATTENTION = "distill_meta_fused"


def _meta_attention(module, query, key, value, attention_mask, **kwargs):
    # Laid out as transformers' sdpa path returns it: [batch, length, heads, head_dim].
    return _FusedAttention.apply(query, key, value).transpose(1, 2).contiguous(), None


AttentionInterface.register(META_ATTENTION, _meta_attention)


def _saved_activations(model: torch.nn.Module, rows: int, length: int) -> int:
    """Bytes autograd saves in a forward of the decoder over ``[rows, length]`` tokens: on the meta
    device with fused attention as on a GPU and in PyTorch's CPU kernels (``META_ATTENTION``), or
    a real model's own forward (tests)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s._cdata] = max(storages.get(s._cdata, 0), s.nbytes())
        return t

    device = next(model.parameters()).device
    ids = torch.zeros(rows, length, dtype=torch.long, device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
        model.get_decoder()(input_ids=ids)
    return sum(storages.values())


def model_shape(m: ModelConfig, role: str, *, vocab: int | None = None, rows: int = 0, length: int = 0,
                bf16: bool = False, checkpointing: bool = False) -> ModelShape:
    model, config = _meta_model(m, role, vocab)
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    head = model.get_output_embeddings()
    bytes_per = DTYPES[m.dtype].itemsize
    shape = ModelShape(
        name=m.path or "arch", parameters=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad), bytes_per_weight=bytes_per,
        largest_block=_largest_block(model), hidden=head.weight.shape[1], rows=head.weight.shape[0],
        kv_bytes_per_token=_kv_bytes_per_token(config, bytes_per),
        trainable_head=head.weight.requires_grad,
    )
    if role == "student" and rows:
        # bf16 autocast saves most activations in bf16: measured with bf16 weights as a stand-in.
        if bf16 and m.dtype == "float32":
            model = model.to(torch.bfloat16)
        full = _saved_activations(model, rows, length)
        shape.activations = full
        layers = getattr(config.get_text_config(), "num_hidden_layers", 1)
        shape.layer_activations = full // max(layers, 1)
        if checkpointing:
            # What stays outside the checkpointed layers, each layer's input (kept for its
            # recomputation), and one layer's activations while it is recomputed.
            from distill.models import enable_activation_checkpointing

            enable_activation_checkpointing(model)
            model.train()
            inputs = layers * rows * length * shape.hidden * next(model.parameters()).element_size()
            shape.activations = _saved_activations(model, rows, length) + inputs + full // layers
    return shape


def _teachers_shape(cfg: DistillConfig) -> ModelShape:
    """Several teachers (``teachers``) planned as one: the weights of those loaded here plus the LM
    heads of those cached or served, in the widest dtype; their hidden states side by side (a
    batch holds every member's at once); the largest vocabulary, block and KV cache."""
    members = {name: (view.teacher, model_shape(view.teacher, "teacher")) for name, view in member_configs(cfg).items()}
    b = max(m.bytes_per_weight for _, m in members.values())
    held = sum((m.parameters if head_only(t) is False else m.rows * m.hidden) * m.bytes_per_weight
               for t, m in members.values())
    return ModelShape(name=" + ".join(f"{n}: {m.name}" for n, (_, m) in members.items()), parameters=-(-held // b),
                      trainable=0, bytes_per_weight=b, largest_block=max(m.largest_block for _, m in members.values()),
                      hidden=sum(m.hidden for _, m in members.values()), rows=max(m.rows for _, m in members.values()),
                      kv_bytes_per_token=max(m.kv_bytes_per_token for _, m in members.values()), trainable_head=False)


@dataclass
class Plan:
    """Per-rank memory of one placement (ZeRO stage, offload), in bytes, by part and phase."""

    placement: Placement
    resident: dict[str, int] = field(default_factory=dict)
    training: dict[str, int] = field(default_factory=dict)  # on top of resident, one micro-batch
    generation: dict[str, int] = field(default_factory=dict)  # on top of resident, the largest round
    generation_what: str = ""
    # On the CPU, the largest round of a source that generates between steps: glibc keeps what the
    # round freed, and the training step after it cannot reuse all of it, so it is planned beside.
    kept: int = 0
    kept_what: str = ""
    runtime: int = 0
    cpu: int = 0  # offloaded per rank (host memory)
    # Per sharded model (student, teacher): gathered whole for a generation round, or else synced
    # generation with its layers gathered in turn.
    gathers: dict[str, bool] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # what makes the placement impossible
    available: int | None = None  # device memory per rank

    @property
    def fits(self) -> bool:
        return not self.problems and (self.available is None or self.peak <= self.available)

    @property
    def peak(self) -> int:
        return (sum(self.resident.values()) + self.runtime
                + max(sum(self.training.values()) + self.kept, sum(self.generation.values())))

    @property
    def name(self) -> str:
        return self.placement.name

    @property
    def world(self) -> int:
        return self.placement.world


@dataclass
class RunPlan:
    """The whole plan of a recipe: what it draws and minimises, and memory per placement."""

    sources: list[str]
    loss: str
    kernel: str
    placement: str
    rows_per_rank: int
    length: int
    student: ModelShape
    teacher: ModelShape | None
    chosen: Plan
    stages: list[Plan]
    available: int | None  # device memory per rank
    device: str
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.chosen.fits


def _available(cfg: DistillConfig, device: str, world: int) -> int | None:
    if cfg.plan.device_memory_gb is not None:
        return int(cfg.plan.device_memory_gb * GIB)
    if device == "cuda":
        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_properties(launch_env()[2]).total_memory
    try:
        total = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        return None
    # CPU ranks share the machine's memory: as many as the launcher put here, or, planned from an
    # unlaunched process (distill plan plan.world_size=N), all of them.
    here = min(world, local_world_size()) if "WORLD_SIZE" in os.environ else world
    return total // here


def _sources(cfg: DistillConfig) -> list[str]:
    """Each source in use with its schedule and its expected share of the run's steps."""
    steps, weights = cfg.trainer.steps, cfg.sources.weights
    shares = dict.fromkeys(weights, 0.0)
    for s in range(steps):
        w = weights_at(weights, s, steps)
        total = sum(w.values())
        for n in weights:
            shares[n] += w[n] / total / steps if total else 0.0
    out = []
    for source in check_sources(cfg):
        n, sched = source.name, weights[source.name]
        if not shares[n]:
            continue
        moves = sched.end is not None and sched.kind != "constant" and sched.end != sched.start
        weight = f"{sched.start:g} -> {sched.end:g} ({sched.kind}" + (f" by step {sched.steps})" if sched.steps
                                                                      else ")") if moves else f"{sched.start:g}"
        out.append(f"{n}: {source.what}; weight {weight}; about {shares[n]:.0%} of steps")
    return out


def _memory(cfg: DistillConfig, pl: Placement, s: ModelShape, t: ModelShape | None) -> Plan:
    """Per-rank memory of the run placed as ``pl`` (see the module docstring)."""
    p = Plan(pl)
    _resident(p, cfg, s, t)
    _training(p, cfg, s, t)
    p.runtime = RUNTIME_CUDA if pl.device == "cuda" else rss_bytes() + RUNTIME_CPU_RUN
    p.available = _available(cfg, pl.device, pl.world)
    _generation(p, cfg, s, t)
    return p


def _resident(p: Plan, cfg: DistillConfig, s: ModelShape, t: ModelShape | None) -> None:
    """What every rank holds throughout: weights, gradients, optimizer state, ZeRO buckets."""
    pl = p.placement
    world, stage = pl.world, pl.stage
    w = 1 if stage < 3 else world
    b, n = s.bytes_per_weight, s.trainable
    on_device = 0 if pl.offload_params else 1
    p.resident["student weights"] = s.parameters * b // w * on_device
    if stage >= 1:
        # DeepSpeed's own accounting (estimate_zero{2,3}_model_states_mem_needs): the model's
        # gradients (partitioned from stage 2), an fp32 gradient partition, and the optimizer's
        # fp32 master copy with AdamW's two moments, partitioned, whatever the weights' dtype.
        p.resident["gradients"] = n * b // (world if stage >= 2 else 1) + 4 * n // world
        opt = 12 * n // world
    elif pl.uses_deepspeed:  # plain data parallelism on DeepSpeed: an fp32 master copy only for half weights
        p.resident["gradients"] = n * b + (4 * n if b < 4 else 0)
        opt = (8 + (4 if b < 4 else 0)) * n
    else:  # torch's AdamW: its moments in the weights' dtype
        p.resident["gradients"] = n * b
        opt = 2 * b * n
    if pl.offload_optimizer:
        p.cpu += opt
    else:
        p.resident["optimizer state"] = opt
    if pl.offload_params:
        p.cpu += s.parameters * b // w
    if t is not None and pl.teacher_head_only:  # an offline cache: the teacher's LM head alone
        p.resident["teacher LM head"] = t.rows * t.hidden * t.bytes_per_weight
    elif t is not None and pl.own_teacher:  # a teacher of its own: a second set of weights
        tw = t.parameters * t.bytes_per_weight // (world if pl.shard_teacher else 1)
        if pl.offload_params and pl.shard_teacher:
            p.cpu += tw
        else:
            p.resident["teacher weights"] = tw
    if stage in (1, 2):  # DeepSpeed's reduce and all-gather buckets (filled up to the model's size)
        p.resident["ZeRO buckets"] = 2 * min(ZERO12_BUCKET, n) * b
    elif stage == 3:  # its gradient reduce bucket
        p.resident["ZeRO buckets"] = min(ZERO12_BUCKET, n) * b


def _training(p: Plan, cfg: DistillConfig, s: ModelShape, t: ModelShape | None) -> None:
    """One training micro-batch on top (the length groups of a micro-batch are smaller still)."""
    pl = p.placement
    world, b = pl.world, s.bytes_per_weight
    tokens = cfg.trainer.batch_size // world * cfg.data.max_length
    p.training["activations"] = s.activations
    # Backward holds the gradients of the layer it is in beside what is still saved: measured on
    # the CPU as about one layer's saved activations.
    p.training["backward of one layer"] = s.layer_activations
    # ZeRO-3 keeps up to stage3_max_live_parameters gathered, and does not release parameters it
    # will use again soon: up to that bound (or the whole model), each gathered into a full-size
    # buffer beside the rank's own partition.
    gathered = 0
    if pl.stage == 3:
        gathered += min(ZERO3_MAX_LIVE, s.parameters) * b
        # The gradient reduce-scatter flattens the bucket into one more buffer
        # (reduce_scatter_coalesced); gloo's reduce-scatter on the CPU makes a second copy.
        copies = 2 if pl.device == "cpu" else 1
        p.training["ZeRO-3 gradient reduce-scatter"] = copies * min(ZERO12_BUCKET, s.trainable) * b
    if pl.shard_teacher:
        gathered += min(ZERO3_MAX_LIVE, t.parameters) * t.bytes_per_weight
    if gathered:
        p.training["ZeRO-3 gathered parameters"] = gathered
    kd = cfg.loss.kind != "ce" and t is not None
    if kd:
        p.training["teacher hidden states"] = tokens * t.hidden * 4
    if cfg.loss.fused:
        triton = pl.device == "cuda" and cfg.loss.backend != "torch"
        per_entry = chunk_entry_bytes(triton, DTYPES[cfg.student.dtype], kd, cfg.loss.ce_weight not in (0.0, 1.0))
        vocab = min(s.rows, t.rows) if kd else s.rows
        chunk = cfg.loss.chunk_size or auto_chunk_size(tokens, vocab, per_entry, CHUNK_BUDGET_BYTES[pl.device])
        p.training["loss chunk buffers"] = min(chunk, tokens) * vocab * per_entry
        if s.trainable_head:
            p.training["loss head-gradient accumulator"] = s.rows * s.hidden * 4
    else:
        p.training["full logits"] = tokens * s.rows * 4 * (4 if kd else 2)  # both models, softmax, gradient


def _rounds(cfg: DistillConfig, rows: int, has_teacher: bool) -> list[tuple[str, list[str], int, int, str]]:
    """The generation rounds of the run: (what, roles, sequences, positions, source or "") for
    each source in use that generates, and evaluation's greedy decoding where a split is scored
    from generations: the student on the validation and test splits, the teacher on the test split
    only (validation: its losses). Prompts are at most data.max_length (cut before generation)."""
    prompt, tc, d = cfg.data.max_length, cfg.trainer, cfg.data
    rounds = []
    for source in check_sources(cfg):
        r = source.generation_round(cfg.sources)
        if r is not None and (has_teacher or "teacher" not in r.roles):
            rounds.append((r.what, list(r.roles), rows, prompt + r.new_tokens, source.name))
    scored = d.train is None or d.metric != "none"  # the built-in tasks always are
    has_test = cfg.final_eval and (d.train is None or d.test is not None)
    if scored and (has_test or d.train is None or d.validation is not None):
        rounds.append(("evaluation (student)", ["student"], tc.eval_batch_size, prompt + tc.max_new_tokens, ""))
    if scored and has_test and has_teacher:
        rounds.append(("evaluation (teacher)", ["teacher"], tc.eval_batch_size, prompt + tc.max_new_tokens, ""))
    return rounds


def _generation(p: Plan, cfg: DistillConfig, s: ModelShape, t: ModelShape | None) -> None:
    """The largest generation round on top of what is resident. A sharded model is gathered whole
    for a round when that fits; otherwise it generates with its layers gathered one at a time
    (every rank in step: synced). A round of both models (SKD) needs both whole."""
    pl = p.placement
    world = pl.world
    rounds = _rounds(cfg, cfg.trainer.batch_size // world, t is not None and not pl.teacher_head_only)
    models = {"student": s, "teacher": t}
    sharded = {"student": pl.shard_student, "teacher": pl.shard_teacher}
    # Whose weights are gathered: a teacher that is the student's base is the student's.
    owner = {"student": "student", "teacher": "student" if cfg.teacher.student_base else "teacher"}
    resident = sum(p.resident.values()) + p.runtime

    def whole(role: str) -> int:  # a full-size buffer beside the rank's own partition
        m = models[role]
        return m.parameters * m.bytes_per_weight

    def round_parts(roles: list[str], n: int, positions: int) -> dict[str, int]:
        parts = {}
        for role in roles:
            m, o = models[role], owner[role]
            if sharded[o] and p.gathers.get(o, True):
                parts[f"{o} gathered"] = whole(o)
            elif sharded[o]:
                parts[f"{o} layers gathered in turn"] = min(ZERO3_MAX_LIVE, 2 * m.largest_block) * m.bytes_per_weight
            parts[f"{role} KV cache"] = n * positions * m.kv_bytes_per_token
        parts["sampling logits"] = n * max(models[r].rows for r in roles) * 4 * 2
        return parts

    for role in ("student", "teacher"):
        if models[role] is not None and sharded[role]:
            p.gathers[role] = True
            mine = [r for r in rounds if role in (owner[x] for x in r[1])]
            need = max((sum(round_parts(r[1], r[2], r[3]).values()) for r in mine), default=0)
            p.gathers[role] = p.available is None or resident + need <= p.available
    for what, roles, n, positions, source in rounds:
        parts = round_parts(roles, n, positions)
        if sum(parts.values()) > sum(p.generation.values()):
            p.generation, p.generation_what = parts, what
        if source and pl.device == "cpu" and sum(parts.values()) > p.kept:
            p.kept, p.kept_what = sum(parts.values()), what
        if len(roles) > 1 and not all(p.gathers.get(owner[r], True) for r in roles):
            p.problems.append(f"{what} generates with both models gathered whole on every rank, which does not fit "
                              f"here; lower sources.weights.{source} to 0 or use more ranks")
    if cfg.draft.enabled and t is not None:
        _draft_round(p, cfg, s, t)


def _draft_round(p: Plan, cfg: DistillConfig, s: ModelShape, t: ModelShape) -> None:
    """After training rank 0 loads the teacher and the exported student again, whole, beside all
    it holds, and measures the draft on batches of prompts (distill.draft_eval)."""
    n, dr = DraftEvalConfig.batch_size, cfg.draft
    positions = cfg.data.max_length + dr.max_new_tokens + max(dr.gammas) + 1
    parts = {"teacher, loaded again": t.parameters * t.bytes_per_weight,
             "draft (the exported student)": s.parameters * s.bytes_per_weight,
             "KV caches": n * positions * (t.kv_bytes_per_token + s.kv_bytes_per_token),
             "logits for alpha": n * positions * max(t.rows, s.rows) * 4 * 4}  # both models', fp32, softmax
    if sum(parts.values()) > sum(p.generation.values()):
        p.generation, p.generation_what = parts, "draft report"


def make_plan(cfg: DistillConfig, world: int | None = None) -> RunPlan:
    """The plan of ``cfg`` on ``world`` ranks (default: plan.world_size, else the launch's)."""
    from distill.losses import use_triton

    if world is None:
        world = cfg.plan.world_size or launch_env()[1]
    device = device_type(cfg.trainer.device)
    tc = cfg.trainer
    if tc.batch_size % world:
        raise DistillError(f"trainer.batch_size={tc.batch_size} must be a multiple of the {world} ranks")
    rows, length = tc.batch_size // world, cfg.data.max_length
    vocab = None  # a student from scratch: its tokenizer's, or the one the run trains
    if cfg.student.arch is not None and cfg.student.tokenizer:
        from distill.models import load_tokenizer

        vocab = len(load_tokenizer(cfg.student.tokenizer, "student"))
    s = model_shape(cfg.student, "student", vocab=vocab, rows=rows, length=length,
                    bf16=tc.precision == "bf16", checkpointing=tc.activation_checkpointing)
    t = _teachers_shape(cfg) if cfg.teachers else model_shape(cfg.teacher, "teacher") if cfg.teacher.path else None
    if cfg.loss.fused:
        if device == "cuda" and torch.cuda.is_available():
            triton = use_triton(cfg.loss.backend, torch.device(device), DTYPES[cfg.student.dtype])
        else:  # planned for a GPU from elsewhere: what auto would take there
            triton = device == "cuda" and cfg.loss.backend != "torch"
        chunks = f"chunks of {cfg.loss.chunk_size} tokens" if cfg.loss.chunk_size else "chunks by memory budget"
        kernel = f"fused LM head + loss, {'Triton kernels' if triton else 'chunked PyTorch'}, {chunks}"
    else:
        kernel = "full logits, then the loss"
    ds = cfg.deepspeed
    placement = Placement.of(cfg, world, device)
    stages = [_memory(cfg, placement.with_stage(st), s, t) for st in (0, 1, 2, 3)]
    stages.append(_memory(cfg, placement.with_stage(3, offload=True), s, t))
    chosen = _memory(cfg, placement, s, t)
    where = (f"{world} rank{'s' if world > 1 else ''} on {device}; ZeRO stage {ds.stage}"
                 + (", activation checkpointing" if tc.activation_checkpointing else "")
                 + (", optimizer state on the CPU" if ds.offload_optimizer else "")
                 + (", weights on the CPU" if ds.offload_params else "")
                 + ("" if t is None or world == 1 or placement.teacher_head_only else "; teacher " + (
                     "sharded with ZeRO-3 (inference only)" if placement.shard_teacher
                     else "replicated on every rank"))
                 + (f"; teacher read from the cache {cfg.teacher.cache} (its LM head in memory)"
                    if placement.teacher_head_only else ""))
    plan = RunPlan(sources=_sources(cfg), loss=objective_name(cfg.loss), kernel=kernel, placement=where,
                   rows_per_rank=rows, length=length, student=s, teacher=t, chosen=chosen, stages=stages,
                   available=_available(cfg, device, world), device=device)
    if cfg.deepspeed.stage == 0 and world == 1 and not plan.fits:
        plan.notes.append("one process holds everything: launch on several ranks with a ZeRO stage")
    return plan


def render(plan: RunPlan) -> str:
    """The plan as text: sources, loss, placement, the memory table of every stage, the verdict."""
    s, t = plan.student, plan.teacher
    lines = ["sources:"] + [f"  {x}" for x in plan.sources]
    lines += [f"loss: {plan.loss}; {plan.kernel}", f"placement: {plan.placement}",
              f"micro-batch per rank: {plan.rows_per_rank} sequences x up to {plan.length} tokens",
              f"student: {s.name}: {s.parameters:,} parameters ({s.trainable:,} trained), "
              f"{s.bytes_per_weight} bytes each"]
    if t is not None:
        lines.append(f"teacher: {t.name}: {t.parameters:,} parameters, {t.bytes_per_weight} bytes each")
    c = plan.chosen
    lines.append(f"\nper-rank memory of this run ({c.name}):")
    for part, n in c.resident.items():
        lines.append(f"  {part:<34} {fmt(n):>12}")
    lines.append(f"  training micro-batch (peak of step): {fmt(sum(c.training.values()) + c.kept)}")
    for part, n in c.training.items():
        lines.append(f"    {part:<32} {fmt(n):>12}")
    if c.kept:
        lines.append(f"    {'kept from ' + c.kept_what:<32} {fmt(c.kept):>12}")
    lines.append(f"  generation round ({c.generation_what}): {fmt(sum(c.generation.values()))}")
    for part, n in c.generation.items():
        lines.append(f"    {part:<32} {fmt(n):>12}")
    for role, whole in c.gathers.items():
        lines.append(f"    {role}: " + ("gathered whole once per round" if whole else
                                         "too large to gather: generates with its layers gathered in turn, "
                                         "every rank in step"))
    lines.append(f"  {'runtime' + (' (CUDA context)' if plan.device == 'cuda' else ' (this process, and data)'):<34} "
                 f"{fmt(c.runtime):>12}")
    if c.cpu:
        lines.append(f"  offloaded to the CPU: {fmt(c.cpu)} per rank")
    avail = f" of {fmt(plan.available)}" if plan.available else ""
    lines.append(f"  estimated peak: {fmt(c.peak)}{avail} -> " + ("fits" if plan.fits else "DOES NOT FIT"))
    lines += [f"  {problem}" for problem in c.problems]
    lines.append("\nestimated peak per rank by placement:")
    for p in plan.stages:
        lines.append(f"  {p.name:<15} {fmt(p.peak):>12}  ({'fits' if p.fits else 'does not fit'}"
                     + (f"; {fmt(p.cpu)} on the CPU" if p.cpu else "") + ")")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def advice(cfg: DistillConfig, plan: RunPlan) -> str:
    """What to change so that the run fits, tried on the plan: stage, offload, batch, LoRA, chunks."""
    import dataclasses

    options = list(plan.chosen.problems)
    for p in plan.stages:
        if p.fits and p.name != plan.chosen.name:
            options.append(f"deepspeed={p.name} ({fmt(p.peak)})")
    if plan.rows_per_rank > 1:
        half = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, batch_size=cfg.trainer.batch_size // 2,
                                                                   grad_accum=cfg.trainer.grad_accum * 2))
        if half.trainer.batch_size % plan.chosen.world == 0:
            smaller = make_plan(half, plan.chosen.world).chosen
            if smaller.fits:
                options.append(f"trainer.batch_size={half.trainer.batch_size} trainer.grad_accum="
                               f"{half.trainer.grad_accum} ({fmt(smaller.peak)})")
    if not cfg.student.lora.enabled:
        options.append("student.lora.enabled=true (trains adapters: no full gradients or optimizer state)")
    if cfg.loss.fused and "loss chunk buffers" in plan.chosen.training:
        options.append("a smaller loss.chunk_size")
    where = plan.chosen.generation_what
    if sum(plan.chosen.generation.values()) > sum(plan.chosen.training.values()):
        options.append(f"smaller generation rounds ({where}: trainer.eval_batch_size, sources.*.max_new_tokens)")
    return "; or ".join(options) if options else "more devices (plan.world_size) or a smaller model"


@dataclass
class WorkerPlan:
    """The memory of one ``serve-teacher`` worker, by part, and what it has."""

    resident: dict[str, int]
    work: dict[str, int]  # the largest of a forward, a SeqKD round and an SKD session, on top
    work_what: str
    available: int | None

    @property
    def peak(self) -> int:
        return sum(self.resident.values()) + sum(self.work.values())

    @property
    def fits(self) -> bool:
        return self.available is None or self.peak <= self.available

    def render(self) -> str:
        lines = [f"  {k:<34} {fmt(v):>12}" for k, v in self.resident.items()]
        lines += [f"  {self.work_what}: {fmt(sum(self.work.values()))}"]
        lines += [f"    {k:<32} {fmt(v):>12}" for k, v in self.work.items()]
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"  estimated peak: {fmt(self.peak)}" + (f" of {fmt(self.available)}" if self.available else "")
                     + f" -> {verdict}")
        return "\n".join(lines)


def worker_plan(cfg: DistillConfig) -> WorkerPlan:
    """One worker of ``distill serve-teacher``: the whole teacher, and the largest of a forward over
    ``trainer.batch_size`` sequences of ``data.max_length`` tokens (callers that batching joins add
    theirs), a SeqKD round over as many prompts (``sources.teacher.max_new_tokens``) and an SKD
    generation's verification cache (``sources.skd``; each caller generating at once has one)."""
    t = cfg.teacher
    device = device_type(cfg.trainer.device)
    model, config = _meta_model(t, "teacher", None)
    shape = model_shape(t, "teacher")
    rows, length = cfg.trainer.batch_size, cfg.data.max_length
    model.requires_grad_(True)  # what a training forward would save: each layer's share bounds one layer's
    layers = getattr(config.get_text_config(), "num_hidden_layers", 1)
    per_layer = _saved_activations(model, rows, length) // max(layers, 1)
    forward = {"one layer's activations": per_layer, "hidden states sent (fp32)": rows * length * shape.hidden * 4}
    positions = length + cfg.sources.teacher.max_new_tokens
    generation = {"KV cache": rows * positions * shape.kv_bytes_per_token,
                  "sampling logits": rows * shape.rows * 4 * 2, "one layer's activations": per_layer // length}
    skd_positions = length + cfg.sources.skd.max_new_tokens + cfg.sources.skd.gamma + 1
    skd = {"KV cache": rows * skd_positions * shape.kv_bytes_per_token,
           "hidden states sent (fp32)": rows * (cfg.sources.skd.gamma + 1) * shape.hidden * 4,
           "one layer's activations": per_layer * (cfg.sources.skd.gamma + 1) // length}
    work, what = max((forward, f"forward of {rows} x {length} tokens"),
                     (generation, f"SeqKD round of {rows} prompts x {positions} positions"),
                     (skd, f"SKD verification of {rows} sequences x {skd_positions} positions"),
                     key=lambda w: sum(w[0].values()))
    resident = {"teacher weights": shape.parameters * shape.bytes_per_weight,
                "runtime" + (" (CUDA context)" if device == "cuda" else " (a process like this one)"):
                    RUNTIME_CUDA if device == "cuda" else rss_bytes(),
                "Ray's worker runtime": RAY_WORKER_RUNTIME}
    available = _available(cfg, device, 1)
    if available is not None and device == "cpu":  # the workers of one command share its machine
        available //= cfg.teacher.remote_workers
    return WorkerPlan(resident, work, what, available)


def check(cfg: DistillConfig, world: int) -> RunPlan | None:
    """The plan of a run about to start on ``world`` ranks; raise DistillError when it does not fit,
    before loading."""
    if not cfg.plan.check:
        return None
    plan = make_plan(cfg, world)
    if not plan.fits:
        raise DistillError(
            f"the plan does not fit: about {fmt(plan.chosen.peak)} per rank at its peak, "
            f"{fmt(plan.available) if plan.available else 'unknown'} available ({plan.chosen.name}, "
            f"{plan.chosen.world} rank(s)); try {advice(cfg, plan)}. "
            "`distill plan` with the same arguments shows the estimate; plan.check=false runs anyway")
    return plan

