"""The ``distill`` command: recipes compose, bad input is one line of error, runs and sweeps work."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from distill.config import DistillConfig, register

register()

SMALL = [
    "trainer.steps=2", "trainer.batch_size=4", "trainer.eval_every=2", "trainer.save_every=2", "trainer.log_every=1",
    "trainer.max_new_tokens=4", "trainer.progress=false", "data.num_train=8", "data.num_validation=2",
    "data.num_test=2",
]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


RECIPES = Path(__file__).parents[1] / "recipes"


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (RECIPES / "recipe").glob("*.yaml")))
def test_recipes_compose_to_typed_configs(recipe):
    with initialize_config_module(config_module="distill.recipes", version_base=None):
        raw = compose("config", overrides=[f"recipe={recipe}", "loss.beta=0.25"])
    cfg = OmegaConf.to_object(raw)
    assert isinstance(cfg, DistillConfig) and cfg.loss.beta == 0.25
    if recipe == "pretrain_teacher":
        assert cfg.student.arch.hidden_size == 256 and cfg.teacher.path is None and cfg.data.stream
    if recipe == "pretrain_teacher_stage2":  # from the first stage's model, not a fresh architecture
        assert cfg.student.arch is None and cfg.student.path == "runs/teacher/model"
        assert cfg.data.tasks == ["arithmetic", "spelling", "sum_pairs"] and cfg.trainer.batch_size == 64
    if recipe == "sft_student":
        assert cfg.student.arch.hidden_size == 128 and cfg.loss.kind == "ce"


def _schema_default(path: list[str]) -> object:
    """The dataclass default at a dotted path of DistillConfig (a None sub-config counts as its
    type's defaults, as OmegaConf fills it in when a YAML sets a field of it)."""
    obj: object = DistillConfig()
    for key in path:
        if isinstance(obj, dict):  # sources.weights: a schedule per source
            obj = obj[key]
            continue
        if obj is None or not dataclasses.is_dataclass(obj):
            raise KeyError(".".join(path))
        cls = type(obj)
        obj = getattr(obj, key)
        if obj is None and key != path[-1]:
            hint = typing.get_type_hints(cls)[key]
            obj = next(t for t in typing.get_args(hint) if dataclasses.is_dataclass(t))()
    return obj


def _leaves(node: object, prefix: list[str]):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, [*prefix, str(k)])
    else:
        yield prefix, node


def test_no_yaml_restates_a_default():
    """The dataclasses hold the defaults (one source for the Python API and the CLI): every value
    a YAML file sets differs from the schema's default at that place."""
    checked = 0
    for path in sorted(RECIPES.rglob("*.yaml")):
        text = path.read_text()
        group = path.parent.name
        package = [] if group in ("recipes", "recipe") or "@package _global_" in text else [group]
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
        for key in ("defaults", "hydra"):
            raw.pop(key, None)
        for keys, value in _leaves(raw, package):
            default = _schema_default(keys)
            assert value != default, f"{path.relative_to(RECIPES)}: {'.'.join(keys)}: {value!r} is the default"
            checked += 1
    assert checked > 10


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("distill: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.slow
def test_beta_out_of_range(tmp_path, teacher_dir, student_dir):
    proc = run_cli(f"teacher.path={teacher_dir}", f"student.path={student_dir}", "loss.kind=gjsd", "loss.beta=1.5",
                   f"output_dir={tmp_path}/r", cwd=tmp_path)
    _one_line_error(proc, "loss.beta", "1.5")


@pytest.mark.slow
def test_missing_path(tmp_path, student_dir):
    proc = run_cli(f"teacher.path={tmp_path}/nowhere", f"student.path={student_dir}", cwd=tmp_path)
    _one_line_error(proc, "teacher.path", "nowhere")


@pytest.mark.slow
def test_unequal_tokenizers(tmp_path, teacher_dir, swapped_student_dir):
    other = swapped_student_dir
    proc = run_cli(f"teacher.path={teacher_dir}", f"student.path={other}", f"output_dir={tmp_path}/r", *SMALL,
                   cwd=tmp_path)
    _one_line_error(proc, "tokenizers differ", str(teacher_dir), str(other))


@pytest.mark.slow
def test_malformed_jsonl(tmp_path, teacher_dir, student_dir):
    f = tmp_path / "train.jsonl"
    f.write_text('{"prompt": "Write 1 in words.", "completion": "one"}\n{"prompt": "x", "completion"\n')
    proc = run_cli(f"teacher.path={teacher_dir}", f"student.path={student_dir}", f"data.train={f}",
                   f"output_dir={tmp_path}/r", *SMALL, cwd=tmp_path)
    _one_line_error(proc, f"{f}:2", "malformed JSON")


@pytest.mark.slow
def test_kd_run_with_files_and_overrides(tmp_path, teacher_dir, student_dir):
    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"Write {i} in words.", "completion": w}) + "\n"
                         for i, w in enumerate(["zero", "one", "two", "three", "four", "five"])))
    proc = run_cli(f"teacher.path={teacher_dir}", f"student.path={student_dir}", f"data.train={f}",
                   f"data.validation={f}", "loss.kind=rkl", f"output_dir={tmp_path}/run", *SMALL, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # Not a terminal: no line is wrapped (rich would wrap at 80 columns, mid-phrase).
    plan_line = next(line for line in proc.stderr.splitlines() if line.startswith("plan: "))
    assert len(plan_line) > 80 and plan_line.endswith("(distill plan shows the parts)")
    run = tmp_path / "run"
    # With output_dir Hydra writes nothing of its own: no outputs/DATE/TIME/.hydra/, no cli.log.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "train.jsonl"]
    assert not list(run.glob("*.log")) and not (run / ".hydra").exists()
    val = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "validation"]
    # Free text is scored by chrF (data.metric=auto); validated before training (step 0) and after.
    assert [r["step"] for r in val] == [0, 2]
    assert {"ce", "divergence", "chrf", "teacher_ce"} <= set(val[0]) and "divergence" in val[-1]
    assert "data/chrf" not in val[0]  # one group: its score once, not as two equal columns
    report = json.loads((run / "report.json").read_text())
    assert report["objective"] == "rkl" and set(report["validation"]) == {"teacher", "student before", "student after"}
    assert report["test"] == {}  # no data.test: the validation split is the report's
    assert OmegaConf.load(run / "config.yaml").loss.kind == "rkl"
    AutoModelForCausalLM.from_pretrained(run / "model")


@pytest.mark.slow
def test_multirun_sweep(tmp_path, teacher_dir, student_dir):
    proc = run_cli("-m", "loss.kind=fkl,tvd", f"teacher.path={teacher_dir}", f"student.path={student_dir}",
                   f"hydra.sweep.dir={tmp_path}/sweep", *SMALL, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for i, kind in enumerate(["fkl", "tvd"]):
        run = tmp_path / "sweep" / str(i)
        assert OmegaConf.load(run / "config.yaml").loss.kind == kind
        report = json.loads((run / "report.json").read_text())
        assert {"teacher", "student before", "student after"} == set(report["test"])
    assert "test split" in proc.stdout


@pytest.mark.slow
def test_embedded_default_runs_on_shipped_assets(tmp_path):
    """`distill` with no recipe arguments: shipped teacher and student, built-in tasks."""
    proc = run_cli(f"output_dir={tmp_path}/run", *SMALL, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert set(report["test"]) == {"teacher", "student before", "student after"}


@pytest.mark.slow
def test_resume_refuses_overrides_it_would_ignore_and_extends_a_finished_run(tmp_path, teacher_dir, student_dir):
    """resume=RUN takes only device, progress and more steps; a finished run is extended by
    trainer.steps=N, and without it resuming says that the run is finished."""
    run = tmp_path / "run"
    proc = run_cli(f"teacher.path={teacher_dir}", f"student.path={student_dir}", f"output_dir={run}", *SMALL,
                   "final_eval=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli(f"resume={run}", "loss.kind=rkl", "trainer.progress=false", cwd=tmp_path)
    _one_line_error(proc, "resume continues the run's saved config", "drop loss.kind=rkl (only")
    _one_line_error(run_cli(f"resume={run}", cwd=tmp_path), "finished at step 2 (trainer.steps=2)")
    proc = run_cli(f"resume={run}", "trainer.steps=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]


@pytest.mark.slow
def test_export_and_eval_draft_commands(tmp_path, teacher_dir, student_dir):
    """export-draft writes a padded draft and prints how to serve it; eval-draft writes its JSON,
    Markdown and plot; a missing directory is one error line."""
    proc = run_cli("export-draft", f"student={student_dir}", f"target={teacher_dir}", f"out={tmp_path / 'draft'}",
                   "num_assistant_tokens=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # The serving snippets name the draft by its absolute path, on one line each (no wrapping).
    draft = (tmp_path / "draft").resolve()
    assert f'"model": "{draft}", "num_speculative_tokens": 3}})' in proc.stdout
    assert f'AutoModelForCausalLM.from_pretrained("{draft}")' in proc.stdout
    proc = run_cli("eval-draft", f"draft={tmp_path / 'draft'}", f"target={teacher_dir}", "num_prompts=6",
                   "max_new_tokens=8", "gammas=[1,3]", "batch_size=3", "repeats=1", f"out={tmp_path / 'eval'}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "eval" / "draft_eval.json").read_text())
    assert [r["gamma"] for r in result["by_gamma"]] == [1, 3]
    assert 0.0 <= result["alpha"] <= 1.0 and result["c"] > 0
    for r in result["by_gamma"]:
        assert 1.0 <= r["tau_measured"] <= r["gamma"] + 1
    assert (tmp_path / "eval" / "draft_eval.png").stat().st_size > 0
    _one_line_error(run_cli("export-draft", f"student={tmp_path / 'nope'}", f"target={teacher_dir}",
                            f"out={tmp_path / 'x'}", cwd=tmp_path), "not found")
