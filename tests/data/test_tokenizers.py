"""Tokenizers against the Hugging Face reference built from the same local files (offline)."""

import numpy as np
import pytest
import transformers

from transformer.data import sentencepiece_tokenizer, tokenizer
from transformer.data.tokenizer import load_tokenizer


def _offsets(batch):
    return [[tuple(int(x) for x in span) for span in row] for row in batch]


def _assert_same(ours, ref, texts):
    enc_ours = ours(texts, padding=False, truncation=False, return_offsets_mapping=True)
    enc_ref = ref(texts, return_offsets_mapping=True)
    offsets_ours = _offsets(enc_ours["offset_mapping"])
    offsets_ref = _offsets(enc_ref["offset_mapping"])
    for i, text in enumerate(texts):
        assert enc_ours["input_ids"][i] == enc_ref["input_ids"][i], text
        assert offsets_ours[i] == offsets_ref[i], text


def test_gpt2_equals_reference_and_round_trips(gpt2, hf_gpt2_dir, sst2_sentences, squad_texts):
    ref = transformers.GPT2Tokenizer.from_pretrained(hf_gpt2_dir)
    texts = sst2_sentences + squad_texts
    _assert_same(gpt2, ref, texts)
    for text in texts + ["  odd\n\nspacing\t and ünïcode ⊆ 😀 "]:
        assert gpt2.decode(gpt2.encode(text)) == text
    assert gpt2.vocab_size == 50257 and gpt2.padded_vocab_size() == 50304
    assert gpt2.eos_id == 50256 and gpt2.pad_id is None and gpt2.cls_id is None


def test_llama_sentencepiece_equals_reference(llama, hf_llama_dir, sst2_sentences, squad_texts):
    ref = transformers.AutoTokenizer.from_pretrained(hf_llama_dir)
    # The Hugging Face conversion of a SentencePiece BPE model splits some runs of spaces
    # differently from the sentencepiece library itself (the model's own implementation, which
    # this class uses); such texts are compared with sentencepiece directly below.
    texts = [t for t in sst2_sentences + squad_texts if "  " not in t]
    assert len(texts) > 450
    _assert_same(llama, ref, texts)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(hf_llama_dir / "tokenizer.model"))
    spaced = [t for t in squad_texts if "  " in t] + ["a  b   c"]
    assert [llama.encode(t) for t in spaced] == sp.encode(spaced)
    assert llama.encode("Hello world, the quick brown fox.") == [
        22557, 1526, 28725, 272, 2936, 9060, 285, 1142, 28723]
    assert (llama.bos_id, llama.eos_id, llama.unk_id, llama.pad_id) == (1, 2, 0, None)
    assert llama("Hello")["input_ids"] == [1, 22557]


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.txt"])
def test_wordpiece_equals_reference(minilm_dir, source, sst2_sentences, squad_texts):
    ours = load_tokenizer(minilm_dir if source == "tokenizer.json" else minilm_dir / "vocab.txt")
    ref = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    _assert_same(ours, ref, sst2_sentences[:150] + squad_texts[:150])
    a, b = squad_texts[130:134], squad_texts[:4]
    for max_length in (16, 33, 64):
        got = ours(a, b, return_tensors="np", padding=True, truncation=True, max_length=max_length)
        want = ref(a, b, return_tensors="np", padding=True, truncation=True, max_length=max_length)
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            np.testing.assert_array_equal(got[key], want[key])
    assert (ours.cls_id, ours.sep_id, ours.pad_id, ours.mask_id, ours.unk_id) == (
        101, 102, 0, 103, 100)
    assert ours.bos_id is None and ours.padded_vocab_size() == 30592


def test_call_returns_model_inputs(bert, llama):
    out = bert("Hello world!", return_tensors="np")
    assert set(out) == {"input_ids", "attention_mask", "token_type_ids"}
    assert out["input_ids"].shape == (1, 5) and out["input_ids"].dtype == np.int32
    assert "token_type_ids" not in llama(["a", "b c d"], return_tensors="np")
    padded = llama(["a", "b c d"], return_tensors="np")
    np.testing.assert_array_equal(padded["attention_mask"], [[1, 1, 0, 0], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="return_tensors"):
        bert("x", return_tensors="pt")


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_train_sentencepiece(tmp_path, sst2_sentences, model_type):
    tok = sentencepiece_tokenizer.train_sentencepiece(
        iter(sst2_sentences * 3), model_prefix=tmp_path / "sp", vocab_size=300,
        model_type=model_type)
    assert tok.vocab_size == 300
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.cls_id is not None and tok.sep_id is not None and tok.mask_id is not None
    assert tok.template == "bert"
    loaded = load_tokenizer(tmp_path / "sp.model")
    text = sst2_sentences[0]
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(loaded.encode(text)) == text.strip()
    ids = loaded("[MASK] it", return_tensors=None)["input_ids"]
    assert ids[0] == tok.cls_id and tok.mask_id in ids and ids[-1] == tok.sep_id


def test_train_cli_from_files(tmp_path, fixtures):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((fixtures / "sst2" / "dev.tsv").read_text(encoding="utf-8"))
    tokenizer.main(["train", f"--input={corpus}", f"--model_prefix={tmp_path}/cli",
                    "--vocab_size=250", "--model_type=bpe"])
    assert load_tokenizer(tmp_path / "cli.model").vocab_size == 250
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tokenizer.main(["train", f"--input={tmp_path}/missing.txt",
                        f"--model_prefix={tmp_path}/x", "--vocab_size=250"])


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "nothing")
    (tmp_path / "encoder.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="vocab.bpe"):
        load_tokenizer(tmp_path)
