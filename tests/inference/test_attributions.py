"""Attributions against Captum on the same tiny BERT (imported from transformers), the
completeness axiom for each model kind, attention maps against transformers', rollout against a
NumPy re-implementation, the errors, and the command line."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from captum.attr import InputXGradient, IntegratedGradients
from captum.attr._utils.approximation_methods import approximation_parameters
from flax import nnx

from tests.hf.tiny_models import _BERT, _LLAMA, VOCAB
from transformer.attribute import load_model
from transformer.hf.task_heads import load_hf_task_model
from transformer.inference.attention_maps import attention_rollout, attention_weights
from transformer.inference.attributions import METHODS, Attributor, quadrature
from transformer.model_io import flat_params
from transformer.models import get_preset
from transformer.models.heads import HeadConfig, TaskModel
from transformer.pretrained import from_pretrained
from transformer.train.best import save_task_model

STEPS = 50
WORDS = ("the", "film", "is", "good", "bad", "movie", "not", "very", "great", "boring", "and",
         "it", "was", "of", "to", "this", "one", "story", "fun", "dull", "plot", "acting")
# [batch, length]: the first row padded; the second a pair (token types 0 then 1).
IDS = np.array([[2, 10, 20, 30, 40, 50, 3, 0, 0, 0], [2, 11, 12, 13, 3, 60, 70, 80, 90, 3]],
               np.int32)
MASK = (IDS != 0).astype(np.int32)
TYPES = np.array([[0] * 10, [0] * 5 + [1] * 5], np.int32)
SPECIAL = np.isin(IDS, [0, 2, 3])  # [PAD], [CLS], [SEP]: kept by the baseline.


def _vocab_folder(folder: pathlib.Path) -> None:
    """A WordPiece vocabulary of VOCAB entries (special tokens, words, letters)."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *letters,
             *("##" + c for c in letters)]
    vocab += [f"[unused{i}]" for i in range(VOCAB - len(vocab))]
    (folder / "vocab.txt").write_text("\n".join(vocab[:VOCAB]) + "\n")


@dataclasses.dataclass
class Case:
    """A tiny BERT classifier in transformers and as our model, and our IG on IDS."""

    folder: pathlib.Path
    torch_model: torch.nn.Module
    model: TaskModel
    attributor: Attributor
    result: Any


def _case(folder: pathlib.Path, model_cls, num_labels: int, target, **options) -> Case:
    """A random tiny BERT (weights large enough that its outputs vary, random biases and norms),
    saved with a vocabulary and imported; IG from the [PAD] baseline with special tokens kept."""
    torch.manual_seed(0)
    config = transformers.BertConfig(**_BERT, num_labels=num_labels, initializer_range=0.3,
                                     attn_implementation="eager")
    torch_model = model_cls(config).eval()
    with torch.no_grad():
        for p in torch_model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    torch_model.save_pretrained(folder, safe_serialization=True)
    _vocab_folder(folder)
    model = load_hf_task_model(folder)
    attributor = Attributor(model)
    baseline = attributor.baseline_embeddings(IDS, SPECIAL, fill_id=0)
    result = attributor.integrated_gradients(IDS, MASK, TYPES, target=target,
                                             baseline_embeds=baseline, steps=STEPS, **options)
    return Case(folder, torch_model, model, attributor, result)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Case:
    folder = tmp_path_factory.mktemp("attributions") / "bert_classifier"
    return _case(folder, transformers.BertForSequenceClassification, 3, [1, None])


@pytest.fixture(scope="module")
def tagger(tmp_path_factory) -> Case:
    folder = tmp_path_factory.mktemp("attributions") / "bert_tagger"
    return _case(folder, transformers.BertForTokenClassification, 4, [(3, 1), (7, None)],
                 chunk_size=16)


def _torch_outputs(torch_model, **options):
    tensor = lambda a: torch.tensor(a, dtype=torch.long)
    with torch.no_grad():
        return torch_model(input_ids=tensor(IDS), attention_mask=tensor(MASK),
                           token_type_ids=tensor(TYPES), **options)


def _captum(torch_model, method, target, baseline=None, ids=IDS, mask=MASK, types=TYPES):
    """Captum's attributions of the torch model on `inputs_embeds`; `baseline` defaults to the
    [PAD]-filled one with special tokens kept, built from the torch weights."""
    tensor = lambda a: torch.tensor(np.asarray(a), dtype=torch.long)
    embed = torch_model.bert.embeddings.word_embeddings
    inputs = embed(tensor(ids)).detach().requires_grad_()
    forward = lambda e, mask, types: torch_model(inputs_embeds=e, attention_mask=mask,
                                                 token_type_ids=types).logits
    extra = (tensor(mask), tensor(types))
    if method == "gxi":
        out = InputXGradient(forward).attribute(inputs, target=target, additional_forward_args=extra)
        return out.detach().numpy()
    if baseline is None:
        with torch.no_grad():
            baseline = embed(tensor(np.where(np.isin(ids, [0, 2, 3]), ids, 0)))
    out = IntegratedGradients(forward).attribute(
        inputs, baselines=torch.tensor(np.array(baseline)), target=target, n_steps=STEPS,
        additional_forward_args=extra)
    return out.detach().numpy()


def test_quadrature_is_captums():
    for method in METHODS:
        step_sizes, alphas = approximation_parameters(method)
        ours_alphas, ours_weights = quadrature(method, STEPS)
        np.testing.assert_allclose(ours_alphas, alphas(STEPS), atol=1e-7)
        np.testing.assert_allclose(ours_weights, step_sizes(STEPS), atol=1e-12)


def test_integrated_gradients_equal_captum_sequence_classification(classifier):
    torch_model, result = classifier.torch_model, classifier.result
    reference = _captum(torch_model, "ig", result.labels.tolist())
    assert np.abs(reference).max() > 0.05  # The model's outputs do depend on the tokens.
    np.testing.assert_allclose(result.embeddings, reference, atol=1e-4)
    np.testing.assert_allclose(result.token_scores, reference.sum(-1), atol=1e-4)
    logits = _torch_outputs(torch_model).logits  # The second example's target is the prediction.
    assert result.labels.tolist() == [1, int(logits[1].argmax())]
    assert np.all(result.token_scores[SPECIAL] == 0)  # The baseline keeps them.


def test_integrated_gradients_equal_captum_token_classification(tagger):
    result = tagger.result
    assert result.positions.tolist() == [3, 7]
    targets = list(zip(result.positions.tolist(), result.labels.tolist()))  # (position, label)
    reference = _captum(tagger.torch_model, "ig", targets)
    np.testing.assert_allclose(result.embeddings, reference, atol=1e-4)


def test_grad_x_input_equals_captum(classifier):
    result = classifier.attributor.grad_x_input(IDS, MASK, TYPES, target=[2, 0])
    reference = _captum(classifier.torch_model, "gxi", [2, 0])
    np.testing.assert_allclose(result.embeddings, reference, atol=1e-5)


def _assert_complete(result):
    """Sum of attributions = f(input) − f(baseline), within 1 %."""
    gap = result.score - result.baseline_score
    assert np.all(np.abs(gap) > 1e-2), gap
    np.testing.assert_array_less(np.abs(result.delta), 0.01 * np.abs(gap))
    np.testing.assert_allclose(result.embeddings.reshape(len(gap), -1).sum(1), gap, rtol=0.01)


def test_completeness_sequence_classification(classifier):
    _assert_complete(classifier.result)


def test_completeness_token_classification(tagger):
    _assert_complete(tagger.result)


def test_completeness_language_model(tmp_path):
    torch.manual_seed(0)  # A tiny Llama (RoPE, RMSNorm, grouped-query attention), imported.
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_LLAMA,
                                                                   initializer_range=0.2))
    llama.save_pretrained(tmp_path / "llama", safe_serialization=True)
    attributor = Attributor(from_pretrained(tmp_path / "llama")[1], output="probability")
    ids, mask = IDS[:, :8], MASK[:, :8]
    # A token's embedding (eos), not zeros: without absolute positions the first RMSNorm sees the
    # path itself, scale-invariant but for its singularity at 0, where a zero baseline starts and
    # f changes all at once (the gap was 5 % there, 6e-7 from the token).
    baseline = attributor.baseline_embeddings(ids, np.arange(8) == 0, fill_id=2)
    result = attributor.integrated_gradients(ids, mask, target=[None, (4, None)], steps=STEPS,
                                             baseline_embeds=baseline)
    assert result.positions.tolist() == [6, 4]  # The last real token by default.
    _assert_complete(result)
    assert np.all(result.token_scores[1, 5:] == 0)  # Causal: later tokens cannot matter.


def test_attention_maps_and_rollout(classifier):
    weights = attention_weights(classifier.model, IDS, MASK, TYPES)
    attentions = _torch_outputs(classifier.torch_model, output_attentions=True).attentions
    reference = np.stack([a.numpy() for a in attentions])  # [layers, batch, heads, T, T]
    real = MASK.astype(bool)
    for b in range(2):  # Real queries only: transformers lets padding queries attend anywhere.
        np.testing.assert_allclose(weights[:, b][:, :, real[b]], reference[:, b][:, :, real[b]],
                                   atol=1e-5)
    n = int(real[0].sum())
    one = weights[:, 0, :, :n, :n]
    # Abnar & Zuidema: A = 0.5 W + 0.5 I per layer (W averaged over heads), Ã = A_L ··· A_1.
    per_layer = [0.5 * w.mean(0).astype(np.float64) + 0.5 * np.eye(n) for w in one]
    expected = np.linalg.multi_dot(per_layer[::-1])
    np.testing.assert_allclose(attention_rollout(one), expected, atol=1e-5)
    np.testing.assert_allclose(attention_rollout(one).sum(-1), 1.0, atol=1e-5)


def test_unsupported_models_and_targets_fail_clearly(classifier, tagger):
    attributor = classifier.attributor
    with pytest.raises(ValueError, match="bare encoder"):
        Attributor(classifier.model.backbone)
    config = get_preset("bert-tiny", num_layers=1, hidden_size=16, num_heads=2, mlp_dim=32,
                        vocab_size=VOCAB)
    for kind in ("qa", "relation"):
        with pytest.raises(ValueError, match=f"not supported for a '{kind}' head"):
            Attributor(nnx.eval_shape(lambda k=kind: TaskModel(config, HeadConfig(k),
                                                               rngs=nnx.Rngs(0))))
    with pytest.raises(ValueError, match="class index"):
        attributor.resolve_target(IDS, MASK, target=(1, 2))
    with pytest.raises(ValueError, match="out of range"):
        attributor.resolve_target(IDS, MASK, target=3)
    with pytest.raises(ValueError, match="method="):
        attributor.integrated_gradients(IDS, MASK, TYPES, method="simpson")
    tags = tagger.attributor
    with pytest.raises(ValueError, match=r"needs target=\(position, label\)"):
        tags.resolve_target(IDS, MASK, target=None)
    with pytest.raises(ValueError, match="not one of its 7 real tokens"):
        tags.resolve_target(IDS, MASK, target=(8, 0))


def test_cli_on_a_fine_tuned_checkpoint(classifier, tmp_path):
    checkpoint = tmp_path / "best"
    save_task_model(checkpoint, classifier.model, str(classifier.folder))
    text = "the film is not very good"
    out = tmp_path / "why"
    command = [sys.executable, "-m", "transformer.attribute", f"--checkpoint={checkpoint}",
               f"--text={text}", "--target=2", f"--steps={STEPS}", f"--output={out}"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"},
                         cwd=pathlib.Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("attributions.json", "attributions.png", "attributions.html", "attention.png",
                 "rollout.png"):
        assert (out / name).stat().st_size > 0, name
    record = json.loads((out / "attributions.json").read_text())
    assert record["tokens"] == ["[CLS]", *text.split(), "[SEP]"]
    assert record["label"] == 2 and record["baseline"] == "pad"
    expected = flat_params(nnx.state(classifier.model, nnx.Param))
    loaded = {path: load_model(path) for path in (checkpoint, classifier.folder)}
    for _, model in loaded.values():  # Ours, and the Hugging Face classifier folder.
        assert model.head_config == classifier.model.head_config
        params = flat_params(nnx.state(model, nnx.Param))
        assert params.keys() == expected.keys()
        for name, value in params.items():
            np.testing.assert_array_equal(value, expected[name], err_msg=name)
    inputs = loaded[checkpoint][0](text, return_tensors="np")
    reference = _captum(classifier.torch_model, "ig", 2, ids=inputs["input_ids"],
                        mask=inputs["attention_mask"], types=inputs["token_type_ids"])
    np.testing.assert_allclose(record["scores"], reference[0].sum(-1), atol=1e-4)
    assert abs(record["completeness_gap"]) < 0.01 * abs(record["score"] - record["baseline_score"])
    page = (out / "attributions.html").read_text()
    assert all(f">{word}</span>" in page for word in text.split())
