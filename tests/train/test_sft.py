"""Supervised fine-tuning: conversations packed whole with assistant-only targets, packed ==
unpacked loss, SQuAD questions as conversations, and the LoRA recipe end to end."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from transformer import locations
from transformer.data import chat, instructions, sft, sft_batches
from transformer.data.tokenizer import load_tokenizer
from transformer.models import build_model, get_preset
from transformer.train.losses import cross_entropy

SP_MODEL = locations.sample("tokenizers", "mistral_sp32000.model")
SQUAD = locations.sample("squad", "train-v1.1.json")


@pytest.fixture(scope="module", params=["inst", "plain"])
def tokenizer(request):
    tok = load_tokenizer(SP_MODEL)
    tok.chat_template = chat.template_from_file(request.param, tok)
    return tok


@pytest.fixture(scope="module")
def examples(tokenizer):
    records = instructions.conversations(str(SQUAD), "squad", limit=7)
    return list(sft.sft_examples(records, tokenizer, 128))


def test_squad_questions_become_conversations():
    records = list(instructions.conversations(str(SQUAD), "squad"))
    assert len(records) == 40  # Every question of the sample.
    for r in records:
        system, user, assistant = r["messages"]
        assert (system["role"], user["role"], assistant["role"]) == ("system", "user", "assistant")
        assert assistant["content"] == r["answers"][0]
        context = user["content"].split("\nQuestion: ")[0].removeprefix("Context: ")
        assert assistant["content"] in context  # The sentence that holds the answer.


def test_inst_template_weights_cover_the_answers(tokenizer, examples):
    assert tokenizer.chat_template.stop_ids == (tokenizer.eos_id,)
    records = list(instructions.conversations(str(SQUAD), "squad", limit=7))
    for record, example in zip(records, examples):
        ids, weights = example["tokens"], example["loss_weights"]
        assert ids[0] == tokenizer.bos_id
        answer = [int(i) for i, w in zip(ids, weights) if w]
        assert answer[-1] == tokenizer.eos_id  # The model learns to stop.
        assert tokenizer.decode(answer).strip() == record["messages"][-1]["content"]


def test_packed_rows_hold_whole_conversations(examples):
    rows = sft_batches.pack_conversations(examples, 256)
    placed = []
    for row in rows:
        for segment in range(1, row["segment_ids"].max() + 1):
            where = np.flatnonzero(row["segment_ids"] == segment)
            np.testing.assert_array_equal(row["positions"][where], np.arange(len(where)))
            placed.append((row["tokens"][where], row["loss_weights"][where]))
    assert len(placed) == len(examples) and len(rows) < len(examples)
    for (tokens, weights), example in zip(placed, examples):  # In order, none cut.
        np.testing.assert_array_equal(tokens, example["tokens"])
        np.testing.assert_array_equal(weights, example["loss_weights"])
    batch = sft_batches.lm_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]})
    # Target t is token t + 1, weighted by that token's weight, never across segments.
    assert batch["weights"].sum() == sum(e["loss_weights"][1:].sum() for e in examples)
    with pytest.raises(ValueError, match="does not fit a row of 8"):
        sft_batches.pack_conversations(examples, 8)


def test_packed_loss_equals_each_conversation_alone(examples):
    config = get_preset("llama-tiny", vocab_size=32000, hidden_size=32, num_layers=2, num_heads=4,
                        num_kv_heads=2, mlp_dim=64, max_length=256)
    model = build_model(config, seed=0)

    def loss_sums(rows):
        batch = sft_batches.lm_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]})
        out = model(jnp.asarray(batch["inputs"]), segment_ids=jnp.asarray(batch["segment_ids"]),
                    positions=jnp.asarray(batch["positions"]))
        sums = cross_entropy(out.logits, jnp.asarray(batch["targets"]), jnp.asarray(batch["weights"]))
        return float(sums["loss_sum"]), float(sums["weight_sum"])

    packed = loss_sums(sft_batches.pack_conversations(examples, 256))
    alone = [loss_sums(sft_batches.pack_conversations([e], 256)) for e in examples]
    assert packed[1] == sum(w for _, w in alone)
    np.testing.assert_allclose(packed[0], sum(s for s, _ in alone), rtol=1e-5)


def test_a_template_given_by_the_config_travels_with_the_tokenizer(tokenizer, tmp_path):
    import shutil

    shutil.copy(SP_MODEL, tmp_path / SP_MODEL.name)
    chat.save_template(tokenizer.chat_template, tmp_path)
    loaded = load_tokenizer(tmp_path)
    messages = [{"role": "user", "content": "Context: A. Question: B?"}]
    assert loaded.chat_template.source == tokenizer.chat_template.source
    assert loaded.chat_template.stop_ids == tokenizer.chat_template.stop_ids
    assert (loaded.apply_chat_template(messages, add_generation_prompt=True)
            == tokenizer.apply_chat_template(messages, add_generation_prompt=True))


@pytest.fixture(scope="module")
def hf_chat_decoder(tmp_path_factory):
    """A tiny random Hugging Face Llama whose tokenizer folder has the ChatML template, and
    conversations in the JSONL `messages` form."""
    import torch
    import transformers

    from tests.data.chat_folders import SENTENCES, make_family

    root = tmp_path_factory.mktemp("hf_chat")
    tokenizer_dir = make_family(root / "tokenizer", "chatml")
    vocab = len(transformers.AutoTokenizer.from_pretrained(tokenizer_dir))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False)).eval()
    folder = root / "hf"
    model.save_pretrained(folder)
    for f in tokenizer_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    lines = [json.dumps({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": SENTENCES[i % 7]},
        {"role": "assistant", "content": SENTENCES[(i + 1) % 7]}]}) for i in range(24)]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "dev.jsonl").write_text("\n".join(lines[:8]) + "\n")
    return folder, model, root


def test_sft_of_an_imported_decoder_exports_an_adapter_peft_loads(hf_chat_decoder, tmp_path):
    """The recipe on a Hugging Face decoder (imported, with its own chat template): LoRA trains,
    and its adapter, loaded by peft onto the transformers model, gives our trained model's logits;
    the merged model gives them too."""
    import peft
    import torch
    import transformers

    from tests.test_recipes import load
    from transformer import convert, generate
    from transformer.pretrained import from_pretrained
    from transformer.train import run

    folder, hf_model, root = hf_chat_decoder
    checkpoint = convert.import_hf(folder, tmp_path / "base")
    config = load("sft").get_config("ci")
    config.update_from_flattened_dict({
        "init_from": str(checkpoint), "data.tokenizer": "", "data.chat_template": "",
        "data.local_format": "jsonl", "data.local_files.train": str(root / "train.jsonl"),
        "data.local_files.validation": str(root / "dev.jsonl"), "data.max_length": 64,
        "async_checkpointing": False})
    workdir = tmp_path / "run"
    result = run.run(config, str(workdir))
    log = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert len(evals) >= 2 and evals[-1] < evals[0]
    assert result["model_config"].lora_rank == 4 and result["model_config"].hidden_size == 32
    settings = json.loads((workdir / "adapter" / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] == str(checkpoint)

    tokenizer, model = from_pretrained(workdir / "model")
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello, how are you today?"}]
    ids = generate.prompt_ids(tokenizer, "Hello, how are you today?", chat=True,
                              system="Be brief.")
    reference = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True)
    assert ids == list(getattr(reference, "input_ids", reference))
    peft_model = peft.PeftModel.from_pretrained(hf_model, str(workdir / "adapter")).eval()
    assert all(float(p.abs().max()) > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        theirs = peft_model(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(model(jnp.asarray([ids])).logits)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    peft_model.unload()
    _, merged = from_pretrained(workdir / "merged")
    assert merged.config.lora_rank == 0
    np.testing.assert_allclose(np.asarray(merged(jnp.asarray([ids])).logits), ours, atol=1e-4)
