"""A Hugging Face decoder classifier (`LlamaForSequenceClassification`) imported for attributions:
its logits equal transformers' (right padding, the last real token pooled), and integrated
gradients equal Captum's on the same weights."""

import numpy as np
import pytest
import torch
import transformers
from captum.attr import IntegratedGradients

from tests.hf.tiny_models import _LLAMA
from transformer.hf.task_heads import load_hf_task_model
from transformer.inference.attributions import Attributor

LABELS, STEPS = 3, 50
# Right-padded ids (0 = pad_token_id); every id but 0 is a word.
IDS = np.array([[1, 10, 20, 30, 40, 50, 0, 0], [1, 11, 12, 13, 14, 60, 70, 80]], np.int32)
MASK = (IDS != 0).astype(np.int32)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**_LLAMA, num_labels=LABELS, initializer_range=0.2,
                                      attn_implementation="eager")
    torch_model = transformers.LlamaForSequenceClassification(config).eval()
    folder = tmp_path_factory.mktemp("llama_classifier")
    torch_model.save_pretrained(folder, safe_serialization=True)
    return torch_model, load_hf_task_model(folder)


def test_imported_llama_classifier_gives_transformers_logits(classifier):
    torch_model, model = classifier
    assert model.head_config.pooling == "last" and model.head_config.num_labels == LABELS
    with torch.no_grad():
        reference = torch_model(input_ids=torch.tensor(IDS).long(),
                                attention_mask=torch.tensor(MASK).long()).logits.numpy()
    ours = np.asarray(model(IDS, MASK)["logits"])
    assert np.abs(reference).max() > 0.05
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_integrated_gradients_equal_captum_on_the_llama_classifier(classifier):
    torch_model, model = classifier
    ids = IDS[1:]  # Unpadded: from inputs_embeds transformers pools the last position.
    attributor = Attributor(model)
    keep = np.arange(ids.shape[1])[None] == 0  # The BOS keeps its embedding.
    baseline = attributor.baseline_embeddings(ids, keep, fill_id=2)  # eos: a token, not zeros.
    result = attributor.integrated_gradients(ids, target=[2], steps=STEPS, baseline_embeds=baseline)
    embed = torch_model.model.embed_tokens
    inputs = embed(torch.tensor(ids).long()).detach().requires_grad_()
    forward = lambda e: torch_model(inputs_embeds=e).logits
    reference = IntegratedGradients(forward).attribute(
        inputs, baselines=torch.tensor(np.asarray(baseline)), target=[2], n_steps=STEPS
    ).detach().numpy()
    assert np.abs(reference).max() > 0.01
    np.testing.assert_allclose(result.embeddings, reference, atol=1e-4)
    gap = result.score - result.baseline_score  # Completeness, at 50 Gauss-Legendre steps.
    np.testing.assert_array_less(np.abs(result.delta), 0.01 * np.abs(gap))
