"""The CrowS-Pairs bias probe: how often a model prefers the more stereotyping sentence of a pair.

  python -m transformer.bias --checkpoint=path/to/model                    # all 1,508 pairs
  python -m transformer.bias --checkpoint=path/to/model --output=/tmp/bias  # + JSON, CSV, plot

Masked LMs (encoders with their masked-LM head) get the paper's score: the pseudo-log-likelihood
of the tokens the two sentences share, each masked alone (Nangia et al., 2020). Causal LMs get the
sentence log-likelihood: the sum of log p(token | the tokens before it) over every token of the
sentence (a BOS token is prepended where the tokenizer has one, so the first word is scored too);
it is a plain sum, not normalised by length. The metric score is the percentage of pairs where the
more stereotyping sentence scores higher (50 = no preference), overall and per bias type, with
percentile-bootstrap intervals (`transformer.metrics.crows_pairs`). `--checkpoint` takes what
`transformer.score` takes: our checkpoint or a Hugging Face folder, with its tokenizer.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from transformer.metrics.crows_pairs import (
    CrowsPair,
    crows_pairs_summary,
    pair_outcomes,
    read_crows_pairs,
    shared_positions,
)

DATASET = ("bias", "crows_pairs", "crows_pairs_anonymized.csv")  # under transformer.locations


def probe_kind(model: Any, tokenizer: Any) -> str:
    """'masked' or 'causal': which score the model supports; raises, naming the fix, otherwise."""
    from transformer.inference.masked_scoring import check_masked_lm

    if model.config.architecture == "decoder":
        return "causal"
    check_masked_lm(model, tokenizer.mask_id)
    return "masked"


def _with_special_tokens(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    ids, _, special = tokenizer.add_special_tokens(tokenizer.encode(text))
    return ids, special


def masked_sentence_scores(tokenizer: Any, model: Any, pairs: Sequence[CrowsPair], *,
                           batch_size: int = 64, progress: Any = None) -> tuple[list, list]:
    """Per pair, the pseudo-log-likelihoods of sent_more and sent_less over their shared tokens.

    The special tokens ([CLS], [SEP]) are shared but never masked: for BERT that is the authors'
    `range(1, N - 1)` over the shared positions."""
    from transformer.inference.masked_scoring import masked_token_logprobs

    sequences, positions = [], []
    for pair in pairs:
        (more, more_special), (less, less_special) = (
            _with_special_tokens(tokenizer, pair.sent_more),
            _with_special_tokens(tokenizer, pair.sent_less))
        in_more, in_less = shared_positions(more, less)
        kept = [(a, b) for a, b in zip(in_more, in_less) if not more_special[a] and not less_special[b]]
        sequences += [more, less]
        positions += [[a for a, _ in kept], [b for _, b in kept]]
    if progress is not None:
        progress.reset(total=sum(len(p) for p in positions))
    logprobs = masked_token_logprobs(model, sequences, positions, tokenizer.mask_id,
                                     batch_size=batch_size, progress=progress)
    sums = [float(lp.astype("float64").sum()) for lp in logprobs]
    return sums[0::2], sums[1::2]


def causal_sentence_ids(tokenizer: Any, text: str) -> list[int]:
    """The token ids a causal LM scores: BOS (when the tokenizer has one) + the sentence."""
    ids, _ = _with_special_tokens(tokenizer, text)
    if tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
        ids = [tokenizer.bos_id, *ids]
    return ids


def causal_sentence_scores(tokenizer: Any, model: Any, pairs: Sequence[CrowsPair], *,
                           batch_size: int = 16, progress: Any = None) -> tuple[list, list]:
    """Per pair, the log-likelihoods (sums over tokens) of sent_more and sent_less."""
    from transformer.inference.scoring import sequence_logprobs

    rows = [causal_sentence_ids(tokenizer, s) for p in pairs for s in (p.sent_more, p.sent_less)]
    if progress is not None:
        progress.reset(total=len(rows))
    logprobs = sequence_logprobs(model, rows, batch_size=batch_size, progress=progress)
    sums = [float(sum(lp)) for lp in logprobs]
    return sums[0::2], sums[1::2]


def sentence_scores(tokenizer: Any, model: Any, pairs: Sequence[CrowsPair], *,
                    batch_size: int = 64, progress: Any = None) -> tuple[str, list, list]:
    """(kind, sent_more scores, sent_less scores) with the score the model supports."""
    kind = probe_kind(model, tokenizer)
    score = masked_sentence_scores if kind == "masked" else causal_sentence_scores
    return (kind, *score(tokenizer, model, pairs, batch_size=batch_size, progress=progress))


def report(summary: dict[str, Any], out: TextIO = sys.stdout) -> None:
    share = lambda value: "   -  " if value is None else f"{value:6.2f}"

    def line(name: str, s: dict[str, Any]) -> str:
        low, high = s["ci"]
        return (f"{name:<20} {s['metric_score']:6.2f}  [{low:6.2f}, {high:6.2f}]  "
                f"{share(s['stereo_score'])}  {share(s['antistereo_score'])}  "
                f"{s['num_pairs']:>5}  {s['num_neutral']:>7}")

    level = round(100 * summary["bootstrap"]["confidence"])
    out.write(f"{'bias type':<20} {'score':>6}  {f'{level}% CI':^16}  {'stereo':>6}  {'anti':>6}  "
              f"{'pairs':>5}  {'neutral':>7}\n")
    out.write(line("all", summary["overall"]) + "\n")
    for name, s in summary["by_bias_type"].items():
        out.write(line(name, s) + "\n")


def plot_summary(summary: dict[str, Any], path: str | os.PathLike, title: str) -> None:
    """Per-bias-type metric scores with their intervals, the overall one first; 50 % marked."""
    from matplotlib.figure import Figure

    from transformer import paths

    groups = [("all", summary["overall"]), *summary["by_bias_type"].items()]
    names = [f"{n} (n={s['num_pairs']})" for n, s in groups]
    scores = [s["metric_score"] for _, s in groups]
    errors = [[s["metric_score"] - s["ci"][0] for _, s in groups],
              [s["ci"][1] - s["metric_score"] for _, s in groups]]
    figure = Figure(figsize=(7, 0.45 * len(groups) + 1.5), dpi=120)
    axes = figure.add_subplot()
    rows = range(len(groups))[::-1]
    colors = ["tab:gray"] + ["tab:blue"] * (len(groups) - 1)
    axes.barh(rows, scores, xerr=errors, color=colors, capsize=3)
    axes.axvline(50, color="black", linestyle="--", linewidth=1, label="no preference (50 %)")
    axes.set_yticks(list(rows), names)
    axes.set_xlim(0, 100)
    axes.set_xlabel("pairs where the more stereotyping sentence scores higher (%)")
    axes.set_title(title)
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    paths.save_figure(figure, path)


def write_outputs(output: str | os.PathLike, summary: dict[str, Any], pairs: Sequence[CrowsPair],
                  more: Sequence[float], less: Sequence[float], title: str) -> None:
    """summary.json, per-pair scores.csv and scores.png in the `output` folder."""
    folder = pathlib.Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(folder / "scores.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["sent_more", "sent_less", "sent_more_score", "sent_less_score", "score",
                         "stereo_antistereo", "bias_type"])
        for pair, m, s, o in zip(pairs, more, less, pair_outcomes(more, less)):
            writer.writerow([pair.sent_more, pair.sent_less, f"{m:.6f}", f"{s:.6f}", max(int(o), 0),
                             pair.direction, pair.bias_type])
    plot_summary(summary, folder / "scores.png", title)


def probe(checkpoint: str | os.PathLike, *, data: str | os.PathLike | None = None,
          output: str | os.PathLike | None = None, batch_size: int = 64, num_samples: int = 1000,
          seed: int = 0, limit: int | None = None, quantize: str | None = None,
          out: TextIO = sys.stdout) -> dict[str, Any]:
    """Loads the checkpoint, scores the pairs, writes the report (and the `output` files);
    returns the summary, with the per-pair scores under 'sent_more_scores' / 'sent_less_scores'."""
    from tqdm import tqdm

    from transformer import locations
    from transformer.pretrained import from_pretrained

    data = pathlib.Path(data) if data else locations.dataset(*DATASET)
    if not data.is_file():
        raise locations.missing_dataset(data)
    pairs = read_crows_pairs(data)[:limit]
    tokenizer, model = from_pretrained(checkpoint, quantize=quantize)
    if tokenizer is None:
        raise ValueError(f"{checkpoint} has no tokenizer files; the bias probe needs them")
    probe_kind(model, tokenizer)  # A model the probe cannot score fails before any work.
    with tqdm(desc="crows-pairs", unit="row") as progress:
        kind, more, less = sentence_scores(tokenizer, model, pairs, batch_size=batch_size,
                                           progress=progress)
    summary = crows_pairs_summary(pairs, more, less, num_samples=num_samples, seed=seed)
    summary.update(checkpoint=str(checkpoint), data=str(data), score=kind)
    name = "pseudo-log-likelihood (masked LM)" if kind == "masked" else "log-likelihood (causal LM)"
    out.write(f"CrowS-Pairs, {len(pairs)} pairs, {name}: {checkpoint}\n")
    report(summary, out)
    if output:
        title = f"CrowS-Pairs, {'/'.join(pathlib.Path(checkpoint).parts[-2:])} ({kind} LM)"
        write_outputs(output, summary, pairs, more, less, title)
        out.write(f"wrote {output}/summary.json, scores.csv, scores.png\n")
    return {**summary, "sent_more_scores": more, "sent_less_scores": less}


def main(argv: Sequence[str]) -> None:
    from absl import flags

    from transformer.locations import enable_compilation_cache

    FLAGS = flags.FLAGS
    del argv
    enable_compilation_cache()
    probe(FLAGS.checkpoint, data=FLAGS.data, output=FLAGS.output, batch_size=FLAGS.batch_size,
          num_samples=FLAGS.bootstrap, seed=FLAGS.seed, limit=FLAGS.limit, quantize=FLAGS.quantize)


if __name__ == "__main__":
    from absl import flags

    from transformer import cli

    flags.DEFINE_string("checkpoint", None, "our checkpoint directory or a Hugging Face folder")
    flags.DEFINE_enum("quantize", None, ["int8", "int4"],
                      "weight-only quantization of the loaded model (transformer.quantize)")
    flags.DEFINE_string("data", None, "a CrowS-Pairs CSV (default: $TRANSFORMER_DATA/"
                        + "/".join(DATASET) + ")")
    flags.DEFINE_string("output", None, "folder for summary.json, scores.csv and scores.png")
    flags.DEFINE_integer("batch_size", 64, "rows (masked variants or sentences) per forward pass")
    flags.DEFINE_integer("bootstrap", 1000, "bootstrap resamples for the confidence intervals")
    flags.DEFINE_integer("seed", 0, "seed of the bootstrap")
    flags.DEFINE_integer("limit", None, "score only the first N pairs (a quick look)")
    flags.mark_flag_as_required("checkpoint")
    cli.run(main)
