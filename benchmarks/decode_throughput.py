"""Decoding speed of GPT-2 124M (or a T5-small encoder-decoder) here, side by side with Hugging
Face's PyTorch `generate`.

    python benchmarks/decode_throughput.py [--new_tokens=128] [--batches=1,16] [--repeats=2]
    python benchmarks/decode_throughput.py --num_beams=4 --batches=1,8 --new_tokens=32 \
        [--torch_threads=1]
    python benchmarks/decode_throughput.py --model=t5-small --batches=1,8 --new_tokens=32
    python benchmarks/decode_throughput.py --model=t5-small --num_beams=4 --batches=1,8 \
        --new_tokens=32

The same weights on both sides (a GPT-2 124M with a fixed random init, saved as safetensors and
imported by `transformer.from_pretrained`), the same 32-token prompts of real text, greedy decoding
of exactly `new_tokens` tokens with the KV cache on both sides (ours: prefill + one jitted
`lax.while_loop`; theirs: `generate(do_sample=False, use_cache=True)`). Time to first token is the
time of a 1-token generation. Compilation is excluded (each shape runs once before timing). The
last line is JSON.

With --num_beams, beam search instead (ours: `beam_generate`, one jitted loop; theirs:
`generate(num_beams=...)`), both made to run exactly `new_tokens` steps (min_new_tokens =
max_new_tokens); tokens/s counts the returned best sequence's tokens per input (batch x
new_tokens / time), and the run checks that the best sequences are identical and reports the
largest difference of `sequences_scores`.

--model=t5-small: a T5 v1.0 small (60.5M parameters, 6 + 6 layers, width 512, vocabulary 32128)
with transformers' own random init (fixed seed), imported as ours; the inputs are 32 random token
ids per row (the model is random, so real text would tell nothing more); each target starts from
the decoder start token (ours: `seq2seq_generate` / `seq2seq_beam_generate`, the encoder once,
then the cached decoder loop; theirs: `T5ForConditionalGeneration.generate`).

`dense_products_tokens_per_s` (GPT-2) is how fast XLA runs only the matrix products of decoding (every
weight matrix of every layer and the output layer, float32, batch rows per token, in a jitted
loop; no attention, cache, norms or sampling): a ceiling for any XLA decoder on the machine.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must never reach the network.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # Run from anywhere.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tqdm  # noqa: E402

import transformer  # noqa: E402
from benchmarks.timing import median_time  # noqa: E402
from transformer import locations  # noqa: E402
from transformer.inference import BeamConfig, SamplingConfig, beam_generate, generate  # noqa: E402
from transformer.inference.seq2seq import seq2seq_beam_generate, seq2seq_generate  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = locations.data_dir()  # $TRANSFORMER_DATA (docs/data.md)
PROMPT = 32


def prompts(tokenizer, batch: int) -> np.ndarray:
    with gzip.open(REPO / "data" / "shakespeare" / "validation.txt.gz", "rt") as f:
        ids = np.asarray(tokenizer.encode(f.read(200_000)), np.int32)
    return ids[: batch * PROMPT].reshape(batch, PROMPT)


def dense_products(model, batch: int, tokens: int = 32) -> float:
    """Tokens/s of the decoding matrix products of a GPT-2 `model` alone (see the docstring)."""
    blocks, d, layers = model.layers.blocks, model.config.hidden_size, model.config.num_layers
    a = blocks.attention
    stacked = [a.query[...].reshape(layers, d, -1), a.key[...].reshape(layers, d, -1),
               a.value[...].reshape(layers, d, -1), a.out[...].reshape(layers, -1, d),
               blocks.mlp.wi[...], blocks.mlp.wo[...]]
    per_layer = [[m[i] for m in stacked] for i in range(layers)]
    table = model.embeddings.tokens[...]

    @jax.jit
    def run(x, per_layer, table):
        def step(carry):
            i, h = carry
            for q, k, v, o, wi, wo in per_layer:
                h = h + (h @ q + h @ k + h @ v) @ o
                h = h + (h @ wi) @ wo
                h = h / (1.0 + jnp.abs(h).max())  # Bounded: no overflow, no denormals.
            token = jnp.argmax(jnp.einsum("bd,vd->bv", h, table), axis=-1)
            return i + 1, h + 1e-6 * token[:, None]
        return jax.lax.while_loop(lambda c: c[0] < tokens, step, (0, x))[1]

    x = jnp.ones((batch, d), jnp.float32)
    run(x, per_layer, table).block_until_ready()
    return batch * tokens / median_time(lambda: run(x, per_layer, table).block_until_ready(), 3)


def beam_figures(ours, theirs, batch: int, new_tokens: int, repeats: int, bar) -> dict:
    """Beam search side by side: tokens/s of both, identical best sequences, score difference.
    `ours()` / `theirs()` return each input's best sequence [batch, new_tokens] and its score."""
    figures = {}
    for name, fn in (("jax", ours), ("pytorch", theirs)):
        tokens, scores = fn()  # Warm-up (compiles ours) and the results to compare.
        total = median_time(fn, repeats)
        bar.update(2)
        figures[name] = {"tokens_per_s": batch * new_tokens / total, "total_s": total,
                         "tokens": tokens, "scores": scores}
    same = bool(np.array_equal(figures["jax"].pop("tokens"), figures["pytorch"].pop("tokens")))
    gap = float(np.abs(figures["jax"].pop("scores") - figures["pytorch"].pop("scores")).max())
    return {**figures, "speedup": figures["jax"]["tokens_per_s"] / figures["pytorch"]["tokens_per_s"],
            "best_sequences_identical": same, "max_score_difference": gap}


class GPT2Pair:
    """GPT-2 124M on both sides; prompts of real text, the new tokens after them."""

    stop = 50256

    def __init__(self):
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        self.reference = GPT2LMHeadModel(GPT2Config()).eval()
        folder = pathlib.Path(tempfile.mkdtemp()) / "gpt2"
        self.reference.save_pretrained(folder, safe_serialization=True)
        for name in ("encoder.json", "vocab.bpe"):
            (folder / name).write_bytes((DATA / "tokenizers" / name).read_bytes())
        self.tokenizer, self.model = transformer.from_pretrained(folder)

    def inputs(self, batch: int) -> np.ndarray:
        return prompts(self.tokenizer, batch)

    def ours_greedy(self, rows, n: int) -> np.ndarray:
        config = SamplingConfig(max_new_tokens=n, temperature=0.0)
        return generate(self.model, rows, config, rng=jax.random.key(0)).tokens

    def ours_beam(self, rows, config: BeamConfig):
        return beam_generate(self.model, rows, config)

    def theirs(self, ids: np.ndarray, **kwargs):
        """transformers' generate; the new tokens (and the beam scores, when asked)."""
        import torch

        with torch.inference_mode():
            out = self.reference.generate(
                torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.ones(ids.shape),
                do_sample=False, use_cache=True, pad_token_id=0, **kwargs)
        sequences = out.sequences if hasattr(out, "sequences") else out
        new = sequences[:, self.skip(ids):].numpy()
        return (new, out.sequences_scores.numpy()) if hasattr(out, "sequences_scores") else new

    def skip(self, ids: np.ndarray) -> int:
        return ids.shape[1]  # A decoder returns the prompt before the new tokens.


class T5Pair(GPT2Pair):
    """T5-small on both sides (transformers' init); random source ids, targets from the start
    token."""

    stop = 1  # T5's EOS.

    def __init__(self):
        import torch
        from transformers import T5Config, T5ForConditionalGeneration

        torch.manual_seed(0)
        self.reference = T5ForConditionalGeneration(T5Config(
            vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
            feed_forward_proj="relu", dropout_rate=0.0, decoder_start_token_id=0,
            pad_token_id=0, eos_token_id=1)).eval()
        folder = pathlib.Path(tempfile.mkdtemp()) / "t5-small"
        self.reference.save_pretrained(folder, safe_serialization=True)
        self.tokenizer, self.model = transformer.from_pretrained(folder)

    def inputs(self, batch: int) -> np.ndarray:
        return np.random.default_rng(batch).integers(2, 32000, (batch, PROMPT)).astype(np.int32)

    def ours_greedy(self, rows, n: int) -> np.ndarray:
        config = SamplingConfig(max_new_tokens=n, temperature=0.0)
        return seq2seq_generate(self.model, rows, config, rng=jax.random.key(0)).tokens

    def ours_beam(self, rows, config: BeamConfig):
        return seq2seq_beam_generate(self.model, rows, config)

    def skip(self, ids: np.ndarray) -> int:
        return 1  # The decoder start token.


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--torch_threads", type=int, default=os.cpu_count() or 1,
                        help="PyTorch's threads (on a loaded machine 1 may be the faster)")
    parser.add_argument("--num_beams", type=int, default=0, help="beam search of this width "
                        "instead of greedy decoding (0 = greedy)")
    parser.add_argument("--model", choices=("gpt2", "t5-small"), default="gpt2",
                        help="GPT-2 124M, or a T5-small encoder-decoder")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.torch_threads)
    pair = GPT2Pair() if args.model == "gpt2" else T5Pair()

    result = {"model": args.model, "new_tokens": args.new_tokens, "prompt_tokens": PROMPT,
              "torch_threads": args.torch_threads, "load_average": os.getloadavg()[0]}
    batches = [int(b) for b in args.batches.split(",")]
    if args.num_beams:
        result["num_beams"] = args.num_beams
        with tqdm.tqdm(total=len(batches) * 4, unit="run") as bar:
            for batch in batches:
                ids, n = pair.inputs(batch), args.new_tokens
                rows = [list(r) for r in ids]
                config = BeamConfig(num_beams=args.num_beams, max_new_tokens=n, min_new_tokens=n,
                                    stop_tokens=(pair.stop,), pad_id=0)

                def ours(rows=rows, config=config):
                    out = pair.ours_beam(rows, config)
                    return out.tokens[:, 0], out.scores[:, 0]

                def theirs(ids=ids, n=n):
                    return pair.theirs(ids, num_beams=args.num_beams, max_new_tokens=n,
                                       min_new_tokens=n, eos_token_id=pair.stop,
                                       output_scores=True, return_dict_in_generate=True)

                result[f"batch_{batch}"] = beam_figures(ours, theirs, batch, n, args.repeats, bar)
        for batch in batches:
            r = result[f"batch_{batch}"]
            print(f"beam {args.num_beams}, batch {batch:>2}: jax {r['jax']['tokens_per_s']:7.1f} "
                  f"tok/s | pytorch {r['pytorch']['tokens_per_s']:7.1f} tok/s | "
                  f"×{r['speedup']:.2f} | best sequences identical: "
                  f"{r['best_sequences_identical']} | max score difference "
                  f"{r['max_score_difference']:.1e}")
        print(json.dumps(result))
        return
    with tqdm.tqdm(total=len(batches) * 4, unit="run") as bar:
        for batch in batches:
            ids = pair.inputs(batch)
            rows = [list(r) for r in ids]

            def ours(n: int, rows=rows) -> np.ndarray:
                return pair.ours_greedy(rows, n)

            def theirs(n: int, ids=ids) -> np.ndarray:
                return pair.theirs(ids, max_new_tokens=n, min_new_tokens=n)

            figures = {}
            for name, fn in (("jax", ours), ("pytorch", theirs)):
                tokens = fn(args.new_tokens)  # Warm-up (compiles ours) and the tokens to compare.
                fn(1)
                total = median_time(lambda fn=fn: fn(args.new_tokens), args.repeats)
                bar.update()
                first = median_time(lambda fn=fn: fn(1), args.repeats)
                bar.update()
                figures[name] = {"tokens_per_s": batch * args.new_tokens / total,
                                 "time_to_first_token_s": first, "total_s": total, "tokens": tokens}
            agree = float(np.mean(figures["jax"].pop("tokens") == figures["pytorch"].pop("tokens")))
            result[f"batch_{batch}"] = {
                **figures,
                "dense_products_tokens_per_s": (dense_products(pair.model, batch)
                                                if args.model == "gpt2" else None),
                "speedup": figures["jax"]["tokens_per_s"] / figures["pytorch"]["tokens_per_s"],
                "greedy_tokens_identical": agree,
            }
    for batch in batches:
        r = result[f"batch_{batch}"]
        print(f"batch {batch:>2}: jax {r['jax']['tokens_per_s']:8.1f} tok/s "
              f"(first token {r['jax']['time_to_first_token_s'] * 1e3:.0f} ms) | pytorch "
              f"{r['pytorch']['tokens_per_s']:8.1f} tok/s (first token "
              f"{r['pytorch']['time_to_first_token_s'] * 1e3:.0f} ms) | ×{r['speedup']:.2f} | "
              f"greedy tokens identical {r['greedy_tokens_identical']:.0%}"
              + (f" | XLA matrix products alone {r['dense_products_tokens_per_s']:.1f} tok/s"
                 if r["dense_products_tokens_per_s"] else ""))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
