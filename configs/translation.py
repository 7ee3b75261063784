"""Machine translation on Multi30K (de→en by default): a small T5-style encoder-decoder trained
from scratch, with a SentencePiece vocabulary trained on the training split (both languages) at
first run; sacreBLEU and chrF of greedy translations of test2016.

    python -m transformer.main --config=configs/translation.py --workdir=/tmp/multi30k
    # Any pair and direction of de, en, fr:
    python -m transformer.main --config=configs/translation.py:en_de --workdir=/tmp/multi30k-en-de
    python -m transformer.main --config=configs/translation.py --workdir=/tmp/mt-fr-en \
        --config.seq2seq.source_lang=fr --config.seq2seq.target_lang=en \
        --config.data.tokenizer=$HOME/.cache/transformer/tokenizers/multi30k_fr_en_sp8000.model \
        --config.tokenizer_training.files=$TRANSFORMER_DATA/translation/multi30k/train.fr.gz,$TRANSFORMER_DATA/translation/multi30k/train.en.gz
    # Tiny, a few steps, on the repository's Multi30K sample (evaluates on its validation part):
    python -m transformer.main --config=configs/translation.py:ci --workdir=/tmp/mt-ci

The data are `$TRANSFORMER_DATA/translation/multi30k/{train,val,test_2016_flickr}.{de,en,fr}.gz`
(aligned line files: `data.local_format='parallel'`). The run evaluates on test2016
(`data.eval_split='test'`) every `eval_every` steps and at the end; `WORKDIR/eval/predictions.jsonl`
holds the translations. Variants: `de_en` (the default), `en_de`, `ci`.
"""

from configs.seq2seq_base import t5_from_scratch, tiny
from configs.variants import parse as parse_variants
from transformer import locations


def get_config(arg: str = "de_en"):
    variants = parse_variants(arg, ["de_en", "en_de", "ci"], "translation")
    source, target = ("en", "de") if "en_de" in variants else ("de", "en")
    ci = "ci" in variants
    c = t5_from_scratch(max_length=128)  # 3 + 3 layers, width 256: 7.6M parameters.
    c.seq2seq.source_lang, c.seq2seq.target_lang = source, target
    c.seq2seq.max_target_length = 64  # Decoder row tokens (Multi30K captions: ~15 tokens).
    c.seq2seq.metrics = "bleu,chrf"  # sacreBLEU's defaults (13a tokenizer, cased).
    root = locations.sample("multi30k") if ci else locations.dataset("translation", "multi30k")
    c.data.local_format = "parallel"  # PREFIX.<source_lang>(.gz) line i ↔ PREFIX.<target_lang>.
    c.data.local_files.train = str(root / "train")
    c.data.local_files.validation = str(root / "val")
    if not ci:
        c.data.local_files.test = str(root / "test_2016_flickr")
    c.data.eval_split = "validation" if ci else "test"  # test2016, the usual benchmark.
    c.data.max_length = 64  # Encoder row tokens; several captions are packed per row.
    c.data.global_batch_size = 64  # Packed rows per step (~4 caption pairs each).
    pair = "_".join(sorted((source, target)))
    c.tokenizer_training.files = ",".join(str(root / f"train.{lang}{'' if ci else '.gz'}")
                                          for lang in (source, target))
    c.data.tokenizer = str(locations.cache_dir("tokenizers") / f"multi30k_{pair}_sp8000.model")
    c.finetune.best_metric = "eval_bleu"
    if ci:
        tiny(c, str(locations.cache_dir("tokenizers") / f"multi30k_{pair}_ci_sp400.model"))
        c.seq2seq.max_decode_length = 16
    return c
