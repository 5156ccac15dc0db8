"""Fixed datasets: file formats, masking, chat templates and errors that name file and line."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import AddedToken
from transformers import AutoTokenizer

from distill.config import DataConfig
from distill.data import (
    IGNORE_INDEX,
    EpochSampler,
    Record,
    collate,
    encode,
    encode_all,
    length_buckets,
    prompt_ids,
    read_records,
    stop_ids,
)
from distill.errors import DistillError


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_and_masking(tmp_path, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    f = write(tmp_path / "d.jsonl", [json.dumps({"prompt": "Write 12 in words.", "completion": "twelve"}), "",
                                     json.dumps({"prompt": "Write 3 in words.", "completion": "three"})])
    records = read_records(f, DataConfig())
    assert [r.completion for r in records] == ["twelve", "three"]
    pairs = [encode(r, tok, 64) for r in records]
    batch = collate(pairs, tok.pad_token_id)
    for i, (p, c) in enumerate(pairs):
        assert c[-1] == tok.eos_token_id
        row = batch.labels[i]
        assert torch.all(row[: len(p)] == IGNORE_INDEX)  # prompt masked
        assert row[len(p): len(p) + len(c)].tolist() == c  # response counted
        assert torch.all(row[len(p) + len(c):] == IGNORE_INDEX)  # padding masked
        assert batch.attention_mask[i].sum() == len(p) + len(c)
    assert tok.decode(pairs[0][1], skip_special_tokens=True) == "twelve"


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "a", "completion": ', "malformed JSON"),
    ('{"prompt": "a"}', "missing field 'completion'"),
    ('{"prompt": "a", "completion": 3}', "must be a string"),
    ('[1, 2]', "expected a JSON object"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "last message must be the assistant"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"prompt": "p", "completion": "c"})
    f = write(tmp_path / "bad.jsonl", [good, good, line])
    with pytest.raises(DistillError, match=rf"bad\.jsonl:3: .*{message}"):
        read_records(f, DataConfig())


@pytest.mark.parametrize("line,column", [
    ('{"prompt": "a", "completion": "b"', 34),  # cut short: just past its last character
    ('{"prompt": "a", completion: "b"}', 17),
    ('  {"prompt": "a",}', 18),
])
def test_malformed_json_names_the_column_of_the_line(tmp_path, line, column):
    f = write(tmp_path / "bad.jsonl", [json.dumps({"prompt": "p", "completion": "c"}), line, ""])
    with pytest.raises(DistillError, match=rf"bad\.jsonl:2: malformed JSON \(.* at column {column}\)$"):
        read_records(f, DataConfig())


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DistillError, match="no such data file"):
        read_records(tmp_path / "nope.jsonl", DataConfig())
    f = write(tmp_path / "d.xml", ["<a/>"])
    with pytest.raises(DistillError, match="unsupported data format"):
        read_records(f, DataConfig())


def test_csv_through_datasets_and_custom_fields(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("question,answer\nWrite 1 in words.,one\nWrite 2 in words.,two\n")
    records = read_records(f, DataConfig(prompt_field="question", completion_field="answer"))
    assert [(r.prompt, r.completion) for r in records] == [("Write 1 in words.", "one"), ("Write 2 in words.", "two")]


def test_chat_messages_use_the_template(tmp_path, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    msgs = [{"role": "user", "content": "Write 5 in words."}, {"role": "assistant", "content": "five"}]
    f = write(tmp_path / "chat.jsonl", [json.dumps({"messages": msgs})])
    (r,) = read_records(f, DataConfig(), tok)
    assert r.prompt == "<s>user: Write 5 in words.</s><s>assistant:"
    assert r.completion == " five</s>"
    assert r.answer == "five"  # generations are scored against the assistant's text
    p, c = encode(r, tok, 64)
    assert p == prompt_ids(r, tok)  # what generation (evaluation, eval-draft) is prompted with
    assert p[0] == tok.bos_token_id and p.count(tok.bos_token_id) == 2  # no BOS added twice
    assert c[-1] == tok.eos_token_id and c.count(tok.eos_token_id) == 1  # the template's EOS, not a second
    assert p + c == tok(r.prompt + r.completion, add_special_tokens=False).input_ids
    # Without a template the error names the line.
    plain = AutoTokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(DistillError, match=r"chat\.jsonl:1: .*chat template"):
        read_records(f, DataConfig(), plain)


def test_overlong_prompts_skip_truncate_or_error(tokenizer_dir):
    """A prompt that leaves no room for its completion: named in an error, skipped, or cut from the
    left so that the completion keeps up to half of max_length; each counted."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    long, short = Record("Write 1 in words. " * 20, "one", "f.jsonl:1"), Record("Write 2 in words.", "two", "f.jsonl:2")
    with pytest.raises(DistillError, match=r"f.jsonl:1: prompt is \d+ tokens, at least data.max_length=16 "
                                           r"\(data.overlong=skip or truncate"):
        encode(long, tok, 16)
    assert encode(long, tok, 16, "skip") is None
    p, c = encode(long, tok, 16, "truncate")
    full = prompt_ids(long, tok)
    whole = tok("one", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert c == whole and p == full[len(full) - (16 - len(whole)):]  # the prompt's end is kept, to fill 16
    long_reply = Record(long.prompt, "two hundred and " * 10, "f.jsonl:3")
    p, c = encode(long_reply, tok, 16, "truncate")
    assert len(c) == 8 and len(p) == 8  # the completion keeps half of max_length
    kept, pairs, counts = encode_all([long, short, long], tok, 16, "skip")
    assert kept == [short] and len(pairs) == 1 and counts == {"records": 3, "skipped": 2, "truncated": 0, "cut": 0}
    kept, pairs, counts = encode_all([long, short], tok, 16, "truncate")
    assert len(pairs) == 2 and counts["truncated"] == 1
    _, pairs, counts = encode_all([Record("Write 2 in words.", "two hundred and " * 10, "f:3")], tok, 16, "skip")
    assert counts["cut"] == 1 and len(pairs[0][0]) + len(pairs[0][1]) == 16


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_chatml_reply_ends_at_its_end_token(tmp_path, tokenizer_dir):
    """ChatML renders each turn as "<|im_start|>role\\n...<|im_end|>\\n" and its models stop at
    <|im_end|>: the completion is the reply through that token, without the newline after it and
    without a second end token (which the student would learn to emit)."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|im_end|>"})
    tok.add_tokens([AddedToken("\n", normalized=False)])  # a newline token, as byte-level BPEs have
    tok.chat_template = CHATML
    msgs = [{"role": "user", "content": "Write 5 in words."}, {"role": "assistant", "content": "five"}]
    f = write(tmp_path / "chat.jsonl", [json.dumps({"messages": msgs})])
    (r,) = read_records(f, DataConfig(), tok)
    assert r.completion == "five<|im_end|>\n"  # the template's rendering, newline included
    p, c = encode(r, tok, 64)
    assert c[-1] == tok.eos_token_id and c.count(tok.eos_token_id) == 1
    assert tok.decode(c) == "five<|im_end|>"
    assert p[-len(tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids):] == \
        tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    assert stop_ids(tok) == [tok.eos_token_id]


def test_chatml_with_another_eos_ends_at_the_turn_end(tmp_path, tokenizer_dir):
    """EOS "</s>" beside ChatML: the reply ends at <|im_end|> (no "\n</s>" after it, which the student
    would learn to say), and generation stops at either."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens([AddedToken("\n", normalized=False)])
    tok.chat_template = CHATML
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id != im_end
    msgs = [{"role": "user", "content": "Write 5 in words."}, {"role": "assistant", "content": "five"}]
    (r,) = read_records(write(tmp_path / "chat.jsonl", [json.dumps({"messages": msgs})]), DataConfig(), tok)
    _, c = encode(r, tok, 64)
    assert tok.decode(c) == "five<|im_end|>" and tok.eos_token_id not in c
    assert stop_ids(tok) == [tok.eos_token_id, im_end]
    # A special token inside the reply's text does not end it; the template's end token does.
    msgs[1]["content"] = "five <|im_start|> six"
    (r,) = read_records(write(tmp_path / "chat2.jsonl", [json.dumps({"messages": msgs})]), DataConfig(), tok)
    assert tok.decode(encode(r, tok, 64)[1]).replace(" ", "") == "five<|im_start|>six<|im_end|>"
    # A template that ignores add_generation_prompt: the whole turn, through its end token.
    tok.chat_template = CHATML.split("{% if add_generation_prompt %}")[0]
    (r,) = read_records(write(tmp_path / "chat3.jsonl", [json.dumps({"messages": msgs[:1] + [
        {"role": "assistant", "content": "five"}]})]), DataConfig(), tok)
    assert tok.decode(encode(r, tok, 64)[1]).replace("\n", " ").split() == ["<|im_start|>assistant", "five<|im_end|>"]
    assert stop_ids(tok) == [tok.eos_token_id, im_end]


def test_sampler_resumes_exactly():
    a = EpochSampler(7, seed=5)
    full = a.take(20)
    assert sorted(full[:7]) == list(range(7))  # each epoch is a permutation
    b = EpochSampler(7, seed=5)
    first = b.take(9)
    c = EpochSampler(7, seed=5)
    c.load_state_dict(b.state_dict())
    assert first + c.take(11) == full
    with pytest.raises(DistillError, match="training data changed"):
        EpochSampler(8, seed=5).load_state_dict(b.state_dict())


def test_sampler_draws_each_epoch_once(monkeypatch):
    """One permutation per epoch, not one per call: 50 batches of 2 over 10 items are 10 epochs."""
    calls = []
    real = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: calls.append(1) or real(*a, **k))
    s = EpochSampler(10, seed=1)
    for _ in range(50):
        s.take(2)
    assert len(calls) == 10


def test_bom_and_null_messages(tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes("\ufeff".encode() + b'{"prompt": "p", "completion": "c", "messages": null}\n')
    (r,) = read_records(f, DataConfig())
    assert (r.prompt, r.completion) == ("p", "c")


def test_length_buckets_split_only_where_padding_falls():
    """Every sequence in exactly one bucket, buckets of consecutive lengths; two length modes make
    two buckets, similar lengths one, and max_buckets caps the count."""
    lengths = [10, 60, 12, 58, 11, 61, 9, 59]
    groups = length_buckets(lengths, 4)
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert [sorted(lengths[i] for i in g) for g in groups] == [[9, 10, 11, 12], [58, 59, 60, 61]]
    assert length_buckets([30, 31, 32, 33], 4) == [[0, 1, 2, 3]]  # a split would cut under 10% of the positions
    assert length_buckets(lengths, 1) == [[6, 0, 4, 2, 3, 7, 1, 5]]
    # Positions computed: 3 groups of 9-12 / 40 / 75-80 make 236, 4 would make 231 (under 10% fewer).
    three = [9, 80, 12, 75, 40, 11]
    assert [[three[i] for i in g] for g in length_buckets(three, 4)] == [[9, 11, 12], [40], [75, 80]]


def test_peeking_ahead_gives_what_the_next_takes_give_and_moves_nothing():
    """The loop asks a served teacher for the next step's batch ahead of time (distill.loop.prefetch)."""
    sampler = EpochSampler(7, seed=5)
    sampler.take(5)
    ahead = sampler.peek(6)  # across the epoch boundary
    assert sampler.position == 5 and sampler.take(2) + sampler.take(4) == ahead
