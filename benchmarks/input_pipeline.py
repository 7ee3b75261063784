"""Pretraining input-pipeline throughput (tokens/s): tokenize + pack, causal LM and masked LM.

    python benchmarks/input_pipeline.py [--worker_count=N] [--max_length=512] [--batch_size=32]

Reads the Shakespeare corpus ($TRANSFORMER_DATA/lm/shakespeare.txt.gz, one document per blank-line
block) with GPT-2 byte-level BPE, one epoch per variant, and prints a JSON line at the end.
Tokens counted are row slots (batch × length), padding included; `real_tokens_per_s` excludes it.
GPT-2 has no mask token: the masked-LM variant uses the first id past the vocabulary (a row of
the padded embedding table), which costs the same as a real one.
"""

import argparse
import json
import pathlib
import sys
import tempfile
import time

from absl import flags
from tqdm import tqdm

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from transformer import locations  # noqa: E402
from transformer.data import pipeline  # noqa: E402
from transformer.data.tokenizer import load_tokenizer  # noqa: E402

DATA = locations.data_dir()  # $TRANSFORMER_DATA (docs/data.md)


def run(config, tokenizer, name: str) -> dict:
    ds = pipeline.create_pretraining_dataset(config, "train", tokenizer=tokenizer)
    it = iter(ds)
    start = time.perf_counter()
    first = None
    rows = real = 0
    for batch in tqdm(it, desc=name, unit="batch"):
        if first is None:
            first = time.perf_counter() - start
        rows += batch["inputs"].shape[0]
        real += int((batch["segment_ids"] > 0).sum())
    seconds = time.perf_counter() - start
    it.close()
    slots = rows * config.max_length
    return {
        "tokens_per_s": round(slots / seconds),
        "real_tokens_per_s": round(real / seconds),
        "tokens": slots,
        "seconds": round(seconds, 2),
        "first_batch_s": round(first or 0.0, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    defaults = pipeline.default_config()
    parser.add_argument("--worker_count", type=int, default=defaults.worker_count)
    parser.add_argument("--max_length", type=int, default=defaults.max_length)
    parser.add_argument("--batch_size", type=int, default=defaults.global_batch_size)
    parser.add_argument("--cache_dir", default=str(pathlib.Path(tempfile.gettempdir()) / "bench"))
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags

    config = pipeline.default_config()
    config.tokenizer = str(DATA / "tokenizers" / "encoder.json")
    config.local_format = "text"
    config.local_files.train = str(DATA / "lm" / "shakespeare.txt.gz")
    config.local_options.document = "blank_line"
    config.cache_dir = args.cache_dir
    config.max_length = args.max_length
    config.global_batch_size = args.batch_size
    config.worker_count = args.worker_count
    config.num_epochs = 1
    tokenizer = load_tokenizer(config.tokenizer)

    start = time.perf_counter()
    pipeline.open_source(config, "train")  # builds (or reuses) the ArrayRecord dataset
    build_s = time.perf_counter() - start

    results = {"causal": run(config, tokenizer, "causal")}
    config.objective = "mlm"
    tokenizer.mask_id = tokenizer.vocab_size
    results["mlm"] = run(config, tokenizer, "mlm")
    print(json.dumps({
        "benchmark": "input_pipeline", "corpus": "shakespeare", "tokenizer": "gpt2-bpe",
        "worker_count": config.worker_count, "max_length": config.max_length,
        "batch_size": config.global_batch_size, "build_or_load_dataset_s": round(build_s, 2),
        **results,
    }))


if __name__ == "__main__":
    main()
