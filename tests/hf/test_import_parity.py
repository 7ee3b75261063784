"""Imported Hugging Face models give the outputs of transformers (PyTorch, float32), same weights."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from tests.hf.tiny_models import MINILM_DIR, random_ids, torch_forward
from transformer.hf import load_hf_model
from transformer.inference.features import mean_pool, read_pooling, sentence_embeddings
from transformer.pretrained import from_pretrained

TOL = 1e-4


@jax.jit
def _forward(graphdef, state, ids, mask, types):
    out = nnx.merge(graphdef, state)(ids, mask, types)
    return out.last_hidden_state, out.logits, out.pooler_output


_forward = jax.jit(_forward.__wrapped__, static_argnums=0)


def forward(model, ids, mask, types=None):
    graphdef, state = nnx.split(model)
    return [None if x is None else np.asarray(x) for x in _forward(graphdef, state, ids, mask, types)]


def masked_max_diff(a, b, mask):
    return float(np.abs((a - b) * mask[..., None]).max())


def padded_batch(seed=0):
    ids = random_ids(2, 12, seed)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0  # Right padding; for decoders padded positions are compared too (causal).
    return ids, mask


@pytest.mark.parametrize("name", ["bert_mlm", "bert_base"])
def test_bert_parity(tiny, name):
    folder, ref = tiny(name)
    model = load_hf_model(folder)
    ids, mask = padded_batch()
    types = np.zeros_like(ids)
    types[:, 6:] = 1
    hidden, logits, pooled = forward(model, ids, mask, types)
    out = torch_forward(ref, ids, mask, token_type_ids=torch.tensor(types, dtype=torch.long))
    if name == "bert_mlm":
        types_t = torch.tensor(types)
        ref_hidden = torch_forward(ref.bert, ids, mask, token_type_ids=types_t).last_hidden_state
        assert masked_max_diff(logits, out.logits.numpy(), mask) < TOL
        assert pooled is None
    else:
        ref_hidden = out.last_hidden_state
        assert np.abs(pooled - out.pooler_output.numpy()).max() < TOL
    # Padding positions too: their queries attend to the real tokens, as in transformers
    # (extractive QA's softmax runs over them).
    assert np.abs(hidden - ref_hidden.numpy()).max() < TOL


@pytest.mark.parametrize(
    "name", ["gpt2", "llama_tied", "llama_untied", "llama3_rope", "llama_linear_rope", "mistral",
             "mistral_window"]
)
def test_decoder_parity(tiny, name):
    folder, ref = tiny(name)
    model = load_hf_model(folder)
    ids, mask = padded_batch(seed=1)
    hidden, logits, _ = forward(model, ids, mask)
    out = torch_forward(ref, ids, mask, output_hidden_states=True)
    assert masked_max_diff(logits, out.logits.numpy(), mask) < TOL
    assert masked_max_diff(hidden, out.hidden_states[-1].numpy(), mask) < TOL
    if name == "llama_tied":
        assert not hasattr(model, "lm_head")
    if name in ("llama_untied", "llama3_rope"):
        assert model.lm_head[...].shape == (32, 96)
    if name == "llama3_rope":
        assert model.config.rope_scaling == "llama3" and model.config.rope_factor == 8.0
    if name == "mistral_window":  # Sequences longer than the window: the window matters.
        assert model.config.sliding_window == 4 and ids.shape[1] > 4


@pytest.fixture(scope="module")
def minilm():
    from transformers import BertModel

    tokenizer, model = from_pretrained(MINILM_DIR)
    return tokenizer, model, BertModel.from_pretrained(str(MINILM_DIR)).eval()


def sst2_sentences(fixtures, n=8):
    lines = (fixtures / "sst2" / "dev.tsv").read_text().splitlines()[1:n + 1]
    return [line.split("\t")[0] for line in lines]


def test_minilm_real_sentences(minilm, fixtures):
    tokenizer, model, ref = minilm
    texts = sst2_sentences(fixtures)
    inputs = tokenizer(texts, return_tensors="jax")
    hidden, _, pooled = forward(model, inputs["input_ids"], inputs["attention_mask"],
                                inputs["token_type_ids"])
    mask = np.asarray(inputs["attention_mask"])
    out = torch_forward(ref, np.asarray(inputs["input_ids"]), mask,
                        token_type_ids=torch.tensor(np.asarray(inputs["token_type_ids"])))
    assert masked_max_diff(hidden, out.last_hidden_state.numpy(), mask) < TOL
    assert np.abs(pooled - out.pooler_output.numpy()).max() < TOL
    # Mean pooling over real tokens, as sentence-transformers does it, in torch.
    m = torch.tensor(mask, dtype=torch.float32)[..., None]
    ref_mean = (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)
    ours_mean = np.asarray(mean_pool(hidden, mask))
    assert np.abs(ours_mean - ref_mean.numpy()).max() < TOL
    # The sentence-transformers embedding: mean pool, then L2-normalize (per the folder's modules).
    pooling = read_pooling(MINILM_DIR)
    assert pooling.mode == "mean" and pooling.normalize and pooling.max_length == 256
    emb = sentence_embeddings(tokenizer, model, texts, pooling)
    ref_emb = torch.nn.functional.normalize(ref_mean, dim=-1).numpy()
    assert np.abs(emb - ref_emb).max() < TOL


def test_minilm_tokenizer_ids_match_the_folder_tokenizer(minilm, fixtures):
    import tokenizers

    tokenizer = minilm[0]
    reference = tokenizers.Tokenizer.from_file(str(MINILM_DIR / "tokenizer.json"))
    reference.no_padding()
    for text in sst2_sentences(fixtures):
        assert tokenizer(text)["input_ids"] == reference.encode(text).ids


def test_readme_example(minilm):
    tokenizer, model, _ = minilm
    inputs = tokenizer("Hello, world! This is a test.", return_tensors="jax")
    outputs = model(**inputs)
    assert outputs.last_hidden_state.shape == (1, inputs["input_ids"].shape[1], 384)


def test_minilm_sentence_embeddings_equal_sentence_transformers(minilm, fixtures):
    import sentence_transformers

    tokenizer, model, _ = minilm
    texts = sst2_sentences(fixtures, n=4)
    reference = sentence_transformers.SentenceTransformer(str(MINILM_DIR), device="cpu").encode(texts)
    ours = sentence_embeddings(tokenizer, model, texts, read_pooling(MINILM_DIR))
    assert np.abs(ours - reference).max() < TOL
