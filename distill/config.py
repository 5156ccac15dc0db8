"""Typed configuration: the dataclasses behind every recipe, registered with Hydra's ConfigStore.

The dataclasses hold every default. The YAML files in ``recipes/`` (installed as
``distill.recipes``) state only what they change: the ``teacher`` and ``student`` groups name
models, and ``recipe=NAME`` selects a whole recipe (tested: no YAML restates a default).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from distill.errors import DistillError
from distill.losses import BACKENDS, KINDS, check_loss_args
from distill.metrics import METRICS
from distill.schedule import value_at
from distill.tasks import check_builtin

OVERLONG = ("skip", "truncate", "error")  # data.overlong (distill.data.encode)

ASSETS = Path(__file__).parent / "assets"


@dataclass
class ArchConfig:
    """A decoder-only architecture built from scratch (Llama layout), for pretraining."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 768
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = True
    # Embedding rows are padded up to a multiple of this (as real models do).
    vocab_multiple: int = 64
    # Vocabulary of the SentencePiece tokenizer trained when no tokenizer is given.
    tokenizer_vocab_size: int = 320


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str = "all-linear"


@dataclass
class ModelConfig:
    """A causal LM: a local Hugging Face directory (``path``) or a fresh model (``arch``)."""

    path: str | None = None
    # Tokenizer directory; defaults to ``path``. With ``arch`` and no tokenizer one is trained.
    tokenizer: str | None = None
    arch: ArchConfig | None = None
    dtype: str = "float32"
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Teacher only: the student's own base model with its LoRA adapters disabled, so that one copy
    # of the weights serves both (teacher.path is then student.path; needs student.lora.enabled).
    student_base: bool = False


@dataclass
class TeacherConfig(ModelConfig):
    """The teacher: a model (``path``), and optionally its hidden states precomputed on disk
    (``distill cache-teacher``, ``distill.offline``)."""

    # A cache directory written by distill cache-teacher: dataset steps and evaluation read the
    # teacher from it (the trainer loads only the LM head of teacher.path, never the body).
    cache: str | None = None
    # The cache's storage: hidden states in this dtype (bfloat16, float16 or float32), or with
    # cache_top_k > 0 the top-k log-probabilities and the tail's mass (a compact, inexact format).
    cache_dtype: str = "bfloat16"
    cache_top_k: int = 0
    cache_shard_examples: int = 1024  # examples per shard file (the unit a killed cache-teacher redoes)
    # With teacher.cache: load the whole teacher too, for the sources the cache cannot serve
    # (on-policy, SeqKD, SKD responses are not known in advance).
    live: bool = False
    # A teacher served on Ray by `distill serve-teacher teacher.remote=NAME`: its workers compute
    # the hidden states (and SeqKD samples); this process holds the LM head of teacher.path alone.
    remote: str | None = None
    # The Ray cluster the workers run in: "auto" (the one on this machine) or HOST:PORT.
    remote_address: str = "auto"
    # Hidden states on the wire: float32 (remote equals local) or bfloat16 (half the bytes).
    remote_dtype: str = "float32"
    # serve-teacher: how many workers, each holding the whole teacher (a GPU each, or a CPU core).
    remote_workers: int = 1
    # serve-teacher on the CPU: torch threads per worker (null: every core of its machine, as a
    # teacher in the trainer's process uses; Ray would give each worker one).
    remote_threads: int | None = None
    # Ask the workers for a step's hidden states a step ahead, and run the student's decoder while
    # they compute. null: yes, unless they compute on the CPU of the machine this rank trains on
    # with its CPU, where they could only take its cores (docs/teachers.md, "Overlap").
    remote_overlap: bool | None = None
    # serve-teacher: several callers' requests (ranks, jobs) that arrive together share a forward;
    # their answers then equal unshared ones to float rounding (a caller alone: bit for bit).
    remote_batching: bool = True
    # An entry of the ``teachers`` map only: its share of the summed divergence (combine=sum;
    # the weights are normalised to sum to 1), or the values of the data's task field it teaches
    # (combine=route).
    weight: float = 1.0
    routes: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    """Where training and evaluation sequences come from.

    With ``train`` unset the built-in tasks are used (train/validation/test fixed by ``seed``).
    Files are JSONL with ``prompt``/``completion`` or chat ``messages``, or anything
    ``datasets`` reads from local files (csv, parquet, json).
    """

    train: str | None = None
    validation: str | None = None
    test: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["arithmetic", "spelling"])
    # Built-in tasks: easy, medium or hard arithmetic (2 steps with operands up to 9 or 30; 2-3 steps
    # up to 99, the default); spelling has one level.
    difficulty: str = "hard"
    num_train: int = 4000
    num_validation: int = 100
    num_test: int = 200
    # Draw fresh built-in training examples every step instead of a fixed set (pretraining).
    stream: bool = False
    seed: int = 0
    max_length: int = 128
    # A record whose prompt leaves no room for its completion within max_length: skip it,
    # truncate the prompt from the left, or stop with an error naming it. Counted and reported.
    overlong: str = "skip"
    # How generated completions are scored on the user's data (distill.metrics): auto (chrf for
    # free text), chrf, bleu, rouge_l, exact or none. The built-in tasks keep their exact metrics.
    metric: str = "auto"
    # The chat template both models render chat data with: teacher, student or a Jinja file. Unset,
    # a teacher whose template renders a conversation otherwise than the student's stops the run
    # (distill.chat_template).
    chat_template: str | None = None
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    # The field of a user's record that names its task: metrics are grouped by it, and several
    # teachers (combine=route) are routed by it. Built-in records carry their task's name.
    task_field: str = "task"


@dataclass
class LossConfig:
    """The training objective.

    ``kind`` is ``ce`` (SFT: cross-entropy on the data's responses) or a divergence:
    ``fkl``, ``rkl``, ``gjsd``, ``tvd``, ``skew_fkl``, ``skew_rkl``.
    ``beta`` (gjsd): 0 is exactly forward KL and 1 exactly reverse KL; interior values tend to 0
    near both ends, so the loss is discontinuous at beta = 0 and 1 (same convention as TRL).
    The divergence's temperature applies to both models; the cross-entropy is at temperature 1.
    """

    kind: str = "fkl"
    beta: float = 0.5
    alpha: float = 0.1
    temperature: float = 1.0
    hinton_scale: bool = False
    # Weight w of the cross-entropy on the data's labels mixed into a divergence: the objective is
    # (1 - w) * divergence + w * cross-entropy (torchtune's kd_ratio is 1 - w). Off by default; a
    # run's report states it.
    ce_weight: float = 0.0
    # LM head fused with the divergence (distill.fused_loss.fused_linear_divergence): the
    # [tokens x vocab] logits never exist. Off: full logits, then the divergence.
    fused: bool = True
    # auto: Triton kernels on CUDA, plain PyTorch otherwise; or triton / torch.
    backend: str = "auto"
    # Counted tokens per chunk of the fused loss; None sizes chunks by a memory budget.
    chunk_size: int | None = None

    def divergence_kwargs(self) -> dict[str, object]:
        """Keyword arguments of ``distill.losses.divergence`` for this config."""
        return dict(kind=self.kind, beta=self.beta, alpha=self.alpha, temperature=self.temperature,
                    hinton_scale=self.hinton_scale)


@dataclass
class TrainerConfig:
    steps: int = 200
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 5e-4
    min_lr_ratio: float = 0.0
    warmup_steps: int = 20
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    max_grad_norm: float = 1.0
    precision: str = "fp32"  # fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    eval_every: int = 100
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    max_new_tokens: int = 64
    eval_batch_size: int = 100
    progress: bool = True
    # Each micro-batch is computed in up to this many groups of similar length, each padded to its
    # own longest (distill.data.length_buckets): the same loss and gradients, less padding. 1: off.
    length_buckets: int = 4
    # Keep only each decoder layer's input for backward and recompute the rest (about a third more
    # compute for the student; activations shrink to one layer's): large students, long sequences.
    activation_checkpointing: bool = False


SCHEDULES = ("constant", "linear", "cosine", "step")


@dataclass
class Schedule:
    """A value over optimizer steps 0 .. trainer.steps - 1: ``start`` at step 0, moving to ``end`` by
    step ``steps`` (default: the run's last step), then staying there; ``linear`` and ``cosine``
    move gradually, ``step`` switches at ``steps``. ``end`` null or ``kind: constant``: ``start``
    throughout. Extending a run (resume with more trainer.steps) stretches schedules whose
    ``steps`` is null to the new length."""

    start: float = 0.0
    end: float | None = None
    kind: str = "constant"
    steps: int | None = None


def source_weights(**schedules: Schedule) -> dict[str, Schedule]:
    """``sources.weights``: each source's weight schedule, by source name (``distill.sources``);
    the probability that a step's micro-batches all come from a source is its weight over the sum
    of the weights at that step (GKD's lambda is ``student`` 0.5, ``dataset`` 0.5). By default the
    dataset alone; ``schedules`` replace or add entries."""
    weights = {"dataset": Schedule(start=1.0), "teacher": Schedule(), "student": Schedule(), "skd": Schedule()}
    return weights | schedules


def weights_at(weights: dict[str, Schedule], step: int, total: int) -> dict[str, float]:
    """Each source's weight at ``step`` (of ``total``), by its schedule."""
    return {name: value_at(schedule, step, total) for name, schedule in weights.items()}


def sources_in_use(weights: dict[str, Schedule]) -> list[str]:
    """The sources a run draws from at some step: those whose weight is positive at its start or end."""
    return [name for name, w in weights.items() if max(w.start, w.end or 0.0) > 0]


@dataclass
class SamplingConfig:
    """How a model samples a response to a prompt (the student and teacher sources)."""

    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0
    greedy: bool = False
    max_new_tokens: int = 48


@dataclass
class EvalConfig:
    """Sampled evaluation beside the greedy one, in validation and the test report: ``samples``
    responses per prompt (0: greedy only) at ``temperature`` with top-p filtering, scored as mean@n,
    pass@n and distinct right answers per prompt (``distill.evaluation``)."""

    samples: int = 0
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class RewardConfig:
    """A reward beside the divergence on the student's own samples (``distill.rewards``): the
    objective per counted token is the divergence minus ``alpha`` times a policy-gradient estimate
    of the expected reward, with each sample's reward measured against the other samples of its
    prompt (``group`` samples per prompt, RLOO). ``fn``: ``module:function`` scoring the user's
    data; the built-in tasks' checkers otherwise. ``alpha`` 0: distillation alone."""

    alpha: float = 0.0
    fn: str | None = None
    group: int = 4


@dataclass
class SKDConfig:
    """Speculative KD: the student samples at ``temperature``; a token outside the teacher's top
    ``k`` (or, with ``top_p``, its nucleus) is replaced by a teacher sample at ``teacher_temperature``."""

    k: Schedule = field(default_factory=lambda: Schedule(start=25.0))
    top_p: float | None = None
    gamma: int = 4  # drafts per teacher forward (block-wise SKD)
    temperature: float = 1.0
    teacher_temperature: float = 1.0
    teacher_greedy: bool = False
    max_new_tokens: int = 48


@dataclass
class AsynchronousConfig:
    """Generation workers that run ahead of the trainer (``distill.asynchronous``). Policy version
    v is the student after v optimizer steps; step t (from version t to t + 1) trains on samples
    of version max(t - staleness, 0), exactly."""

    staleness: int = 0
    # Ray actors that generate, each with a copy of the student; null: one when staleness > 0,
    # none at 0 (generation in the trainer's process, the synchronous engine).
    workers: int | None = None
    threads: int = 1  # torch threads of each worker on the CPU
    address: str = "auto"  # the Ray cluster (auto: the one on this machine, else one started for the run)

    @property
    def worker_count(self) -> int:
        return (1 if self.staleness > 0 else 0) if self.workers is None else self.workers


@dataclass
class SourcesConfig:
    # teacher: SeqKD; student: on-policy (GKD); skd: speculative KD.
    weights: dict[str, Schedule] = field(default_factory=source_weights)
    student: SamplingConfig = field(default_factory=SamplingConfig)
    teacher: SamplingConfig = field(default_factory=SamplingConfig)
    skd: SKDConfig = field(default_factory=SKDConfig)
    # "async" is a keyword of Python: the command line's sources.async.* means this group.
    asynchronous: AsynchronousConfig = field(default_factory=AsynchronousConfig)
    # Where the teacher source's responses are kept for reuse across runs and recipes
    # (distill.sources.teacher_cache); null: $XDG_CACHE_HOME/distill (~/.cache/distill); "none": off.
    teacher_cache: str | None = None


@dataclass
class DraftConfig:
    """After training, the student as a speculative-decoding draft for the teacher (DistillSpec):
    exported with ``export-draft`` to ``RUN/draft`` and measured by ``eval-draft`` on the run's
    held-out prompts (data.test, else data.validation, else the test split of its built-in tasks);
    alpha and tau go into the report. The defaults bound the measurement to about a minute on a
    2-core CPU; ``full`` takes eval-draft's own (more prompts, gammas 1-8, more timing repeats)."""

    enabled: bool = False
    gammas: list[int] = field(default_factory=lambda: [1, 2, 4])
    num_prompts: int = 32
    max_new_tokens: int = 48
    repeats: int = 2
    full: bool = False


@dataclass
class DeepSpeedConfig:
    """Data parallelism on DeepSpeed ZeRO, for a run launched on several ranks (``deepspeed`` or
    ``torchrun``; ``distill.distributed``). ``stage`` 0 replicates the student on every rank, 1
    also shards its optimizer state, 2 its gradients, 3 its weights. One process at stage 0 runs
    without DeepSpeed; any other stage runs on DeepSpeed also in one process."""

    stage: int = 0
    # The optimizer state and its step on the CPU (ZeRO-Offload): slower steps, far less device memory.
    offload_optimizer: bool = False
    # Stage 3: the student's and the teacher's partitions on the CPU between uses (ZeRO-Infinity).
    offload_params: bool = False
    # On several ranks the teacher is partitioned with ZeRO-3 (inference only, no optimizer state)
    # whatever the student's stage; false replicates it on every rank (faster when it fits).
    shard_teacher: bool = True


@dataclass
class PlanConfig:
    """What ``distill plan`` plans for, and the check every run makes before loading weights."""

    # Ranks (default: the launch's WORLD_SIZE, else 1) and memory per rank in GiB (default: the
    # visible GPU's, or on the CPU the machine's memory shared by the ranks on it).
    world_size: int | None = None
    device_memory_gb: float | None = None
    # Stop a run whose estimated peak does not fit, before any weights are loaded.
    check: bool = True


@dataclass
class DistillConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # Several teachers instead of ``teacher``, by name, each in process, cached or served
    # (``distill.teacher.Teachers``): combine=sum minimises the weighted sum of the divergences to
    # each; combine=route sends each example to the teacher whose ``routes`` hold its task.
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    combine: str = "sum"
    student: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # Where each step's sequences come from (distill.sources): by default the dataset alone.
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    # A run directory to continue from its latest checkpoint; outputs then go there.
    resume: str | None = None
    # Where outputs go; defaults to Hydra's run directory.
    output_dir: str | None = None
    # Evaluate teacher and student on the test split before and after training.
    final_eval: bool = True

    def __post_init__(self) -> None:
        if type(self.teacher) is ModelConfig:  # a teacher given as a model, as before TeacherConfig existed
            self.teacher = TeacherConfig(**{f.name: getattr(self.teacher, f.name) for f in fields(ModelConfig)})


def has_teacher(cfg: DistillConfig) -> bool:
    """Whether the run distils from a teacher (``teacher`` or ``teachers``)."""
    return bool(cfg.teacher.path or cfg.teachers)


def as_member(error: DistillError, name: str) -> DistillError:
    """An error about ``teacher.*`` of a member's config (``member_configs``), naming its fields
    ``teachers.NAME.*``."""
    return DistillError(str(error).replace("teacher.", f"teachers.{name}."))


def member_configs(cfg: DistillConfig) -> dict[str, DistillConfig]:
    """Each of several teachers (``teachers``) as the ``teacher`` of a copy of ``cfg``, by name:
    what builds, checks and plans one teacher serves each; empty for a single teacher."""
    return {name: replace(cfg, teacher=t, teachers={}) for name, t in cfg.teachers.items()}


DTYPES = ("float32", "bfloat16", "float16")
PRECISIONS = ("fp32", "bf16")


def validate(cfg: DistillConfig) -> None:
    """Check a config before anything is loaded; raise DistillError naming the field."""
    if cfg.teachers:
        _validate_teachers(cfg)
    _validate_loss(cfg)
    _validate_models(cfg)
    _validate_teacher_cache(cfg)
    _validate_trainer_and_data(cfg)
    _validate_sources(cfg)
    _validate_eval_and_reward(cfg)
    _validate_placement(cfg)
    _validate_outputs(cfg)


HF_MODEL_DIR = "a Hugging Face model directory with config.json and weights (e.g. from save_pretrained)"


def _not_a_directory(key: str, path: str, what: str, expected: str) -> DistillError:
    """Where a directory was expected: no such path, or what the path is instead."""
    if not Path(path).exists():
        return DistillError(f"{key}: no such {what}: {path}")
    kind = "a GGUF file" if path.lower().endswith(".gguf") else "a file" if Path(path).is_file() else "no directory"
    return DistillError(f"{key}: {path} is {kind}, not a {what}; expected {expected}")


def _validate_loss(cfg: DistillConfig) -> None:
    if cfg.loss.kind not in ("ce", *KINDS):
        raise DistillError(f"loss.kind must be ce (SFT) or one of {', '.join(KINDS)}; got {cfg.loss.kind!r}")
    try:
        if cfg.loss.kind != "ce":
            check_loss_args(cfg.loss.kind, cfg.loss.beta, cfg.loss.alpha, cfg.loss.temperature)
    except ValueError as e:
        raise DistillError(str(e)) from None
    if not 0.0 <= cfg.loss.ce_weight <= 1.0:
        raise DistillError(f"loss.ce_weight must lie in [0, 1] (the cross-entropy's share); got {cfg.loss.ce_weight}")
    if cfg.loss.kind == "ce" and cfg.loss.ce_weight != 0.0:
        raise DistillError("loss.ce_weight mixes cross-entropy into a divergence; loss.kind=ce is cross-entropy alone")
    if cfg.loss.backend not in BACKENDS:
        raise DistillError(f"loss.backend must be one of {', '.join(BACKENDS)}; got {cfg.loss.backend!r}")
    if cfg.loss.chunk_size is not None and cfg.loss.chunk_size < 1:
        raise DistillError(f"loss.chunk_size must be >= 1 (or null for automatic); got {cfg.loss.chunk_size}")
    if cfg.loss.kind != "ce" and not has_teacher(cfg):
        raise DistillError(f"loss.kind={cfg.loss.kind} distils from a teacher, but teacher.path is not set")


COMBINE = ("sum", "route")


def _validate_teachers(cfg: DistillConfig) -> None:
    """Several teachers: each checked as a single teacher is (errors name ``teachers.NAME``), and
    how they combine."""
    if cfg.teacher.path or cfg.teacher.cache or cfg.teacher.remote:
        raise DistillError("teacher and teachers are both set: name every teacher under teachers.NAME")
    if cfg.combine not in COMBINE:
        raise DistillError(f"combine must be one of {', '.join(COMBINE)}; got {cfg.combine!r}")
    routed: dict[str, str] = {}
    for name, view in member_configs(cfg).items():
        t, key = view.teacher, f"teachers.{name}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise DistillError(f"{key}: a teacher's name is letters, digits, '_', '-' or '.' (it names its metrics)")
        if not t.path:
            raise DistillError(f"{key}.path is not set")
        if t.student_base:
            raise DistillError(f"{key}.student_base: several teachers are models of their own")
        try:
            _validate_models(view)
            _validate_teacher_cache(view)
        except DistillError as e:
            raise as_member(e, name) from None
        if cfg.combine == "sum":
            if not (math.isfinite(t.weight) and t.weight > 0):
                raise DistillError(f"{key}.weight must be > 0; got {t.weight}")
            if t.routes:
                raise DistillError(f"{key}.routes: routes choose a teacher per example under combine=route "
                                   f"(combine={cfg.combine})")
            continue
        if t.weight != 1.0:
            raise DistillError(f"{key}.weight: combine=route gives each example to one teacher; weights are for "
                               "combine=sum")
        if not t.routes:
            raise DistillError(f"{key}.routes: combine=route needs the data.{cfg.data.task_field} values this teacher "
                               "teaches (e.g. [arithmetic])")
        for value in t.routes:
            if value in routed:
                raise DistillError(f"{key}.routes: {value!r} is routed to teachers.{routed[value]} already")
            routed[value] = name
    if cfg.combine == "route" and cfg.data.stream:
        raise DistillError("combine=route routes the examples of a fixed dataset; data.stream draws new ones")
    if cfg.draft.enabled:
        raise DistillError("draft.enabled measures the student as a draft for one teacher; with several (teachers) "
                           "run distill eval-draft against the one you serve")
    if cfg.data.chat_template == "teacher":
        raise DistillError("data.chat_template=teacher: several teachers; name the template (student or a file)")


def _validate_models(cfg: DistillConfig) -> None:
    for role in ("teacher", "student"):
        m: ModelConfig = getattr(cfg, role)
        if m.dtype not in DTYPES:
            raise DistillError(f"{role}.dtype must be one of {DTYPES}; got {m.dtype!r}")
        if m.path is not None and m.arch is not None:
            raise DistillError(f"{role}: set either {role}.path (pretrained) or {role}.arch (from scratch), not both")
        if m.path is not None and not Path(m.path).is_dir():
            raise _not_a_directory(f"{role}.path", m.path, "model directory", HF_MODEL_DIR)
        if m.path is not None and (problem := gguf_directory_problem(m.path)):
            raise DistillError(f"{role}.path: {problem}")
        if m.tokenizer is not None and not Path(m.tokenizer).is_dir():
            raise _not_a_directory(f"{role}.tokenizer", m.tokenizer, "tokenizer directory",
                                   "a Hugging Face model or tokenizer directory (tokenizer files, e.g. from "
                                   "save_pretrained)")
    if cfg.student.student_base:
        raise DistillError("student.student_base is a teacher option (teacher.student_base=true)")
    if cfg.teacher.student_base:
        if not cfg.student.lora.enabled:
            raise DistillError("teacher.student_base uses the student's base model with its LoRA adapters disabled; "
                               "it needs student.lora.enabled=true")
        if cfg.teacher.path is None or cfg.student.path is None or (
                Path(cfg.teacher.path).resolve() != Path(cfg.student.path).resolve()):
            raise DistillError(f"teacher.student_base: teacher.path must be student.path (the base model both "
                               f"share); got {cfg.teacher.path} and {cfg.student.path}")
        if cfg.teacher.dtype != cfg.student.dtype:
            raise DistillError(f"teacher.student_base: the teacher is the student's weights, so teacher.dtype must be "
                               f"student.dtype ({cfg.student.dtype}); got {cfg.teacher.dtype}")
    if cfg.student.path is None and cfg.student.arch is None:
        raise DistillError("student.path is not set (a local Hugging Face model directory)")


def _validate_teacher_cache(cfg: DistillConfig) -> None:
    t = cfg.teacher
    if t.cache_dtype not in DTYPES:
        raise DistillError(f"teacher.cache_dtype must be one of {', '.join(DTYPES)}; got {t.cache_dtype!r}")
    if t.cache_top_k < 0:
        raise DistillError(f"teacher.cache_top_k must be >= 0 (0: hidden states); got {t.cache_top_k}")
    if t.cache_shard_examples < 1:
        raise DistillError(f"teacher.cache_shard_examples must be >= 1; got {t.cache_shard_examples}")
    if t.cache and not t.path:
        raise DistillError("teacher.cache: teacher.path is not set (the teacher the cache holds, and its LM head)")
    if t.cache and t.student_base:
        raise DistillError("teacher.cache holds a teacher of its own; teacher.student_base is the student's weights")
    if t.cache and cfg.data.stream:
        raise DistillError("teacher.cache holds a fixed dataset; data.stream draws new examples without end")
    if t.remote is not None:
        if not t.path:
            raise DistillError("teacher.remote: teacher.path is not set (its LM head, and the weights the workers "
                               "must hold)")
        if t.remote_dtype not in ("float32", "bfloat16"):
            raise DistillError(f"teacher.remote_dtype must be float32 or bfloat16; got {t.remote_dtype!r}")
        if t.remote_workers < 1:
            raise DistillError(f"teacher.remote_workers must be >= 1; got {t.remote_workers}")
        if t.remote_threads is not None and t.remote_threads < 1:
            raise DistillError(f"teacher.remote_threads must be >= 1 (or null: every core); got {t.remote_threads}")
        if t.cache or t.student_base:
            raise DistillError("teacher.remote is the teacher; unset teacher.cache and teacher.student_base")
    if t.live and not t.cache:
        raise DistillError("teacher.live loads the teacher beside teacher.cache; without a cache it is live anyway")


def _validate_trainer_and_data(cfg: DistillConfig) -> None:
    t = cfg.trainer
    if t.precision not in PRECISIONS:
        raise DistillError(f"trainer.precision must be one of {PRECISIONS}; got {t.precision!r}")
    for name in ("steps", "batch_size", "grad_accum", "eval_every", "save_every", "log_every", "keep_checkpoints",
                 "max_new_tokens", "eval_batch_size", "length_buckets"):
        if getattr(t, name) < 1:
            raise DistillError(f"trainer.{name} must be >= 1; got {getattr(t, name)}")
    if cfg.data.overlong not in OVERLONG:
        raise DistillError(f"data.overlong must be one of {', '.join(OVERLONG)}; got {cfg.data.overlong!r}")
    check_builtin(cfg.data.tasks, cfg.data.difficulty, "data.")
    if cfg.data.metric not in METRICS:
        raise DistillError(f"data.metric must be one of {', '.join(METRICS)}; got {cfg.data.metric!r}")
    if cfg.data.max_length < 2:
        raise DistillError(f"data.max_length must be >= 2; got {cfg.data.max_length}")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise DistillError(f"trainer.min_lr_ratio must lie in [0, 1]; got {t.min_lr_ratio}")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise DistillError(f"trainer.betas must be two values in [0, 1) (AdamW's beta1, beta2); got {list(t.betas)}")


def _validate_placement(cfg: DistillConfig) -> None:
    ds = cfg.deepspeed
    if ds.stage not in (0, 1, 2, 3):
        raise DistillError(f"deepspeed.stage must be 0, 1, 2 or 3 (ZeRO stages; 0: no sharding); got {ds.stage}")
    if ds.offload_params and ds.stage != 3:
        raise DistillError(f"deepspeed.offload_params offloads ZeRO-3 partitions; it needs deepspeed.stage=3, "
                           f"got {ds.stage} (deepspeed=zero3_offload)")
    if ds.offload_optimizer and ds.stage == 0:
        raise DistillError("deepspeed.offload_optimizer needs a ZeRO stage (deepspeed.stage=1, 2 or 3)")
    if cfg.plan.world_size is not None and cfg.plan.world_size < 1:
        raise DistillError(f"plan.world_size must be >= 1; got {cfg.plan.world_size}")
    if cfg.plan.device_memory_gb is not None and not cfg.plan.device_memory_gb > 0:
        raise DistillError(f"plan.device_memory_gb must be > 0; got {cfg.plan.device_memory_gb}")


def _validate_outputs(cfg: DistillConfig) -> None:
    """The draft report, the chat template, the data files and the run to resume."""
    if cfg.draft.enabled:
        d = cfg.draft
        if not cfg.teacher.path:
            raise DistillError("draft.enabled measures the student as a draft for the teacher; teacher.path is not set")
        if cfg.data.train is not None and cfg.data.test is None and cfg.data.validation is None:
            raise DistillError("draft.enabled measures the draft on the run's held-out prompts: set data.test or "
                               "data.validation (user data has no built-in test split)")
        if not d.gammas or min(d.gammas) < 1 or min(d.num_prompts, d.max_new_tokens, d.repeats) < 1:
            raise DistillError(f"draft: gammas, num_prompts, max_new_tokens and repeats must be >= 1; got "
                               f"{list(d.gammas)}, {d.num_prompts}, {d.max_new_tokens}, {d.repeats}")
    ct = cfg.data.chat_template
    if ct is not None and ct not in ("teacher", "student") and not Path(ct).is_file():
        raise DistillError(f"data.chat_template: {ct} is not a file; expected teacher, student or a Jinja template "
                           "file")
    if ct == "teacher" and not cfg.teacher.path:
        raise DistillError("data.chat_template=teacher: teacher.path is not set")
    for split in ("train", "validation", "test"):
        path = getattr(cfg.data, split)
        if path is not None and not Path(path).exists():
            raise DistillError(f"data.{split}: no such file: {path}")
    if cfg.resume is not None and not Path(cfg.resume).is_dir():
        raise _not_a_directory("resume", cfg.resume, "run directory", "the run directory of a distill run")


def gguf_directory_problem(path: str | Path) -> str | None:
    """What is wrong with a model directory that holds a GGUF file and no ``config.json`` (a
    llama.cpp download): transformers would only say that a ``model_type`` key is missing."""
    path = Path(path)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if not ggufs or (path / "config.json").exists():
        return None
    return (f"{path} holds a GGUF file ({', '.join(ggufs[:3])}) and no config.json: a llama.cpp model, not a "
            f"Hugging Face one. Convert it first: AutoModelForCausalLM.from_pretrained('{path}', gguf_file="
            f"'{ggufs[0]}') and AutoTokenizer likewise (needs the gguf package), then save_pretrained(DIR) both and "
            "use DIR; or take the original Hugging Face model")


def _validate_schedule(key: str, sched: Schedule, low: float, high: float = math.inf) -> None:
    if sched.kind not in SCHEDULES:
        raise DistillError(f"{key}.kind must be one of {', '.join(SCHEDULES)}; got {sched.kind!r}")
    for name in ("start", "end"):
        value = getattr(sched, name)
        if value is not None and not low <= value <= high:
            raise DistillError(f"{key}.{name} must lie in [{low:g}, {high:g}]; got {value:g}")
    if sched.steps is not None and sched.steps < 1:
        raise DistillError(f"{key}.steps must be >= 1 (or null: the run's length); got {sched.steps}")


def _validate_sources(cfg: DistillConfig) -> None:
    src, steps = cfg.sources, cfg.trainer.steps
    for name, schedule in src.weights.items():
        _validate_schedule(f"sources.weights.{name}", schedule, 0.0)
    if not sources_in_use(src.weights):
        raise DistillError("sources.weights: every weight is 0; give at least one source a positive weight")
    for s in range(steps):  # each step must have a source to draw from
        if not any(weights_at(src.weights, s, steps).values()):
            raise DistillError(f"sources.weights: every weight is 0 at step {s} of trainer.steps={steps}")
    for role in ("student", "teacher"):
        s = getattr(src, role)
        if not s.temperature > 0:
            raise DistillError(f"sources.{role}.temperature must be > 0; got {s.temperature}")
        if not 0 < s.top_p <= 1:
            raise DistillError(f"sources.{role}.top_p must lie in (0, 1]; got {s.top_p}")
        if s.top_k < 0 or s.max_new_tokens < 1:
            raise DistillError(f"sources.{role}: top_k must be >= 0 and max_new_tokens >= 1; got "
                               f"{s.top_k}, {s.max_new_tokens}")
    k = src.skd
    _validate_schedule("sources.skd.k", k.k, 1.0)
    if k.top_p is not None and not 0 < k.top_p <= 1:
        raise DistillError(f"sources.skd.top_p must lie in (0, 1] (or null: top-K); got {k.top_p}")
    if k.gamma < 1 or k.max_new_tokens < 1:
        raise DistillError(f"sources.skd: gamma and max_new_tokens must be >= 1; got {k.gamma}, {k.max_new_tokens}")
    for name in ("temperature", "teacher_temperature"):
        if not getattr(k, name) > 0:
            raise DistillError(f"sources.skd.{name} must be > 0; got {getattr(k, name)}")
    _validate_asynchronous(cfg)


def _validate_asynchronous(cfg: DistillConfig) -> None:
    a = cfg.sources.asynchronous
    if a.staleness < 0:
        raise DistillError(f"sources.asynchronous.staleness must be >= 0 (0: synchronous); got {a.staleness}")
    if a.workers is not None and a.workers < 0:
        raise DistillError(f"sources.asynchronous.workers must be >= 0 (or null); got {a.workers}")
    if a.threads < 1:
        raise DistillError(f"sources.asynchronous.threads must be >= 1; got {a.threads}")
    if a.staleness > 0 and a.worker_count == 0:
        raise DistillError(f"sources.asynchronous.staleness={a.staleness} runs generation ahead in workers; "
                           "sources.asynchronous.workers=0 leaves none")
    if a.worker_count and cfg.deepspeed.stage > 0:
        raise DistillError("sources.asynchronous.workers: generation workers serve one process's student for now; "
                           "not with DeepSpeed ZeRO (deepspeed.stage > 0)")


def _validate_eval_and_reward(cfg: DistillConfig) -> None:
    e, r = cfg.eval, cfg.reward
    if e.samples < 0:
        raise DistillError(f"eval.samples must be >= 0 (0: greedy evaluation only); got {e.samples}")
    if not e.temperature > 0:
        raise DistillError(f"eval.temperature must be > 0; got {e.temperature}")
    if not 0 < e.top_p <= 1:
        raise DistillError(f"eval.top_p must lie in (0, 1]; got {e.top_p}")
    if e.samples and cfg.data.metric == "none":
        raise DistillError("eval.samples scores sampled responses; data.metric=none generates nothing")
    if not (math.isfinite(r.alpha) and r.alpha >= 0):
        raise DistillError(f"reward.alpha must be >= 0 (0: distillation alone); got {r.alpha}")
    if r.alpha == 0:
        return
    if "student" not in sources_in_use(cfg.sources.weights):
        raise DistillError("reward.alpha: the policy-gradient term needs the student's own samples; "
                           "sources.weights.student is 0 (the other sources' samples are not the student's)")
    if r.group < 2:
        raise DistillError(f"reward.group must be >= 2 (the baseline of a sample is its prompt's other samples); "
                           f"got {r.group}")
    if cfg.trainer.batch_size % r.group:
        raise DistillError(f"trainer.batch_size={cfg.trainer.batch_size} must be a multiple of reward.group="
                           f"{r.group} (each prompt's samples fill the batch)")
    if r.fn is not None and not re.fullmatch(r"[\w.]+:\w+", r.fn):
        raise DistillError(f"reward.fn must be module:function (e.g. my_rewards:score); got {r.fn!r}")
    if r.fn is None and cfg.data.train is not None:
        raise DistillError("reward.alpha: the user's data has no built-in checker; set reward.fn=module:function")


def check_vocabulary(cfg: DistillConfig, vocab: int) -> None:
    """What can be checked once the tokenizer's length ``vocab`` is known: SKD's K lies in the vocabulary."""
    k = cfg.sources.skd.k
    if cfg.sources.skd.top_p is None and max(k.start, k.end or 0) > vocab:
        raise DistillError(f"sources.skd.k must lie in [1, {vocab}] (the vocabulary); got {max(k.start, k.end or 0):g}")


def _asset(name: str) -> str:
    path = ASSETS / name
    if not path.is_dir():
        raise DistillError(f"built-in asset {name!r} is missing from {ASSETS}")
    return str(path)


def register() -> None:
    """Register the schema with Hydra's ConfigStore and the ``${asset:NAME}`` resolver."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", _asset)
    ConfigStore.instance().store(name="distill_schema", node=DistillConfig)


__all__ = [
    "ArchConfig", "LoraConfig", "ModelConfig", "TeacherConfig", "DataConfig", "LossConfig", "TrainerConfig",
    "DeepSpeedConfig", "PlanConfig", "EvalConfig", "RewardConfig", "DistillConfig", "validate", "register",
]
