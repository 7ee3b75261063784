"""Decoding speed of GPT-2 124M here, side by side with Hugging Face's PyTorch `generate`.

    python benchmarks/decode_throughput.py [--new_tokens=128] [--batches=1,16] [--repeats=2]
    python benchmarks/decode_throughput.py --num_beams=4 --batches=1,8 --new_tokens=32 \
        [--torch_threads=1]

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

`dense_products_tokens_per_s` is how fast XLA runs only the matrix products of decoding (every
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


def beam_figures(model, reference, ids: np.ndarray, num_beams: int, new_tokens: int,
                 repeats: int, bar) -> dict:
    """Beam search side by side: tokens/s of both, identical best sequences, score difference."""
    import torch

    batch = ids.shape[0]
    config = BeamConfig(num_beams=num_beams, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        stop_tokens=(50256,), pad_id=0)
    rows = [list(r) for r in ids]

    def ours():
        out = beam_generate(model, rows, config)
        return out.tokens[:, 0], out.scores[:, 0]

    def theirs():
        with torch.inference_mode():
            out = reference.generate(
                torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.ones(ids.shape),
                num_beams=num_beams, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, use_cache=True, eos_token_id=50256, pad_token_id=0,
                output_scores=True, return_dict_in_generate=True)
        return out.sequences[:, PROMPT:].numpy(), out.sequences_scores.numpy()

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--torch_threads", type=int, default=os.cpu_count() or 1,
                        help="PyTorch's threads (on a loaded machine 1 may be the faster)")
    parser.add_argument("--num_beams", type=int, default=0, help="beam search of this width "
                        "instead of greedy decoding (0 = greedy)")
    args = parser.parse_args()

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    torch.set_num_threads(args.torch_threads)
    reference = GPT2LMHeadModel(GPT2Config()).eval()
    folder = pathlib.Path(tempfile.mkdtemp()) / "gpt2"
    reference.save_pretrained(folder, safe_serialization=True)
    for name in ("encoder.json", "vocab.bpe"):
        (folder / name).write_bytes((DATA / "tokenizers" / name).read_bytes())
    tokenizer, model = transformer.from_pretrained(folder)

    result = {"new_tokens": args.new_tokens, "prompt_tokens": PROMPT,
              "torch_threads": args.torch_threads, "load_average": os.getloadavg()[0]}
    batches = [int(b) for b in args.batches.split(",")]
    if args.num_beams:
        result["num_beams"] = args.num_beams
        with tqdm.tqdm(total=len(batches) * 4, unit="run") as bar:
            for batch in batches:
                result[f"batch_{batch}"] = beam_figures(model, reference, prompts(tokenizer, batch),
                                                        args.num_beams, args.new_tokens,
                                                        args.repeats, bar)
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
            ids = prompts(tokenizer, batch)
            rows = [list(r) for r in ids]

            def ours(n: int, rows=rows) -> np.ndarray:
                config = SamplingConfig(max_new_tokens=n, temperature=0.0)
                return generate(model, rows, config, rng=jax.random.key(0)).tokens

            def theirs(n: int, ids=ids) -> np.ndarray:
                with torch.inference_mode():
                    out = reference.generate(
                        torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.ones(ids.shape),
                        max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                        pad_token_id=0)
                return out[:, PROMPT:].numpy()

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
                "dense_products_tokens_per_s": dense_products(model, batch),
                "speedup": figures["jax"]["tokens_per_s"] / figures["pytorch"]["tokens_per_s"],
                "greedy_tokens_identical": agree,
            }
    for batch in batches:
        r = result[f"batch_{batch}"]
        print(f"batch {batch:>2}: jax {r['jax']['tokens_per_s']:8.1f} tok/s "
              f"(first token {r['jax']['time_to_first_token_s'] * 1e3:.0f} ms) | pytorch "
              f"{r['pytorch']['tokens_per_s']:8.1f} tok/s (first token "
              f"{r['pytorch']['time_to_first_token_s'] * 1e3:.0f} ms) | ×{r['speedup']:.2f} | "
              f"XLA matrix products alone {r['dense_products_tokens_per_s']:.1f} tok/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
