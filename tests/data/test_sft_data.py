"""SFT examples: loss weights exactly on the assistant turns (text + end-of-turn token), both JSONL
forms, and every bad input reported by file and line."""

import json

import numpy as np
import pytest
import transformers

from tests.data.chat_folders import (
    CHATML,
    FAMILIES,
    GEMMA2,
    SYSTEM,
    TURNS,
    byte_bpe,
    make_family,
    write_folder,
)
from transformer.data.sft import conversation, read_sft_jsonl, sft_example
from transformer.data.sources import DataError, Report
from transformer.data.tokenizer import load_tokenizer

# What each template writes for an assistant turn (after its own trimming), up to its end of turn.
ASSISTANT_TEXT = {
    "llama3": lambda c: c.strip() + "<|eot_id|>",
    "chatml": lambda c: c + "<|im_end|>",
    "mistral": lambda c: " " + c.strip() + "</s>",
    "gemma": lambda c: c.strip() + "<end_of_turn>",
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("sft")


@pytest.fixture(scope="module")
def toks(root):
    return {name: load_tokenizer(make_family(root, name)) for name in FAMILIES}


def weighted_spans(tok, ids, weights):
    """Decoded text of each maximal run of weight 1."""
    spans, run = [], []
    for i, w in zip(ids, weights):
        if w:
            run.append(i)
        elif run:
            spans.append(run)
            run = []
    if run:
        spans.append(run)
    return [tok.decode(s, skip_special_tokens=False) for s in spans]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_weights_cover_exactly_the_assistant_turns(toks, family):
    tok = toks[family]
    messages = TURNS if family == "mistral" else [SYSTEM, *TURNS]  # see test_template_breaking_prefixes
    ids, weights = sft_example(tok, {"messages": messages})
    assert ids == tok.apply_chat_template(messages)
    assert len(weights) == len(ids) and set(weights) == {0, 1}
    expected = [ASSISTANT_TEXT[family](m["content"]) for m in messages if m["role"] == "assistant"]
    assert weighted_spans(tok, ids, weights) == expected
    # Everything else (system, user, headers, generation prompts, newlines between turns) has weight 0.
    unweighted = tok.decode([i for i, w in zip(ids, weights) if not w], skip_special_tokens=False)
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"].strip() in unweighted


def test_weights_equal_transformers_assistant_masks(root):
    """A ChatML template marking assistant text with {% generation %}: transformers' mask = ours."""
    marked = CHATML.replace(
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}",
        "{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}{% generation %}"
        "{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}{%- else %}"
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
        "{%- endif %}")
    assert marked != CHATML
    _, special, added, _ = FAMILIES["chatml"]
    folder = write_folder(root / "chatml_marked", byte_bpe(added), marked, special)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    messages = [SYSTEM, *TURNS]
    out = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    ids, weights = sft_example(load_tokenizer(folder), {"messages": messages})
    assert ids == list(out["input_ids"])
    assert weights == list(out["assistant_masks"])


def test_prompt_completion_records(toks):
    tok = toks["llama3"]
    record = {"prompt": "What is the capital of France?", "completion": "Paris."}
    as_messages = [{"role": "user", "content": record["prompt"]},
                   {"role": "assistant", "content": record["completion"]}]
    assert conversation(record) == as_messages
    assert sft_example(tok, record) == sft_example(tok, {"messages": as_messages})
    with_system = {**record, "system": SYSTEM["content"]}
    assert conversation(with_system) == [SYSTEM, *as_messages]
    ids, weights = sft_example(tok, with_system)
    assert weighted_spans(tok, ids, weights) == ["Paris.<|eot_id|>"]


def test_template_breaking_prefixes(toks):
    """Mistral v0.3 writes the system prompt into the last message if that is the user's (and drops
    it otherwise): the render up to an assistant turn is no prefix of the longer one."""
    tok = toks["mistral"]
    for messages in ([SYSTEM, *TURNS], [SYSTEM, *TURNS[:2]]):
        with pytest.raises(DataError, match=r"line 7: the chat template of .*mistral does not render"
                                            r".*assistant message 2 as a prefix"):
            sft_example(tok, {"messages": messages, "source": "line 7"})


@pytest.mark.parametrize("record, match", [
    ({"messages": [TURNS[0]]}, r"no assistant message"),
    ({"messages": [TURNS[1], TURNS[0], TURNS[1]]}, r"starts with an assistant message"),
    ({"messages": [{"role": "tool", "content": "42"}, TURNS[1]]}, r"message 0 has role 'tool'"),
    ({"messages": [TURNS[0], {"role": "assistant"}]}, r"message 1 \(assistant\) has no 'content'"),
    ({"messages": "hello"}, r"a conversation is a list of messages"),
    ({"text": "hello"}, r"expected a 'messages' list or 'prompt' and 'completion'.*\['text'\]"),
    ({"prompt": "hi"}, r"'completion' must be a string"),
    ({"prompt": 3, "completion": "x"}, r"'prompt' must be a string"),
    ({"prompt": "hi", "completion": "x", "system": 5}, r"message 0 \(system\) has content of type int"),
])
def test_bad_records(toks, record, match):
    with pytest.raises(DataError, match=r"f\.jsonl:3: .*" + match):
        sft_example(toks["chatml"], {**record, "source": "f.jsonl:3"})


def test_template_refusal_and_no_template(root):
    _, special, added, _ = FAMILIES["gemma"]
    gemma2 = load_tokenizer(write_folder(root / "gemma2", byte_bpe(added), GEMMA2, special))
    with pytest.raises(DataError, match=r"f:1: the chat template of .*gemma2 failed.*System role"):
        sft_example(gemma2, {"messages": [SYSTEM, *TURNS[:2]], "source": "f:1"})
    bare = load_tokenizer(write_folder(root / "bare", byte_bpe(added), None, special))
    with pytest.raises(ValueError, match=r"bare has no chat template"):
        sft_example(bare, {"messages": TURNS[:2]})


def write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_read_sft_jsonl(toks, tmp_path):
    tok = toks["chatml"]
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": [SYSTEM, *TURNS]},
        "",
        {"prompt": "Hi", "completion": "Hello!"},
    ])
    examples = list(read_sft_jsonl(str(path), tok, max_length=512))
    assert [e["source"] for e in examples] == [f"{path}:1", f"{path}:3"]
    ids, weights = sft_example(tok, {"messages": [SYSTEM, *TURNS]})
    assert examples[0]["tokens"].dtype == np.int32 and examples[0]["loss_weights"].dtype == np.float32
    np.testing.assert_array_equal(examples[0]["tokens"], ids)
    np.testing.assert_array_equal(examples[0]["loss_weights"], weights)


def test_read_sft_jsonl_bad_lines(toks, tmp_path):
    tok = toks["chatml"]
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "Hi", "completion": "Hello!"},
        '{"prompt": "Hi", ',
        "[1, 2]",
        {"messages": [{"role": "bot", "content": "x"}]},
        {"messages": [TURNS[0]]},
        {"prompt": "Hi again", "completion": "Hello again!"},
    ])
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON"):
        list(read_sft_jsonl(str(path), tok, max_length=512))
    report = Report()
    kept = list(read_sft_jsonl(str(path), tok, max_length=512, on_error="skip", report=report))
    assert [e["source"] for e in kept] == [f"{path}:1", f"{path}:6"]
    assert report.counts == {"bad_jsonl_record": 2, "bad_sft_example": 2}
    assert report.messages["bad_jsonl_record"][1].startswith(f"{path}:3: expected a JSON object")
    assert report.messages["bad_sft_example"][0].startswith(f"{path}:4: message 0 has role 'bot'")
    assert report.messages["bad_sft_example"][1].startswith(f"{path}:5: no assistant message")


def test_read_sft_jsonl_truncation(toks, tmp_path):
    tok = toks["chatml"]
    record = {"messages": [SYSTEM, *TURNS]}
    ids, weights = sft_example(tok, record)
    first_weighted = weights.index(1)
    path = write_jsonl(tmp_path / "long.jsonl", [record])
    report = Report()
    (example,) = read_sft_jsonl(str(path), tok, max_length=first_weighted + 3, report=report)
    np.testing.assert_array_equal(example["tokens"], ids[: first_weighted + 3])
    np.testing.assert_array_equal(example["loss_weights"], weights[: first_weighted + 3])
    assert report.counts == {"truncated": 1}
    assert report.messages["truncated"] == [f"{path}:1: {len(ids)} → {first_weighted + 3} tokens"]
    # No assistant token within max_length: an error, or counted under skip.
    with pytest.raises(DataError, match=rf"{path}:1: no assistant token within max_length=5"):
        list(read_sft_jsonl(str(path), tok, max_length=5))
    report = Report()
    assert list(read_sft_jsonl(str(path), tok, max_length=5, on_error="skip", report=report)) == []
    assert report.counts["bad_sft_example"] == 1
    with pytest.raises(ValueError, match="max_length must be positive"):
        list(read_sft_jsonl(str(path), tok, max_length=0))


def test_read_sft_jsonl_missing_and_empty(toks, tmp_path):
    with pytest.raises(FileNotFoundError):
        list(read_sft_jsonl(str(tmp_path / "nope.jsonl"), toks["chatml"], max_length=64))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        list(read_sft_jsonl(str(tmp_path / "empty.jsonl"), toks["chatml"], max_length=64))
