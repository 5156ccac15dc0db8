"""Mistakes on the command line are one line of error (exit code 2), and a failed run leaves nothing behind.

The override check runs in-process where it can (cheap); a few checks run the real command.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_cli import RECIPES, _one_line_error, run_cli

from distill import cli, draft_eval
from distill.config import ASSETS, DataConfig, DistillConfig, ModelConfig, TeacherConfig, validate
from distill.data import read_records
from distill.draft_eval import DraftEvalConfig, evaluate_draft
from distill.errors import DistillError
from distill.export import export_draft
from distill.models import load_tokenizer


def _error(argv: list[str]) -> str:
    with pytest.raises(DistillError) as info:
        cli._check_overrides(argv)
    message = str(info.value)
    assert "\n" not in message
    return message


# 1. Config groups and their options.

@pytest.mark.slow
def test_unknown_recipe_is_one_line(tmp_path):
    proc = run_cli("recipe=gkdd", cwd=tmp_path)
    options = sorted(p.stem for p in (RECIPES / "recipe").glob("*.yaml"))
    _one_line_error(proc, "recipe", "'gkdd'", ", ".join(options))
    assert not (tmp_path / "outputs").exists()


def test_unknown_option_of_any_group_names_group_option_and_options():
    for group in ("teacher", "student"):
        message = _error([f"{group}=nope"])
        assert f"'{group}'" in message and "'nope'" in message
        assert ", ".join(sorted(p.stem for p in (RECIPES / group).glob("*.yaml"))) in message
    message = _error(["recipe=sft_studnt"])  # the closest match first, then every option
    assert message.index("'sft_student'") < message.index("pretrain_teacher")
    assert "gkdd" in _error(["-m", "loss.kind=fkl,tvd", "recipe=sft,gkdd"])  # every swept value is checked
    assert "teacher.path" in _error(["teacher=/models/llama"])  # a directory given as a group option


# 2. Keys of the typed schema.

@pytest.mark.slow
def test_mistyped_key_is_one_line(tmp_path):
    proc = run_cli("trainer.stepz=3", cwd=tmp_path)
    _one_line_error(proc, "trainer.stepz", "did you mean trainer.steps")


def test_mistyped_keys_name_the_closest_keys():
    assert "did you mean loss.kind" in _error(["lose.kind=fkl"])
    message = _error(["trainer.steps.x=1"])
    assert "trainer.steps.x is not a key" in message and "did you mean trainer.steps" in message
    assert "student.lora.r" in _error(["student.lora.rr=4"])
    assert "student.arch.hidden_size" in _error(["student=tiny", "student.arch.hiden_size=64"])
    assert "trainer.stepz" in _error(["-m", "trainer.stepz=1,2"])


def test_valid_overrides_pass():
    for argv in (
        [], ["loss.kind=rkl", "trainer.betas=[0.8,0.9]", "trainer.betas.0=0.5", "student.lora.r=4"],
        ["student=tiny", "student.arch.hidden_size=64"], ["recipe=pretrain_teacher", "student.arch.num_layers=2"],
        ["~teacher"], ["hydra.run.dir=somewhere", "hydra/job_logging=disabled"],
        ["-m", "loss.kind=fkl,tvd", "recipe=sft,supervised_kd", "trainer.steps=range(1,3)", "hydra.sweep.dir=x"],
        ["--help"], ["--cfg", "job", "loss.kind=tvd"],
    ):
        cli._check_overrides(argv)


# 3. Any other composition error.

@pytest.mark.slow
def test_wrong_type_is_one_line(tmp_path):
    proc = run_cli("trainer.steps=abc", cwd=tmp_path)
    _one_line_error(proc, "trainer.steps", "abc", "int")


def test_an_added_unknown_key_is_refused_not_ignored():
    assert "trainer.stepz is not a key of the config; did you mean trainer.steps?" in _error(["+trainer.stepz=3"])
    assert "trainer.stepz is not a key" in _error(["++trainer.stepz=3"])


def test_betas_need_two_values(student_dir):
    cfg = DistillConfig(teacher=TeacherConfig(path=str(student_dir)), student=ModelConfig(path=str(student_dir)))
    cfg.trainer.betas = [0.9]
    with pytest.raises(DistillError, match=r"trainer.betas must be two values in \[0, 1\).*got \[0.9\]"):
        validate(cfg)


def test_other_composition_errors_are_one_line():
    message = _error(["trainer.betas=3"])
    assert "trainer.betas" in message and "list" in message
    assert "--multirun" in _error(["loss.kind=fkl,tvd"])  # a sweep without -m
    message = _error(["student.arch.hidden_size=64"])  # the shipped student has no arch
    assert "student.arch" in message and "null" in message


# 4. A file where a directory is expected.

def test_a_file_given_for_a_directory_says_what_it_is(tmp_path, student_dir):
    gguf = tmp_path / "model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF")
    other = tmp_path / "weights.bin"
    other.write_bytes(b"")

    def message(**changes) -> str:
        cfg = DistillConfig(teacher=TeacherConfig(path=str(student_dir)), student=ModelConfig(path=str(student_dir)))
        for key, value in changes.items():
            obj = cfg
            *parents, leaf = key.split("__")
            for p in parents:
                obj = getattr(obj, p)
            setattr(obj, leaf, value)
        with pytest.raises(DistillError) as info:
            validate(cfg)
        return str(info.value)

    m = message(teacher__path=str(gguf))
    assert "teacher.path" in m and "GGUF file" in m and "config.json" in m and "save_pretrained" in m
    assert "no such" not in m
    m = message(student__path=str(other))
    assert "student.path" in m and "is a file" in m and "save_pretrained" in m
    assert "is a file" in message(teacher__tokenizer=str(other))
    assert "is a file" in message(resume=str(other))
    assert "no such model directory" in message(teacher__path=str(tmp_path / "nowhere"))
    # A folder that holds only a .gguf (a llama.cpp download): said so, with the conversion.
    folder = tmp_path / "SmolLM2-GGUF"
    folder.mkdir()
    gguf.rename(folder / gguf.name)
    m = message(student__path=str(folder))
    assert m.startswith("student.path: ") and "holds a GGUF file (model.Q4_K_M.gguf)" in m and "gguf_file=" in m
    assert "gguf_file=" in str(pytest.raises(DistillError, DraftEvalConfig(target=str(folder)).validate).value)


# 5. An unreadable tokenizer.json.

@pytest.fixture
def broken_teacher(teacher_dir, tmp_path) -> Path:
    """The teacher with a tokenizer.json that is JSON but no tokenizer (tokenizers raises a bare Exception)."""
    broken = tmp_path / "broken_teacher"
    shutil.copytree(teacher_dir, broken)
    data = json.loads((broken / "tokenizer.json").read_text())
    data["model"] = {}
    (broken / "tokenizer.json").write_text(json.dumps(data))
    return broken


def test_unreadable_tokenizer_is_a_distill_error(broken_teacher, student_dir, tmp_path):
    with pytest.raises(DistillError, match=rf"teacher: cannot load a tokenizer from {broken_teacher}: data did not"):
        load_tokenizer(broken_teacher, "teacher")
    with pytest.raises(DistillError, match=str(broken_teacher)):
        export_draft(student_dir, broken_teacher, tmp_path / "draft")
    with pytest.raises(DistillError, match=str(broken_teacher)):
        evaluate_draft(DraftEvalConfig(target=str(broken_teacher), draft=str(student_dir), out=str(tmp_path / "e")))
    truncated = tmp_path / "truncated"
    shutil.copytree(broken_teacher, truncated)
    (truncated / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    with pytest.raises(DistillError, match=str(truncated)):
        load_tokenizer(truncated)


# 6 and 7. eval-draft / export-draft: the command named once; gammas=1,2.

@pytest.mark.slow
def test_subcommand_errors_name_the_command_once(tmp_path):
    with pytest.raises(DistillError) as info:
        DraftEvalConfig(draft=str(tmp_path / "nowhere")).validate()
    assert not str(info.value).startswith("eval-draft")
    with pytest.raises(DistillError) as info:
        export_draft(tmp_path / "nowhere", tmp_path, tmp_path / "out")
    assert not str(info.value).startswith("export-draft")
    proc = run_cli("eval-draft", f"draft={tmp_path / 'nowhere'}", "gammas=1,2", cwd=tmp_path)
    _one_line_error(proc, "distill: error: eval-draft: draft directory not found")
    assert "eval-draft: eval-draft" not in proc.stderr


def test_gammas_as_comma_list_list_or_one_value():
    assert cli._typed_options(DraftEvalConfig, ["gammas=1,2"]).gammas == [1, 2]
    assert cli._typed_options(DraftEvalConfig, ["gammas=[1,2]"]).gammas == [1, 2]
    assert cli._typed_options(DraftEvalConfig, ["gammas=4", "num_prompts=3"]).gammas == [4]


# 8. A failed run leaves no empty output directory behind.

@pytest.mark.slow
def test_failed_run_removes_the_directories_it_created(tmp_path, teacher_dir, swapped_student_dir):
    """The run fails after its run directory exists (the tokenizer check)."""
    proc = run_cli(f"teacher.path={teacher_dir}", f"student.path={swapped_student_dir}",
                   f"output_dir={tmp_path}/out/run", "trainer.progress=false", cwd=tmp_path)
    _one_line_error(proc, "tokenizers differ")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "outputs").exists()  # Hydra's outputs/DATE/TIME with only .hydra/ and a log


@pytest.mark.slow
def test_failed_run_keeps_directories_that_existed(tmp_path, broken_teacher, student_dir):
    """Also 5 end to end: an unreadable tokenizer.json is one line naming the directory."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "hydra_dir").mkdir()
    proc = run_cli(f"teacher.path={broken_teacher}", f"student.path={student_dir}", f"output_dir={tmp_path}/mine",
                   f"hydra.run.dir={tmp_path}/hydra_dir", "trainer.progress=false", cwd=tmp_path)
    _one_line_error(proc, f"teacher: cannot load a tokenizer from {broken_teacher}: data did not match")
    assert (tmp_path / "mine").is_dir() and (tmp_path / "hydra_dir").is_dir()


def test_cleanup_keeps_checkpoints_and_foreign_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run, hydra_dir, parent = tmp_path / "p" / "run", tmp_path / "outputs" / "2026-12-01" / "19-00-00", tmp_path / "p"
    (hydra_dir / ".hydra").mkdir(parents=True)
    (hydra_dir / "cli.log").write_text("")
    new = [*cli._new_outputs(hydra_dir), *cli._new_outputs(hydra_dir, run)]
    assert run in new and parent in new and hydra_dir in new
    (run / "checkpoints" / "step-0000002").mkdir(parents=True)
    (hydra_dir / "notes.txt").write_text("mine")  # written during the run: kept
    cli._remove_failed_outputs(new, run, hydra_dir)
    assert (run / "checkpoints" / "step-0000002").is_dir() and (hydra_dir / "notes.txt").exists()
    shutil.rmtree(run / "checkpoints")
    (hydra_dir / "notes.txt").unlink()
    cli._remove_failed_outputs(new, run, hydra_dir)
    assert not parent.exists() and not (tmp_path / "outputs").exists()


def test_cleanup_never_removes_what_existed(tmp_path, monkeypatch):
    """Directories that existed before the run are kept, however recently they or their parents changed
    (an earlier check by modification times removed a fresh, existing run directory and its busy parent)."""
    monkeypatch.chdir(tmp_path)
    busy = tmp_path / "busy"
    run, hydra_dir = busy / "run", busy / "outputs" / "now"
    run.mkdir(parents=True)
    (busy / "other").write_text("")  # touched just now
    (hydra_dir / ".hydra").mkdir(parents=True)
    (hydra_dir / "mine.txt").write_text("")  # hydra.run.dir pointed at a directory of the user's
    new = [*cli._new_outputs(hydra_dir), *cli._new_outputs(hydra_dir, run)]
    assert new == []
    logs = tmp_path / "logs"  # hydra.run.dir set in a config of the user's: only Hydra's default dirs may go
    logs.mkdir()
    (logs / "2024-experiment.log").write_text("")
    assert cli._new_outputs(logs) == []
    (run / "config.yaml").write_text("")  # what the failed run wrote into the existing directory
    cli._remove_failed_outputs(new, run, hydra_dir)
    assert run.is_dir() and (hydra_dir / "mine.txt").exists() and (busy / "other").exists()


# 9. eval-draft prompts without completions.

def test_prompts_without_completions(tmp_path, tokenizer_dir, teacher_dir):
    tok = load_tokenizer(tokenizer_dir)
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    f = tmp_path / "prompts.jsonl"
    f.write_text(json.dumps({"prompt": "Write 5 in words."}) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "Write 6 in words."}]}) + "\n")
    plain, chat = read_records(f, DataConfig(), tok, require_completion=False)
    assert (plain.prompt, plain.completion) == ("Write 5 in words.", "")
    assert (chat.prompt, chat.completion) == ("<s>user: Write 6 in words.</s><s>assistant:", "")
    with pytest.raises(DistillError, match="missing field 'completion'"):
        read_records(f, DataConfig(), tok)
    # eval-draft reads its prompts so.
    f.write_text(json.dumps({"prompt": "Write 5 in words."}) + "\n" + json.dumps({"prompt": "Write 7 in words."}))
    ids = draft_eval._prompts(DraftEvalConfig(prompts=str(f)), tok, room=100)
    assert ids == [tok("Write 5 in words.").input_ids, tok("Write 7 in words.").input_ids]


def test_eval_draft_names_an_unknown_task_or_difficulty(teacher_dir, student_dir):
    cfg = DraftEvalConfig(target=str(teacher_dir), draft=str(student_dir), tasks=["arithmetic", "poetry"])
    with pytest.raises(DistillError, match=r"tasks: \['poetry'\]; built-in tasks are"):
        cfg.validate()
    cfg = DraftEvalConfig(target=str(teacher_dir), draft=str(student_dir), difficulty="brutal")
    with pytest.raises(DistillError, match="difficulty 'brutal': one of easy, medium, hard"):
        cfg.validate()
    assert cli._typed_options(DraftEvalConfig, ["tasks=[spelling]", "difficulty=easy"]).tasks == ["spelling"]


def test_a_run_names_an_unknown_task_or_difficulty():
    cfg = DistillConfig(teacher=TeacherConfig(path=None), student=ModelConfig(path=str(ASSETS / "student")))
    cfg.loss.kind = "ce"
    cfg.data.tasks = ["arithmetic", "poetry"]
    with pytest.raises(DistillError, match=r"^data\.tasks: \['poetry'\]; built-in tasks are"):
        validate(cfg)
    cfg.data.tasks, cfg.data.difficulty = ["arithmetic"], "brutal"
    with pytest.raises(DistillError, match="^data.difficulty 'brutal': one of easy, medium, hard"):
        validate(cfg)
