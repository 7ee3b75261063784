"""Knowledge distillation on SST-2: a fine-tuned all-MiniLM-L6-v2 teacher (configs/glue.py) → a
3-layer student made of the teacher's layers 0, 2, 4 (as DistilBERT initializes), trained on
α · T² · KL(teacher_T ‖ student_T) + (1 − α) · CE(labels) (transformer/train/objectives/distill.py).

    python -m transformer.main --config=configs/glue.py:sst2 --workdir=/tmp/sst2 \
        --config.init_from=/tmp/minilm                  # the teacher: /tmp/sst2/best
    python -m transformer.main --config=configs/distill.py:sst2 --workdir=/tmp/sst2_distill \
        --config.distill.teacher=/tmp/sst2/best
    python -m transformer.main --config=configs/distill.py:control --workdir=/tmp/sst2_control \
        --config.distill.teacher=/tmp/sst2/best         # same student, α = 0 (no distillation)

Variants (comma-separated): `sst2` (the default), `transfer` (each step adds 32 sentences of
`--config.distill.transfer_file` that the student learns from the teacher alone, and the hidden
state cosine term, β = 1), `control` (the same student and its initialization, trained on the
labels alone, with neither), `ci` (a tiny random teacher/student, a few steps, on
the repository's SST-2 sample; `distill.teacher` still names the teacher checkpoint).
benchmarks/distill.py runs all three SST-2 runs and measures the speed-up. Measured there
(2-core CPU, 1,000 labelled examples, a teacher of 80.73 %): `sst2,transfer` with 2,304 transfer
sentences, 72 steps, 3 seeds: 76.80 % (95.1 % of the teacher); `control`: 76.49 %; the 3-layer
student runs 2.06× the teacher's speed.
"""

import importlib.util
import pathlib

from configs.variants import parse as parse_variants
from transformer.train.objectives.distill import default_config


def _glue(arg):
    spec = importlib.util.spec_from_file_location(
        "recipe_glue", pathlib.Path(__file__).resolve().parent / "glue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str = "sst2"):
    variants = parse_variants(arg, ["sst2", "ci", "control", "transfer"], "distill") or ["sst2"]
    c = _glue("sst2,ci" if "ci" in variants else "sst2")  # Data, optimizer, schedule, evaluation.
    tiny_tokenizer = c.data.tokenizer
    c.objective = "distill_classification"  # The student learns the task's labels and the teacher.
    c.distill = default_config()
    c.distill.teacher = ""  # The fine-tuned teacher: WORKDIR/best of the configs/glue.py run.
    c.distill.temperature = 2.0  # T of both softmaxes.
    c.distill.alpha = 0.7  # Weight of T²·KL(teacher ‖ student); labels get 1 − α.
    c.distill.beta = 0.0  # Weight of the cosine loss between last hidden states (same width).
    c.distill.student_layers = "0,2,4"  # Every other teacher layer: a 3-layer student.
    c.data.tokenizer = ""  # "" = the teacher's tokenizer/.
    if "ci" in variants:
        c.distill.student_layers = "0"  # The tiny teacher has 2 layers.
        c.data.tokenizer = tiny_tokenizer  # The WordPiece vocabulary of the tiny models.
    if "transfer" in variants:  # More sentences, learnt from the teacher alone (DistilBERT-style).
        c.distill.transfer_file = ""  # Set it: a TSV of the task's columns (labels are not read).
        c.distill.transfer_batch_size = 32  # Transfer sentences added to each labelled batch.
        c.distill.beta = 1.0  # And the cosine of the last hidden states (one width).
    if "control" in variants:
        c.distill.alpha = 0.0  # No teacher in the loss: the labels alone.
        c.distill.beta = 0.0
    return c
