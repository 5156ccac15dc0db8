"""One chat template for teacher and student.

Chat data is rendered once, with the student's tokenizer, and the teacher scores the same token
ids. A teacher trained on another template then sees text it was never trained on, and its
distributions, the targets of the loss, are biased without any error. So before any compute one
conversation is rendered with each model's template; unless their token ids agree, the run stops,
naming the first position where they differ and both renderings. ``data.chat_template`` settles
it: ``teacher`` or ``student`` (that model's template for both) or a Jinja file.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase as Tokenizer

from distill.errors import DistillError

# Two turns: the rendering of a reply, of what separates turns, and of a second user turn.
PROBE = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And 5 + 4?"},
    {"role": "assistant", "content": "5 + 4 = 9."},
]
CHOICES = ("teacher", "student")


def _renderings(tok: Tokenizer, role: str, path: str) -> list[tuple[str, str, list[int]]]:
    """What the template makes of the probe: (what, text, token ids), for the whole conversation and
    for the prompt of its first reply."""
    out = []
    for what, messages, prompt in (("the conversation", PROBE, False), ("a prompt", PROBE[:1], True)):
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        except Exception as e:  # noqa: BLE001 - a template raises whatever its Jinja code raises
            raise DistillError(f"the {role}'s chat template ({path}) cannot render a two-turn user/assistant "
                               f"conversation: {e}") from None
        out.append((what, text, tok(text, add_special_tokens=False).input_ids))
    return out


def _chosen(choice: str, teacher: Tokenizer | None, student: Tokenizer) -> str:
    """The template ``data.chat_template`` names."""
    if choice in CHOICES:
        tok = student if choice == "student" else teacher
        if tok is None:
            raise DistillError("data.chat_template=teacher: this run has no teacher")
        if not tok.chat_template:
            raise DistillError(f"data.chat_template={choice}: the {choice}'s tokenizer has no chat template")
        return tok.chat_template
    path = Path(choice)
    if not path.is_file():
        raise DistillError(f"data.chat_template: no such file: {choice} (teacher, student or a Jinja template file)")
    return path.read_text(encoding="utf-8")


def use_one_chat_template(teacher: Tokenizer | None, student: Tokenizer, teacher_path: str, student_path: str,
                          choice: str | None = None) -> None:
    """Make sure teacher and student render chat alike, before any compute.

    With ``choice`` (``data.chat_template``) both tokenizers get that template (the student's is
    saved with the distilled model). Without it, a teacher whose template renders the probe
    conversation to other token ids than the student's (or that has none where the student has
    one, or the reverse) is a DistillError naming the first differing position and both renderings.
    """
    if choice is not None:
        template = _chosen(choice, teacher, student)
        for tok in (teacher, student):
            if tok is not None:
                tok.chat_template = template
        return
    if teacher is None or (not teacher.chat_template and not student.chat_template):
        return
    fix = "data.chat_template=teacher, student or a Jinja file makes both use one"
    for role, tok, path in (("teacher", teacher, teacher_path), ("student", student, student_path)):
        if not tok.chat_template:
            other = "student" if role == "teacher" else "teacher"
            raise DistillError(f"chat templates differ: the {other}'s tokenizer has one and the {role}'s ({path}) "
                               f"has none, so chat data would be rendered for the {other} only; {fix}")
    for (what, t_text, t_ids), (_, s_text, s_ids) in zip(_renderings(teacher, "teacher", teacher_path),
                                                         _renderings(student, "student", student_path), strict=True):
        if t_ids == s_ids:
            continue
        at = first_difference(t_ids, s_ids)
        raise DistillError(
            f"chat templates differ: {what} renders to token ids that first differ at position {at} "
            f"(teacher {_token_at(teacher, t_ids, at)}, student {_token_at(teacher, s_ids, at)}); the teacher "
            f"({teacher_path}) renders {t_text!r}, the student ({student_path}) {s_text!r}. The teacher would score "
            f"text in the student's format; {fix}")


def first_difference(a: list[int], b: list[int]) -> int:
    """The first position where ``a`` and ``b`` differ (the shorter one's length if one extends the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _token_at(tok: Tokenizer, ids: list[int], at: int) -> str:
    return repr(tok.decode(ids[at: at + 1])) if at < len(ids) else "the end"
