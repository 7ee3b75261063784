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


def test_sft_recipe_trains_lora_and_exports_peft_and_merged(tmp_path, monkeypatch):
    from tests.test_recipes import load
    from transformer import generate
    from transformer.pretrained import from_pretrained
    from transformer.train import run

    monkeypatch.setenv("TRANSFORMER_CACHE", str(tmp_path / "cache"))
    config = load("sft").get_config("ci")
    config.async_checkpointing = False
    result = run.run(config, str(tmp_path))
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert len(evals) >= 2 and evals[-1] < evals[0]
    assert result["model_config"].lora_rank == 4
    settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert settings["r"] == 4 and "q_proj" in settings["target_modules"]

    tokenizer, model = from_pretrained(tmp_path / "model")
    _, merged = from_pretrained(tmp_path / "merged")
    assert merged.config.lora_rank == 0
    ids = jnp.asarray([[1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793]])
    np.testing.assert_allclose(np.asarray(merged(ids).logits), np.asarray(model(ids).logits),
                               atol=1e-4)
    # The template the run used travels with the model: `generate --chat` formats with it.
    prompt = generate.prompt_ids(tokenizer, "Context: A. Question: B?", chat=True)
    text = tokenizer.decode(prompt)
    assert text.startswith("User: Context: A. Question: B?") and text.endswith("Assistant:")
