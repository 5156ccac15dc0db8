"""distill against TRL's GKDTrainer, measured in the same run: the same training, two tools.

For each recipe (``gkd``: on-policy with lambda 0.5 and generalized JSD; ``supervised_kd``:
forward KL on the dataset, which is TRL's GKD with lambda 0 and beta 0) and each seed, both
tools train the shipped student from the shipped teacher on the same built-in training examples
(the same token ids), each in a fresh process, one after the other (the order alternates by seed,
so drift of the machine hits both alike). The TRL configuration is derived from distill's recipe
field by field (``trl_fields``; the mapping is printed and written with the results) and gets
TRL's fastest honest settings on a CPU: fp32 (its config inherits ``bf16=True``, which without
bf16 hardware runs in emulation) and no gradient checkpointing (inherited as well; it also turns
the KV cache off in generation).

Measured for each: the training loop's wall time (distill: the steps' training and generation
time from its metrics; TRL: ``train_runtime``), generation time within it, the whole process
(loading, training, saving), the process's peak resident memory, and the test accuracy of the
trained student, scored by the same code (distill's evaluation, greedy) for both.

``supervised_kd`` also runs a third way, in the same run: distill reading the teacher from an
offline cache (``distill cache-teacher``, built once before the timed runs from the same
examples; its build time is reported apart), which no teacher forward is left in.
Writes ``trl_gkd.json`` and ``trl_gkd.md``.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.environment import environment
from benchmarks.metrics import metric, peak_rss_mb, write_json
from distill.config import sources_in_use

RECIPES = ("gkd", "supervised_kd")
CACHED = "distill, cached"  # supervised_kd from an offline teacher cache (the dataset source alone)
# What TRL's GKDTrainer cannot express, for the table.
TRL_CANNOT = (
    "SKD (student proposes, teacher replaces tokens outside its top-K): no such source",
    "a mixture of sources beyond lambda (dataset, teacher samples, student samples and SKD, with schedules): "
    "lambda alone, or seq_kd for teacher samples instead of the dataset",
    "TVD and skew KL: generalized JSD only (forward and reverse KL as beta 0 and 1)",
    "a temperature on the loss: `temperature` is the sampling temperature only",
    "a loss that never holds the [tokens x vocab] logits (its GKD takes full logits of both models)",
)


def distill_config(recipe: str, steps: int, seed: int, out: Path):
    """The recipe as both tools run it: the recipe's own fields, ``steps`` optimizer steps, no
    evaluation or checkpoint inside the timed run (both are scored afterwards by the same code)."""
    from benchmarks.recipes import recipe_config

    return recipe_config(recipe, [
        f"trainer.steps={steps}", f"trainer.warmup_steps={max(1, steps // 10)}", f"trainer.seed={seed}",
        "trainer.eval_every=1000000", f"trainer.save_every={steps}", "trainer.progress=false", "final_eval=false",
        "trainer.device=cpu", "data.num_validation=0", f"output_dir={out}",
    ])


def trl_fields(cfg) -> tuple[dict, list[tuple[str, object, str, object]]]:
    """GKDConfig keyword arguments for distill's ``cfg``, and the mapping (distill field, value, TRL
    field, value) to print. Raises ValueError for what TRL's GKD cannot express."""
    w, tc, loss = cfg.sources.weights, cfg.trainer, cfg.loss
    for name in sources_in_use(w):
        if name not in ("dataset", "student"):
            raise ValueError(f"sources.weights.{name}: TRL's GKD has no such source")
    if any(w[n].end not in (None, w[n].start) and w[n].kind != "constant" for n in ("dataset", "student")):
        raise ValueError("sources.weights: TRL's lambda is a constant")
    if cfg.student.lora.enabled:
        raise ValueError("student.lora: the comparison trains every weight in both tools")
    if {cfg.student.dtype, cfg.teacher.dtype} != {"float32"}:
        raise ValueError("student.dtype and teacher.dtype: the comparison runs both models in float32")
    if cfg.data.stream or cfg.data.train is not None:
        raise ValueError("data: the comparison gives both tools the built-in fixed training set")
    if tc.weight_decay:
        raise ValueError("trainer.weight_decay: transformers exempts biases and norms from decay, distill does not")
    if tc.grad_accum != 1:
        raise ValueError("trainer.grad_accum: TRL draws lambda per micro-batch, distill per step")
    if tc.device != "cpu":
        raise ValueError("trainer.device: the comparison runs both on the CPU")
    lmbda = w["student"].start / (w["student"].start + w["dataset"].start)
    beta = {"fkl": 0.0, "rkl": 1.0, "gjsd": loss.beta}.get(loss.kind)
    if beta is None:
        raise ValueError(f"loss.kind={loss.kind}: TRL's GKD has generalized JSD only")
    if loss.temperature != 1.0 or loss.ce_weight:
        raise ValueError("loss.temperature and loss.ce_weight: TRL's GKD loss has neither")
    s = cfg.sources.student
    if s.top_k or s.top_p < 1.0 or s.greedy:
        raise ValueError("sources.student: TRL samples with top_k 0 and top_p 1")
    rows = [
        ("sources.weights.student / (student + dataset)", lmbda, "lmbda", lmbda),
        (f"loss.kind={loss.kind}" + (f", loss.beta={loss.beta}" if loss.kind == "gjsd" else ""), beta, "beta", beta),
        ("loss.temperature", loss.temperature, "(loss at temperature 1)", 1.0),
        ("sources.student.temperature", s.temperature, "temperature", s.temperature),
        ("sources.student.max_new_tokens", s.max_new_tokens, "max_new_tokens", s.max_new_tokens),
        ("trainer.batch_size", tc.batch_size, "per_device_train_batch_size", tc.batch_size),
        ("trainer.grad_accum", tc.grad_accum, "gradient_accumulation_steps", tc.grad_accum),
        ("trainer.steps", tc.steps, "max_steps", tc.steps),
        ("trainer.lr", tc.lr, "learning_rate", tc.lr),
        ("trainer.warmup_steps", tc.warmup_steps, "warmup_steps", tc.warmup_steps),
        ("cosine to trainer.min_lr_ratio", tc.min_lr_ratio, "lr_scheduler_type", "cosine" if not tc.min_lr_ratio
         else "cosine_with_min_lr"),
        ("trainer.betas", list(tc.betas), "adam_beta1, adam_beta2", list(tc.betas)),
        ("(torch AdamW eps)", 1e-8, "adam_epsilon", 1e-8),
        ("trainer.weight_decay", tc.weight_decay, "weight_decay", tc.weight_decay),
        ("trainer.max_grad_norm", tc.max_grad_norm, "max_grad_norm", tc.max_grad_norm),
        ("trainer.seed", tc.seed, "seed", tc.seed),
        ("data.max_length", cfg.data.max_length, "max_length", cfg.data.max_length),
        ("trainer.precision", tc.precision, "bf16, fp16", [False, False]),
        ("trainer.device", tc.device, "use_cpu", True),
        ("(no gradient checkpointing)", False, "gradient_checkpointing", False),
    ]
    if tc.precision != "fp32":
        raise ValueError("trainer.precision: the comparison runs both in fp32")
    kwargs = dict(
        lmbda=lmbda, beta=beta, temperature=s.temperature, max_new_tokens=s.max_new_tokens,
        per_device_train_batch_size=tc.batch_size, gradient_accumulation_steps=tc.grad_accum, max_steps=tc.steps,
        learning_rate=tc.lr, warmup_steps=tc.warmup_steps,
        lr_scheduler_type="cosine" if not tc.min_lr_ratio else "cosine_with_min_lr",
        lr_scheduler_kwargs={} if not tc.min_lr_ratio else {"min_lr_rate": tc.min_lr_ratio},
        adam_beta1=tc.betas[0], adam_beta2=tc.betas[1], adam_epsilon=1e-8, weight_decay=tc.weight_decay,
        max_grad_norm=tc.max_grad_norm, seed=tc.seed, data_seed=tc.seed, max_length=cfg.data.max_length,
        bf16=False, fp16=False, gradient_checkpointing=False, optim="adamw_torch", use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=10, disable_tqdm=True, dataloader_num_workers=0,
    )
    return kwargs, rows


def _accuracy(cfg, model_dir: Path) -> float:
    """Test accuracy of the model in ``model_dir`` on the recipe's test split, by distill's evaluation."""
    import torch

    from distill.data import encode_all, load_split
    from distill.evaluation import evaluate
    from distill.models import load_model, load_tokenizer

    tok = load_tokenizer(model_dir)
    records, _, _ = encode_all(load_split(cfg.data, "test", tok), tok, cfg.data.max_length, cfg.data.overlong)
    model = load_model(type(cfg.student)(path=str(model_dir)), "student", torch.device("cpu")).eval()
    return evaluate(model, tok, records, metric=cfg.data.metric, max_new_tokens=cfg.trainer.max_new_tokens,
                    batch_size=cfg.trainer.eval_batch_size, max_length=cfg.data.max_length)["accuracy"]


class Phases:
    """Where distill's training loop spends its time: wall seconds inside generation, the student's
    and the teacher's forward, the loss, backward, gradient clipping and the optimizer step, timed
    by wrapping the functions the loop calls (nothing else changes)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.wrapped: list[tuple[object, str, object]] = []  # (owner, name, the real function)

    def wrap(self, owner: object, name: str, phase) -> None:
        real = getattr(owner, name)
        self.wrapped.append((owner, name, real))

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                key = phase(*args) if callable(phase) else phase
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0

        setattr(owner, name, timed)

    def uninstall(self) -> None:
        """Put every wrapped function back (newest first)."""
        for owner, name, real in reversed(self.wrapped):
            setattr(owner, name, real)
        self.wrapped.clear()

    def install(self) -> None:
        import torch

        import distill.objective
        import distill.sources.on_policy
        import distill.sources.skd
        import distill.teacher

        # The sources' generation: the student's samples, the teacher's (through LocalTeacher), SKD.
        self.wrap(distill.sources.on_policy, "sample", "generation")
        self.wrap(distill.teacher, "sample", "generation")
        self.wrap(distill.sources.skd, "skd_generate", "generation")
        # The teacher's forward runs without gradients, the student's with them.
        self.wrap(distill.objective, "final_hidden",
                  lambda *a: "student forward" if torch.is_grad_enabled() else "teacher forward")
        self.wrap(distill.teacher, "final_hidden", "teacher forward")
        self.wrap(distill.objective, "fused_linear_loss", "loss (LM heads + divergence)")
        self.wrap(torch.Tensor, "backward", "backward")
        self.wrap(torch.nn.utils, "clip_grad_norm_", "gradient clipping")
        self.wrap(torch.optim.AdamW, "step", "optimizer step")


def child(tool: str, recipe: str, seed: int, steps: int, out: Path, cache: str | None = None) -> dict:
    """One training run in this (fresh) process (``cache``: distill reads the teacher from it)."""
    import torch
    import transformers

    torch.set_num_threads(2)
    transformers.utils.logging.set_verbosity_error()
    start_rss = peak_rss_mb()
    cfg = distill_config(recipe, steps, seed, out / "run")
    cfg.teacher.cache = cache
    t0 = time.perf_counter()
    if tool == "distill":
        from distill.tracking import MetricsLog
        from distill.train import train

        phases = Phases()
        phases.install()
        train(cfg, out / "run")
        wall = time.perf_counter() - t0
        rows = [r for r in MetricsLog.read(out / "run" / "metrics.jsonl") if r["split"] == "train"]
        gen = sum(r.get("gen_seconds", 0.0) for r in rows)
        loop = sum(r["train_seconds"] for r in rows) + gen
        on_policy = round(sum(r["source_student"] * (r["step"] - prev) for r, prev in
                              zip(rows, [0] + [r["step"] for r in rows[:-1]], strict=True)))
        model_dir = out / "run" / "model"
        final_loss = rows[-1]["loss"]
        profile = {**phases.seconds, "rest of the loop": loop - sum(phases.seconds.values())}
    else:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        from distill.data import TrainData
        from distill.models import load_tokenizer

        kwargs, _ = trl_fields(cfg)
        tok = load_tokenizer(cfg.student.path)
        # The same examples as token ids: the prompt's and the completion's (with its EOS), as distill encodes them.
        examples = TrainData(cfg.data, tok, seed).examples
        data = Dataset.from_list([{"prompt": "", "input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)}
                                  for p, c in examples])
        student = AutoModelForCausalLM.from_pretrained(cfg.student.path, dtype=torch.float32)
        teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher.path, dtype=torch.float32)
        trainer = GKDTrainer(model=student, teacher_model=teacher, train_dataset=data, processing_class=tok,
                             args=GKDConfig(output_dir=str(out / "trl"), **kwargs))
        timing = {"gen": 0.0, "calls": 0}
        generate = trainer.generate_on_policy_outputs

        def timed(*args, **kw):  # the on-policy generation inside TRL's training step
            t = time.perf_counter()
            result = generate(*args, **kw)
            timing["gen"] += time.perf_counter() - t
            timing["calls"] += 1
            return result

        trainer.generate_on_policy_outputs = timed
        metrics = trainer.train().metrics
        model_dir = out / "run" / "model"
        trainer.save_model(str(model_dir))
        tok.save_pretrained(str(model_dir))
        wall = time.perf_counter() - t0
        loop, gen, on_policy = metrics["train_runtime"], timing["gen"], timing["calls"]
        final_loss = next(r["loss"] for r in reversed(trainer.state.log_history) if "loss" in r)
        profile = None
    peak = peak_rss_mb()
    return {"tool": tool, "recipe": recipe, "seed": seed, "steps": steps, "loop_seconds": loop,
            "generation_seconds": gen, "process_seconds": wall, "on_policy_steps": on_policy,
            "final_train_loss": final_loss, "peak_rss_mb": peak, "peak_rss_above_start_mb": peak - start_rss,
            "profile": profile,
            "accuracy": _accuracy(cfg, model_dir)}


# The peak-memory ratio's resolution: the run-to-run variation of one commit's peak (measured below).
MEMORY_RESOLUTION = 0.05


def _spawn(tool: str, recipe: str, seed: int, steps: int, cache: Path | None = None) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="distill-trl-"))
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.trl_gkd", "distill" if cache else tool, recipe,
                               str(seed), str(steps), str(scratch), *([str(cache)] if cache else [])],
                              capture_output=True, text=True, cwd=Path(__file__).parents[1])
        if proc.returncode:
            raise RuntimeError(f"trl_gkd: the {tool} run of {recipe} (seed {seed}) failed:\n{proc.stderr[-4000:]}")
        return {**json.loads(proc.stdout.strip().splitlines()[-1]), "tool": tool}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _build_cache(steps: int, seed: int) -> tuple[Path, float]:
    """The offline teacher cache of supervised_kd's data (every seed's run reads the same
    examples), written by ``distill cache-teacher`` in a process of its own; its path and seconds."""
    from omegaconf import OmegaConf

    root = Path(tempfile.mkdtemp(prefix="distill-trl-cache-"))
    cfg = distill_config("supervised_kd", steps, seed, root / "unused")
    cfg.teacher.cache = str(root / "cache")
    (root / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.trl_gkd", "cache", str(root / "config.yaml")],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    if proc.returncode:
        raise RuntimeError(f"trl_gkd: cache-teacher failed:\n{proc.stderr[-4000:]}")
    return root / "cache", time.perf_counter() - t0


def run(out: Path, seed: int = 0, steps: int = 300, seeds: list[int] | None = None,
        recipes: list[str] | None = None) -> dict:
    try:
        import trl
    except ImportError:
        raise SystemExit("trl_gkd: TRL is not installed; pip install -e '.[bench]'") from None
    seeds, recipes = seeds or [seed], recipes or list(RECIPES)
    mappings = {r: trl_fields(distill_config(r, steps, seeds[0], Path(tempfile.gettempdir())))[1] for r in recipes}
    for recipe, rows in mappings.items():
        print(f"{recipe}: distill field = value -> TRL GKDConfig field = value")
        for d, dv, t, tv in rows:
            print(f"  {d} = {dv} -> {t} = {tv}")
    runs = []
    cache, cache_seconds = _build_cache(steps, seeds[0]) if "supervised_kd" in recipes else (None, 0.0)
    for recipe in recipes:
        for i, s in enumerate(seeds):
            order = ("distill", "trl") if i % 2 == 0 else ("trl", "distill")
            if recipe == "supervised_kd":
                order = (CACHED, *order) if i % 2 == 0 else (*order, CACHED)
            for tool in order:
                runs.append(_spawn(tool, recipe, s, steps, cache if tool == CACHED else None))
                r = runs[-1]
                print(f"{recipe} seed {s} {tool}: loop {r['loop_seconds']:.1f} s (generation "
                      f"{r['generation_seconds']:.1f} s), accuracy {r['accuracy']:.3f}", flush=True)
    if cache is not None:
        shutil.rmtree(cache.parent, ignore_errors=True)
    summary, metrics = {}, {}
    for recipe in recipes:
        by_tool = {t: [r for r in runs if r["recipe"] == recipe and r["tool"] == t] for t in ("distill", "trl", CACHED)}
        by_tool = {t: rs for t, rs in by_tool.items() if rs}
        row = {t: {k: statistics.mean(r[k] for r in rs) for k in ("loop_seconds", "generation_seconds",
                                                                  "process_seconds", "peak_rss_mb",
                                                                  "peak_rss_above_start_mb", "accuracy",
                                                                  "on_policy_steps")}
               for t, rs in by_tool.items()}
        # Per seed, then the median: both runs of a seed saw the same data and machine moment.
        pairs = list(zip(by_tool["distill"], by_tool["trl"], strict=True))
        row["loop_ratio"] = statistics.median(d["loop_seconds"] / t["loop_seconds"] for d, t in pairs)
        row["process_ratio"] = statistics.median(d["process_seconds"] / t["process_seconds"] for d, t in pairs)
        row["memory_ratio"] = statistics.median(d["peak_rss_mb"] / t["peak_rss_mb"] for d, t in pairs)
        row["accuracy_difference"] = row["distill"]["accuracy"] - row["trl"]["accuracy"]
        if CACHED in by_tool:
            cached = list(zip(by_tool[CACHED], by_tool["trl"], strict=True))
            row["cached_loop_ratio"] = statistics.median(d["loop_seconds"] / t["loop_seconds"] for d, t in cached)
            row["cached_process_ratio"] = statistics.median(d["process_seconds"] / t["process_seconds"]
                                                            for d, t in cached)
            row["cached_memory_ratio"] = statistics.median(d["peak_rss_mb"] / t["peak_rss_mb"] for d, t in cached)
            row["cached_accuracy_difference"] = row[CACHED]["accuracy"] - row["trl"]["accuracy"]
            metrics[f"{recipe} distill from a cache over trl loop time"] = metric(row["cached_loop_ratio"], "lower",
                                                                                  "ratio")
        phases = dict.fromkeys(k for r in by_tool["distill"] for k in r["profile"])  # in-process distill
        row["distill_profile"] = {k: statistics.mean(r["profile"].get(k, 0.0) for r in by_tool["distill"])
                                  for k in phases}
        summary[recipe] = row
        metrics[f"{recipe} distill over trl loop time"] = metric(row["loop_ratio"], "lower", "ratio")
        # One commit's distill GKD run peaks at 623 or 646 MiB from run to run (4 runs each of two
        # commits, 2026-12-06): a resolution of 5%, not the default 2%.
        metrics[f"{recipe} distill over trl peak memory"] = metric(row["memory_ratio"], "lower", "memory",
                                                                   floor=MEMORY_RESOLUTION * row["memory_ratio"])
    batch = distill_config(recipes[0], steps, seeds[0], Path(tempfile.gettempdir())).trainer.batch_size
    result = {"environment": environment(), "trl": trl.__version__, "steps": steps, "seeds": seeds, "batch": batch,
              "cache_build_seconds": cache_seconds,
              "mapping": {r: [list(m) for m in rows] for r, rows in mappings.items()}, "trl_cannot": TRL_CANNOT,
              "summary": summary, "runs": runs, "metrics": metrics}
    write_json(out / "trl_gkd.json", result)
    (out / "trl_gkd.md").write_text(markdown(result))
    plot(result, out / "trl_gkd.png")
    return result


def plot(result: dict, path: Path) -> None:
    """Loop time of each tool per recipe, distill's split into its profile's phases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.2))
    phases = list(dict.fromkeys(k for row in result["summary"].values() for k in row["distill_profile"]))
    for i, row in enumerate(result["summary"].values()):
        left = 0.0
        for j, phase in enumerate(phases):
            v = row["distill_profile"].get(phase, 0.0)
            ax.barh(2 * i, v, left=left, color=f"C{j}", label=phase if i == 0 else None)
            left += v
        ax.barh(2 * i + 0.8, row["trl"]["loop_seconds"], color="0.6", label="TRL (whole loop)" if i == 0 else None)
    ax.set_yticks([y for i in range(len(result["summary"])) for y in (2 * i, 2 * i + 0.8)],
                  [f"{r}: {t}" for r in result["summary"] for t in ("distill", "TRL")])
    ax.invert_yaxis()
    ax.set_xlabel(f"loop seconds ({result['steps']} steps, mean of seeds {result['seeds']})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    seeds = result["seeds"]
    lines = [f"The shipped student distilled from the shipped teacher by distill and by TRL {result['trl']}'s "
             f"GKDTrainer: the same recipe, data, {result['steps']} optimizer steps of batch "
             f"{result['batch']}, fp32 on the CPU (2 threads), seeds {seeds}; "
             "each run a fresh process; means over seeds, ratios are medians of per-seed ratios. Loop: the training "
             "steps (with generation); process: loading, training and saving; peak RSS: the whole process, libraries "
             "included (TRL's imports more). Accuracy: test split (200), greedy, scored by the same code for both.",
             "",
             "| recipe | tool | loop (s) | generation (s) | on-policy steps | process (s) | peak RSS (MB) "
             "| accuracy |", "|---|---|---|---|---|---|---|---|"]
    for recipe, row in result["summary"].items():
        for tool in (t for t in ("distill", CACHED, "trl") if t in row):
            r = row[tool]
            lines.append(f"| {recipe} | {tool} | {r['loop_seconds']:.1f} | {r['generation_seconds']:.1f} "
                         f"| {r['on_policy_steps']:.0f} | {r['process_seconds']:.1f} | {r['peak_rss_mb']:.0f} "
                         f"| {r['accuracy']:.3f} |")
        lines.append(f"| {recipe} | **distill / trl** | **{row['loop_ratio']:.2f}** | | | {row['process_ratio']:.2f} "
                     f"| {row['memory_ratio']:.2f} | {row['accuracy_difference']:+.3f} |")
        if "cached_loop_ratio" in row:
            lines.append(f"| {recipe} | **distill, cached / trl** | **{row['cached_loop_ratio']:.2f}** | | | "
                         f"{row['cached_process_ratio']:.2f} | {row['cached_memory_ratio']:.2f} "
                         f"| {row['cached_accuracy_difference']:+.3f} |")
    if result.get("cache_build_seconds"):
        lines += ["", f"`distill, cached`: supervised KD reading the teacher from an offline cache of the same "
                  f"examples, built once before the timed runs by `distill cache-teacher` in "
                  f"{result['cache_build_seconds']:.0f} s (process included); every seed's run reads it."]
    for recipe, row in result["summary"].items():
        profile = row["distill_profile"]
        total = sum(profile.values())
        lines += ["", f"Where distill's loop time goes in `{recipe}` (seconds, mean over seeds; wrapped calls):", "",
                  "| phase | seconds | share |", "|---|---|---|"]
        lines += [f"| {k} | {v:.1f} | {v / total:.0%} |" for k, v in sorted(profile.items(), key=lambda kv: -kv[1])]
    for recipe, rows in result["mapping"].items():
        lines += ["", f"Configuration of `{recipe}`, field by field:", "",
                  "| distill | value | TRL GKDConfig | value |", "|---|---|---|---|"]
        lines += [f"| {d} | {dv} | {t} | {tv} |" for d, dv, t, tv in rows]
    lines += ["", "What TRL's GKDTrainer cannot do that distill's recipes can:", ""]
    lines += [f"- {x}" for x in result["trl_cannot"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # one run in a fresh process (_spawn), or the cache (_build_cache)
    if sys.argv[1] == "cache":
        from omegaconf import OmegaConf

        from distill.config import DistillConfig
        from distill.offline.build import cache_teacher

        cache_teacher(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DistillConfig),
                                                          OmegaConf.load(sys.argv[2]))), progress=False)
        sys.exit(0)
    tool, recipe, seed, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
    print(json.dumps(child(tool, recipe, seed, steps, out, sys.argv[6] if len(sys.argv) > 6 else None)))
