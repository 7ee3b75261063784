"""Explain one prediction: token attributions (integrated gradients or gradient × input), the
attention maps of every layer and head, and the attention rollout, written as pictures and JSON.

  python -m transformer.attribute --checkpoint=/tmp/sst2/best --text="a gripping, moving film" \
      [--target=1] [--method=ig|grad_x_input] [--steps=50] [--baseline=pad|zero] --output=/tmp/why

--checkpoint is a fine-tuned checkpoint (WORKDIR/best or WORKDIR/model of a classification or
token-classification run), a decoder checkpoint or Hugging Face folder (next-token predictions),
or a Hugging Face BertForSequenceClassification / BertForTokenClassification folder.
--target (default: the prediction) is a class index for sequence classification, POSITION or
POSITION:LABEL for token classification, POSITION or POSITION:TOKEN_ID for a language model (the
token predicted after POSITION; default the last one). Positions count tokens from 0, special
tokens included (see tokens in the JSON). The baseline keeps the special tokens and replaces the
others' token embeddings by [PAD]'s (--baseline=pad) or by zeros (--baseline=zero); the default,
auto, takes the tokenizer's padding token, else its unknown or end-of-sequence token, else zeros.

Writes to --output: attributions.json (tokens, scores, target, f(input), f(baseline), the
completeness gap), attributions.png and .html (tokens coloured by score), attention.png (a layer
× head grid) and rollout.png.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

HEAD_FILE = "head_config.json"  # Beside a fine-tuned checkpoint (transformer.train.best).


def load_model(path: str | pathlib.Path) -> tuple[Any, Any]:
    """(tokenizer, model): a TaskModel for fine-tuned checkpoints and HF classifier folders, else
    what `from_pretrained` loads."""
    from transformer.hf import task_heads
    from transformer.hf.importer import CONFIG_FILE
    from transformer.pretrained import _tokenizer, from_pretrained

    path = pathlib.Path(path)
    if (path / HEAD_FILE).is_file():
        from flax import nnx

        from transformer import model_io
        from transformer.models.heads import HeadConfig, TaskModel

        head = HeadConfig(**json.loads((path / HEAD_FILE).read_text()))
        config = model_io.read_config(path)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: TaskModel(config, head,
                                                                     rngs=nnx.Rngs(0))))
        nnx.replace_by_pure_dict(state, model_io.load_params(path, nnx.to_pure_dict(state)))
        return _tokenizer(path / model_io.TOKENIZER_DIR), nnx.merge(graphdef, state)
    if (path / CONFIG_FILE).is_file() and task_heads.hf_head_kind(path) is not None:
        return _tokenizer(path), task_heads.load_hf_task_model(path)
    return from_pretrained(path)


def parse_target(text: str | None) -> int | tuple[int, int | None] | None:
    """'3' → 3 (a class, or a position for token classification and LMs); '5:2' → (5, 2)."""
    if not text:
        return None
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        raise ValueError(f"--target={text!r}: give an integer or POSITION:INDEX") from None
    if len(parts) > 2:
        raise ValueError(f"--target={text!r}: give an integer or POSITION:INDEX")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def explain(tokenizer: Any, model: Any, text: str, output: str | pathlib.Path, *,
            target: str | None = None, method: str = "ig", steps: int = 50,
            baseline: str = "auto", chunk_size: int | None = None) -> dict[str, Any]:
    """Attributions and attention pictures of `text` → files in `output`; returns the JSON."""
    from transformer.inference import attention_maps, attribution_plots
    from transformer.inference.attributions import Attributor, special_token_mask

    if method not in ("ig", "grad_x_input"):
        raise ValueError(f"--method={method!r} is not one of ['ig', 'grad_x_input']")
    if baseline not in ("auto", "pad", "zero"):
        raise ValueError(f"--baseline={baseline!r} is not one of ['auto', 'pad', 'zero']")
    if baseline == "auto":  # A token, not zeros: from 0 the path starts at RMSNorm's singularity.
        baseline = next((n for n in ("pad", "unk", "eos") if getattr(tokenizer, f"{n}_id")
                         is not None), "zero")
    attributor = Attributor(model)  # Fails first for a model kind without attributions.
    wanted = parse_target(target)
    if attributor.kind != "classification" and isinstance(wanted, int):
        wanted = (wanted, None)
    inputs = tokenizer(text, return_tensors="np")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    types = inputs.get("token_type_ids")
    keep = special_token_mask(tokenizer, ids)
    fill = None if baseline == "zero" else getattr(tokenizer, f"{baseline}_id")
    if baseline == "pad" and fill is None:
        raise ValueError("--baseline=pad needs a tokenizer with a padding token; this one has "
                         "none: pass --baseline=zero (or auto)")
    if method == "ig":
        result = attributor.integrated_gradients(
            ids, mask, types, target=wanted, steps=steps, chunk_size=chunk_size,
            baseline_embeds=attributor.baseline_embeddings(ids, keep, fill))
    else:
        result = attributor.grad_x_input(ids, mask, types, target=wanted)
    tokens = [tokenizer.id_to_token(int(i)) for i in ids[0]]
    scores = result.token_scores[0]
    record = {
        "text": text, "kind": attributor.kind, "method": result.method, "tokens": tokens,
        "scores": [float(s) for s in scores], "position": int(result.positions[0]),
        "label": int(result.labels[0]), "output": attributor.output, "score": float(result.score[0]),
    }
    if result.delta is not None:
        record.update(steps=steps, baseline=baseline, baseline_score=float(result.baseline_score[0]),
                      completeness_gap=float(result.delta[0]))
    if attributor.kind == "lm":
        record["next_token"] = tokenizer.id_to_token(int(result.labels[0]))
    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "attributions.json").write_text(json.dumps(record, indent=1) + "\n")
    title = _title(record)
    shown = _readable(tokenizer, ids[0], tokens)
    attribution_plots.plot_token_attributions(shown, scores, output / "attributions.png", title)
    (output / "attributions.html").write_text(
        attribution_plots.token_attributions_html(shown, scores, title), encoding="utf-8")
    weights = attention_maps.attention_weights(model, ids, mask, types)[:, 0]
    attribution_plots.plot_attention_grid(weights, shown, output / "attention.png")
    attribution_plots.plot_rollout(attention_maps.attention_rollout(weights), shown,
                                   output / "rollout.png")
    return record


def _readable(tokenizer: Any, ids: Sequence[int], tokens: list[str]) -> list[str]:
    """Tokens as the pictures show them: WordPiece strings as they are ('##ing' says it continues
    a word), byte-level BPE and SentencePiece pieces decoded ('Ġthe', '▁the' → 'the')."""
    if tokenizer.template == "bert":
        return tokens
    decoded = [tokenizer.decode([int(i)], skip_special_tokens=False).strip() for i in ids]
    return [d or t for d, t in zip(decoded, tokens)]


def _title(record: dict[str, Any]) -> str:
    what = {"classification": f"class {record['label']}",
            "token_classification": f"label {record['label']} at token {record['position']}",
            "lm": f"next token {record.get('next_token')!r} after token {record['position']}"}
    title = f"{record['method']}: {what[record['kind']]} ({record['output']} {record['score']:.4g})"
    if "completeness_gap" in record:
        title += f", f(x) - f(baseline) = {record['score'] - record['baseline_score']:.4g}"
    return title


def main(argv: Sequence[str]) -> None:
    from absl import flags

    from transformer.locations import enable_compilation_cache

    FLAGS = flags.FLAGS
    del argv
    enable_compilation_cache()
    tokenizer, model = load_model(FLAGS.checkpoint)
    if tokenizer is None:
        raise FileNotFoundError(f"{FLAGS.checkpoint} has no tokenizer files; attributing text "
                                "needs them (export the model with its tokenizer)")
    try:
        record = explain(tokenizer, model, FLAGS.text, FLAGS.output, target=FLAGS.target,
                         method=FLAGS.method, steps=FLAGS.steps, baseline=FLAGS.baseline,
                         chunk_size=FLAGS.chunk_size)
    except ValueError as error:
        raise ValueError(f"{FLAGS.checkpoint}: {error}") from None
    order = np.argsort(-np.abs(record["scores"]))[:8]
    print(_title(record))
    for i in order:
        print(f"\t{record['scores'][i]:+10.4f}\t{i:4d}\t{record['tokens'][i]!r}")
    print(f"wrote attributions.json, attributions.png, attributions.html, attention.png, "
          f"rollout.png to {FLAGS.output}")


if __name__ == "__main__":
    from absl import flags

    from transformer import cli

    flags.DEFINE_string("checkpoint", None, "a fine-tuned or decoder checkpoint, or a Hugging "
                        "Face folder (a BERT classifier, or a decoder)")
    flags.DEFINE_string("text", None, "the text whose prediction to explain")
    flags.DEFINE_string("target", None, "what to explain (default: the prediction): CLASS, "
                        "POSITION or POSITION:LABEL / POSITION:TOKEN_ID")
    flags.DEFINE_enum("method", "ig", ["ig", "grad_x_input"], "integrated gradients or "
                      "gradient × input")
    flags.DEFINE_integer("steps", 50, "integrated gradients: Gauss-Legendre steps")
    flags.DEFINE_integer("chunk_size", None, "integrated gradients: steps evaluated at once "
                         "(default: all)")
    flags.DEFINE_enum("baseline", "auto", ["auto", "pad", "zero"], "integrated gradients: the "
                      "baseline's token embeddings ([PAD]'s or zeros; special tokens are kept); "
                      "auto = [PAD], else the unknown or end token, else zeros")
    flags.DEFINE_string("output", None, "folder for the JSON and the pictures")
    flags.mark_flags_as_required(["checkpoint", "text", "output"])
    cli.run(main)
