"""Relation classification (SemEval-2010 Task 8): a pretrained BERT reads the sentence with its
entity markers (<e1> ... </e1>, <e2> ... </e2> as BERT's [unused0-3] tokens); a linear layer
classifies the concatenated states at the two entity-start markers into 19 directed relations.
Scored with the official macro-F1 over the 9 relations (direction-aware, Other excluded).

    python -m transformer.convert import --hf_dir=$(python -c "from transformer.train.config \
        import minilm_dir; print(minilm_dir())") --output=/tmp/minilm
    python -m transformer.main --config=configs/relation.py --workdir=/tmp/semeval \
        --config.init_from=/tmp/minilm
    python -m transformer.evaluate --config=configs/relation.py --checkpoint=/tmp/semeval/best

A sentence without one of its four markers stops the run naming its file and line (or, with
data.on_error=skip, is counted and reported). Variants: `semeval` (default:
$TRANSFORMER_DATA/relation/), `ci` (a tiny random model on the repository's SemEval sample).
"""

from configs.variants import parse as parse_variants
from transformer import locations
from transformer.train.config import epoch_schedule, finetune_config, tiny_finetune


def get_config(arg: str = "semeval"):
    variants = parse_variants(arg, ["semeval", "ci"], "relation")
    c = finetune_config("relation", "semeval2010_task8")
    c.init_from = ""  # Our model checkpoint to fine-tune (python -m transformer.convert import).
    c.data.local_format = "semeval"  # The release format: id + quoted sentence, label, comment.
    root = locations.sample("semeval") if "ci" in variants else locations.dataset("relation")
    c.data.local_files.train = str(root / "TRAIN_FILE.TXT")
    c.data.local_files.test = str(root / "TEST_FILE_FULL.TXT")
    c.data.eval_split = "test"  # SemEval has no validation split; papers report test.
    c.data.max_length = 128  # Tokens per sentence (an entity beyond it is an error).
    c.data.global_batch_size = 32  # Sentences per step.
    c.learning_rate = 5e-5  # Peak, after warmup; then linear decay to 0.
    epoch_schedule(c, 8000, epochs=5)  # 10% warmup; evaluate every epoch and at the end.
    if "ci" in variants:
        tiny_finetune(c)
    return c
