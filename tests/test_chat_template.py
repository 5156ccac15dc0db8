"""One chat template for teacher and student: a mismatch is refused before any compute, naming the
first differing token position and both renderings; data.chat_template chooses the one both use."""

from __future__ import annotations

import json
import shutil

import pytest
from test_cli import SMALL, _one_line_error, run_cli

from distill.chat_template import PROBE, first_difference, use_one_chat_template
from distill.errors import DistillError
from distill.models import load_tokenizer

TAGS = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}")
# The same, but the assistant's turns are tagged "model": a template family of its own.
MODEL_TAGS = TAGS.replace("{{ m['role'] }}", "{{ 'model' if m['role'] == 'assistant' else m['role'] }}")


def with_template(src, dst, template):
    shutil.copytree(src, dst)
    tok = load_tokenizer(dst)
    tok.chat_template = template
    tok.save_pretrained(dst)
    return dst


def test_a_template_mismatch_is_refused_at_the_first_differing_token(tokenizer_dir):
    teacher, student = load_tokenizer(tokenizer_dir), load_tokenizer(tokenizer_dir)
    teacher.chat_template, student.chat_template = TAGS, MODEL_TAGS
    t_text = teacher.apply_chat_template(PROBE, tokenize=False)
    s_text = student.apply_chat_template(PROBE, tokenize=False)
    t_ids, s_ids = (tok(x, add_special_tokens=False).input_ids for tok, x in ((teacher, t_text), (student, s_text)))
    at = first_difference(t_ids, s_ids)
    assert 0 < at < len(t_ids) and t_ids[:at] == s_ids[:at] and t_ids[at] != s_ids[at]
    with pytest.raises(DistillError) as info:
        use_one_chat_template(teacher, student, "T", "S")
    message = str(info.value)
    assert f"the conversation renders to token ids that first differ at position {at} " in message
    assert repr(t_text) in message and repr(s_text) in message and "data.chat_template=" in message
    # Equal templates, or none on either side: nothing to say.
    student.chat_template = TAGS
    use_one_chat_template(teacher, student, "T", "S")
    teacher.chat_template = student.chat_template = None
    use_one_chat_template(teacher, student, "T", "S")
    teacher.chat_template = TAGS  # only one has a template
    with pytest.raises(DistillError, match=r"the teacher's tokenizer has one and the student's \(S\) has none"):
        use_one_chat_template(teacher, student, "T", "S")


def test_a_template_that_differs_only_in_its_generation_prompt(tokenizer_dir):
    teacher, student = load_tokenizer(tokenizer_dir), load_tokenizer(tokenizer_dir)
    teacher.chat_template = TAGS
    student.chat_template = TAGS.replace("<s>assistant:", "<s>assistant: ")
    with pytest.raises(DistillError, match="a prompt renders to token ids that first differ at position"):
        use_one_chat_template(teacher, student, "T", "S")


def test_data_chat_template_chooses_the_one_both_use(tokenizer_dir, tmp_path):
    for choice, expected in (("teacher", TAGS), ("student", MODEL_TAGS)):
        teacher, student = load_tokenizer(tokenizer_dir), load_tokenizer(tokenizer_dir)
        teacher.chat_template, student.chat_template = TAGS, MODEL_TAGS
        use_one_chat_template(teacher, student, "T", "S", choice)
        assert teacher.chat_template == student.chat_template == expected
    jinja = tmp_path / "chat.jinja"
    jinja.write_text(TAGS)
    use_one_chat_template(teacher, student, "T", "S", str(jinja))
    assert teacher.chat_template == student.chat_template == TAGS
    teacher.chat_template = None
    with pytest.raises(DistillError, match="data.chat_template=teacher: the teacher's tokenizer has no chat template"):
        use_one_chat_template(teacher, student, "T", "S", "teacher")


@pytest.mark.slow
def test_the_cli_refuses_a_mismatch_and_runs_with_a_choice(tmp_path, teacher_dir, student_dir):
    """Before anything is trained: one line naming the position; with data.chat_template=teacher the
    run goes on and the distilled model carries the teacher's template."""
    teacher = with_template(teacher_dir, tmp_path / "teacher", TAGS)
    student = with_template(student_dir, tmp_path / "student", MODEL_TAGS)
    f = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "Write 5 in words."}, {"role": "assistant", "content": "five"}]
    f.write_text(json.dumps({"messages": msgs}) + "\n")
    common = [f"teacher.path={teacher}", f"student.path={student}", f"data.train={f}", *SMALL]
    proc = run_cli(*common, f"output_dir={tmp_path / 'refused'}", cwd=tmp_path)
    _one_line_error(proc, "chat templates differ", "first differ at position", "data.chat_template=")
    assert not (tmp_path / "refused").exists()
    proc = run_cli(*common, "data.chat_template=teacher", f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_tokenizer(tmp_path / "run" / "model").chat_template == TAGS
