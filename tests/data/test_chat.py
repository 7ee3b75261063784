"""Chat templates: rendered text and ids equal transformers' on four families; stop ids; errors;
`generate --chat` on a tiny random Llama."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from tests.data.chat_folders import (
    FAMILIES,
    GEMMA2,
    LLAMA3,
    SENTENCES,
    SYSTEM,
    TURNS,
    byte_bpe,
    make_family,
    write_folder,
)
from transformer.data import chat
from transformer.data.tokenizer import load_tokenizer

CONVERSATIONS = {
    "system_multi_turn": [SYSTEM, *TURNS],
    "system_prompt": [SYSTEM, *TURNS[:3]],
    "no_system": TURNS[:2],
    "one_user": TURNS[:1],
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {name: make_family(root, name) for name in FAMILIES}


@pytest.fixture(scope="module")
def ours(folders):
    return {name: load_tokenizer(folder) for name, folder in folders.items()}


@pytest.fixture(scope="module")
def theirs(folders):
    return {name: transformers.AutoTokenizer.from_pretrained(str(f)) for name, f in folders.items()}


def hf_ids(tok, messages, add_generation_prompt):
    out = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if not isinstance(out, list) else out)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_equals_transformers(ours, theirs, family, add_generation_prompt, conversation):
    messages = CONVERSATIONS[conversation]
    text = ours[family].apply_chat_template(messages, add_generation_prompt, tokenize=False)
    assert text == theirs[family].apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids = ours[family].apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ids == hf_ids(theirs[family], messages, add_generation_prompt)
    # Each special token in the text is one id, not its characters.
    added = FAMILIES[family][2]
    added_ids = {ours[family].token_to_id(s) for s in added}
    assert sum(text.count(s) for s in added) == sum(i in added_ids for i in ids) > 0


def test_stop_ids(ours):
    for family, (_, special, _, end) in FAMILIES.items():
        tok = ours[family]
        expected = {tok.token_to_id(special["eos_token"]), tok.token_to_id(end)}
        assert set(tok.chat_template.stop_ids) == expected, family
    gemma = ours["gemma"]  # eos <eos>, and the <end_of_turn> its template writes
    assert gemma.chat_template.stop_ids == (gemma.token_to_id("<eos>"),
                                            gemma.token_to_id("<end_of_turn>"))


def test_generation_config_eos_ids_join_the_stop_ids(tmp_path):
    folder = write_folder(tmp_path, byte_bpe(FAMILIES["llama3"][2]), LLAMA3,
                          FAMILIES["llama3"][1])
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4]}))
    tok = load_tokenizer(folder)
    assert tok.chat_template.stop_ids == (tok.token_to_id("<|eot_id|>"), 1)


def test_jinja_file_and_named_templates(tmp_path):
    tok = byte_bpe(FAMILIES["chatml"][2])
    special = FAMILIES["chatml"][1]
    named = [{"name": "default", "template": FAMILIES["chatml"][0]},
             {"name": "plain", "template": "{% for m in messages %}{{ m.content }}{% endfor %}"}]
    listed = write_folder(tmp_path / "listed", tok, named, special)
    msgs = TURNS[:2]
    assert load_tokenizer(listed).apply_chat_template(msgs, tokenize=False).startswith("<|im_start|>")
    plain = chat.load_chat_template(listed, name="plain")
    assert plain.render(msgs) == msgs[0]["content"] + msgs[1]["content"]
    with pytest.raises(ValueError, match=r"no chat template named 'other'.*\['default', 'plain'\]"):
        chat.load_chat_template(listed, name="other")

    # chat_template.jinja wins over tokenizer_config.json, as in transformers.
    jinja = write_folder(tmp_path / "jinja", tok, "{{ 'from the config' }}", special)
    (jinja / "chat_template.jinja").write_text(FAMILIES["chatml"][0], encoding="utf-8")
    hf = transformers.AutoTokenizer.from_pretrained(str(jinja))
    assert (load_tokenizer(jinja).apply_chat_template(msgs, tokenize=False)
            == hf.apply_chat_template(msgs, tokenize=False))


def test_strftime_tojson_and_raise_exception_globals(tmp_path):
    template = ("{{ strftime_now('%Y') }}|{{ messages | tojson }}|{% if messages | length > 1 %}"
                "{{ raise_exception('only one message, please') }}{% endif %}")
    folder = write_folder(tmp_path, byte_bpe(["<s>"]), template, {"bos_token": "<s>"})
    tok, hf = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    one = [{"role": "user", "content": "<b>é</b>"}]
    assert tok.apply_chat_template(one, tokenize=False) == hf.apply_chat_template(one, tokenize=False)
    with pytest.raises(ValueError, match=rf"{folder}.*only one message, please"):
        tok.apply_chat_template(TURNS[:2])


def test_pickles_with_its_template(ours):
    tok = pickle.loads(pickle.dumps(ours["llama3"]))
    assert tok.apply_chat_template(TURNS[:1]) == ours["llama3"].apply_chat_template(TURNS[:1])


@pytest.mark.parametrize("messages, match", [
    ([{"role": "tool", "content": "42"}], r"message 0 has role 'tool'.*system, user, assistant"),
    ([{"role": "bot", "content": "hi"}], r"message 0 has role 'bot'"),
    ([{"content": "hi"}], r"message 0 has role None"),
    ([TURNS[0], {"role": "assistant"}], r"message 1 \(assistant\) has no 'content'"),
    ([{"role": "user", "content": None}], r"message 0 \(user\) has no 'content'"),
    ([{"role": "user", "content": ["a"]}], r"content of type list.*string"),
    ([], r"conversation is empty"),
    ("hello", r"a conversation is a list of messages"),
    (["hello"], r"message 0 is a str"),
])
def test_bad_messages(ours, folders, messages, match):
    with pytest.raises(ValueError, match=match) as error:
        ours["chatml"].apply_chat_template(messages)
    assert str(folders["chatml"]) in str(error.value)


def test_template_that_refuses_the_messages(ours, folders, tmp_path):
    with pytest.raises(ValueError, match=rf"{folders['mistral']} failed to render.*must alternate"):
        ours["mistral"].apply_chat_template([TURNS[0], TURNS[0]])
    gemma2 = write_folder(tmp_path, byte_bpe(FAMILIES["gemma"][2]), GEMMA2, FAMILIES["gemma"][1])
    with pytest.raises(ValueError, match=rf"{gemma2} failed to render.*System role not supported"):
        load_tokenizer(gemma2).apply_chat_template([SYSTEM, TURNS[0]])
    assert load_tokenizer(gemma2).apply_chat_template(TURNS[:2]) == hf_ids(
        transformers.AutoTokenizer.from_pretrained(str(gemma2)), TURNS[:2], False)


def test_template_with_a_python_error_names_the_folder(tmp_path):
    folder = write_folder(tmp_path, byte_bpe(["<s>"]), "{{ messages[0].content + 1 }}", {})
    with pytest.raises(ValueError, match=rf"{folder} failed to render.*TypeError"):
        load_tokenizer(folder).apply_chat_template(TURNS[:1])


def test_invalid_jinja_fails_at_load(tmp_path):
    folder = write_folder(tmp_path, byte_bpe(["<s>"]), "{% for m in messages %}{{ m }}", {})
    with pytest.raises(ValueError, match=rf"chat template 'default' of {folder} is not valid Jinja"):
        load_tokenizer(folder)


def test_no_template(tmp_path):
    folder = write_folder(tmp_path, byte_bpe(["<s>"]), None, {})
    tok = load_tokenizer(folder)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match=rf"loaded from {folder} has no chat template.*"
                                         r"chat_template\.jinja.*tokenizer_config\.json"):
        tok.apply_chat_template(TURNS[:1])


@pytest.mark.parametrize("source", [
    "{{ messages.__class__.__mro__ }}", "{{ messages.append(1) }}",
    "{% set ns = namespace(_x=1) %}", "{% set ns = namespace() %}{% set ns._y = 2 %}",
])
def test_sandboxed(source):
    template = chat.ChatTemplate(source=source, folder="F", special_tokens={})
    with pytest.raises(ValueError, match="F failed to render.*SecurityError"):
        template.render(TURNS[:1])


# --- generate --chat on a tiny random Llama (vocabulary of 96 ids) --------------------------------


@pytest.fixture(scope="module")
def llama_chat(tmp_path_factory):
    from tests.hf.tiny_models import VOCAB, make_tiny

    folder, _ = make_tiny("llama_tied", tmp_path_factory.mktemp("chat_llama"))
    specials = FAMILIES["llama3"][2]
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", *specials],
                                  limit_alphabet=40, show_progress=False)
    tok.train_from_iterator(SENTENCES + ["system user assistant"], trainer)
    assert tok.get_vocab_size() <= VOCAB
    write_folder(folder, tok, LLAMA3, FAMILIES["llama3"][1])
    return folder


def test_generate_chat_prompt_and_stop_ids(llama_chat):
    from transformer.generate import prompt_ids, sampling_config, stream_text
    from transformer.pretrained import from_pretrained

    tok, model = from_pretrained(llama_chat)
    hf = transformers.AutoTokenizer.from_pretrained(str(llama_chat))
    ids = prompt_ids(tok, "What is the capital of France?", chat=True, system=SYSTEM["content"])
    expected = [SYSTEM, {"role": "user", "content": "What is the capital of France?"}]
    assert ids == hf_ids(hf, expected, True)
    config = sampling_config(tok, max_new_tokens=4, temperature=0.0, top_k=0, top_p=1.0,
                             stop_ids=None, chat=True)
    # The template's <|eot_id|>, and the eos id 2 of the model's generation_config.json.
    assert config.stop_tokens == (tok.token_to_id("<|eot_id|>"), 2)
    plain = sampling_config(tok, max_new_tokens=4, temperature=0.0, top_k=0, top_p=1.0, stop_ids=None)
    assert plain.stop_tokens == ((tok.eos_id,) if tok.eos_id is not None else ())
    with pytest.raises(ValueError, match="pass --chat with --system"):
        prompt_ids(tok, "hi", system="be brief")

    class Sink:
        text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    sink = Sink()
    reply = stream_text(tok, model, ids, config, out=sink)
    assert sink.text == reply + "\n"


def test_generate_chat_cli(llama_chat):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-m", "transformer.generate", f"--checkpoint={llama_chat}", "--chat",
         "--system=You are a helpful assistant.", "--prompt=Hello, how are you?",
         "--max_new_tokens=3"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Hello, how are you?" not in done.stdout  # the reply alone, not the echoed prompt


def test_sentencepiece_folder(fixtures, tmp_path):
    """A tokenizer.model folder: same text as transformers, special tokens in it one id each."""
    import shutil

    from tests.data.chat_folders import MISTRAL

    shutil.copy(fixtures / "tokenizers" / "mistral_sp32000.model", tmp_path / "tokenizer.model")
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": MISTRAL,
              "tokenizer_class": "LlamaTokenizer"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok, hf = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = tok.apply_chat_template(TURNS[:2], tokenize=False)
    assert text == hf.apply_chat_template(TURNS[:2], tokenize=False)
    ids = tok.apply_chat_template(TURNS[:2])
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids.count(tok.eos_id) == 1
    assert tok.chat_template.stop_ids == (tok.eos_id,)
    assert tok.decode(ids[1:-1]) == text.removeprefix("<s>").removesuffix("</s>")
