"""Held-out answers of an instruction-tuned decoder: greedy replies to SQuAD questions, rendered
with the model's chat template, scored with the official SQuAD exact match and F1.

    python benchmarks/sft_answers.py --checkpoint=/tmp/sft/model --questions=300
    python benchmarks/sft_answers.py --checkpoint=/tmp/llama-tiny/model --chat_template=inst

The questions are the first `--questions` of the dev file that configs/sft.py evaluates on (the
conversations of `transformer.data.instructions`, without the assistant's reply). A model whose
tokenizer has no chat template (a base model before tuning) is given `--chat_template`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # Run from anywhere.

from transformer import locations  # noqa: E402
from transformer.data import chat, instructions  # noqa: E402
from transformer.inference import generate  # noqa: E402
from transformer.inference.sampling import SamplingConfig  # noqa: E402
from transformer.metrics.squad import squad_em_f1  # noqa: E402
from transformer.pretrained import from_pretrained  # noqa: E402


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="our model checkpoint directory")
    parser.add_argument("--questions", type=int, default=300, help="held-out questions to answer")
    parser.add_argument("--dev", default=str(locations.dataset("squad", "dev-v1.1.json.gz")))
    parser.add_argument("--chat_template", default="inst",
                        help="template for a tokenizer without one (a bundled name or a .jinja)")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)

    tokenizer, model = from_pretrained(args.checkpoint)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = chat.template_from_file(args.chat_template, tokenizer)
    records = list(instructions.conversations(args.dev, "squad", limit=args.questions))
    prompts = [tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True)
               for r in records]
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0,
                              stop_tokens=tuple(tokenizer.chat_template.stop_ids),
                              pad_id=tokenizer.pad_id or 0)
    predictions, start = {}, time.perf_counter()
    for i in tqdm(range(0, len(records), args.batch), desc="answers", unit="batch"):
        chunk = records[i:i + args.batch]
        out = generate(model, prompts[i:i + args.batch], sampling)
        for record, tokens, length in zip(chunk, out.tokens, out.lengths):
            predictions[record["source"]] = tokenizer.decode([int(t) for t in tokens[:length]]).strip()
    scores = squad_em_f1(predictions, {r["source"]: r["answers"] for r in records})
    examples = [{"question": r["messages"][1]["content"].split("\nQuestion: ")[-1],
                 "answer": r["answers"][0], "reply": predictions[r["source"]]} for r in records[:5]]
    result = {"checkpoint": args.checkpoint, "questions": len(records),
              "exact_match": round(scores["exact_match"], 2), "f1": round(scores["f1"], 2),
              "seconds": round(time.perf_counter() - start, 1), "examples": examples}
    print(json.dumps(result, ensure_ascii=False))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
