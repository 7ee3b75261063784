"""Training objectives by name (`config.objective`), one module per family, each registering its
own in `registry` (the one module the training loop needs). Importing this package imports every
objective module, so all are registered.

  lm                    pretraining: causal or masked LM (`data.objective`), packed rows (lm.py)
  classification        sequence (pair) classification: pooled features → labels (tasks.py)
  token_classification  a label per token (NER), later subwords and padding ignored (-100)
  qa                    extractive QA: start/end logits, SQuAD windows
  relation              relation classification from the two entity-start markers
  distill_*             knowledge distillation from a frozen teacher (distill.py)
  sft                   supervised fine-tuning on chat conversations (sft.py)
  seq2seq               encoder-decoder teacher forcing on (source, target) pairs (seq2seq.py)
  span_corruption       T5 span-corruption pretraining of an encoder-decoder (seq2seq.py)

No objective imports the training loop: what they share with it (`to_global`,
`any_process_has`) lives in transformer/train/distributed.py, and the loop hands the step its
objective (transformer/train/step.py).
"""

from transformer.train.objectives import distill, lm, seq2seq, sft, tasks  # noqa: F401  (registration)
from transformer.train.objectives.registry import (  # noqa: F401
    BEST_METRIC,
    OBJECTIVES,
    Batch,
    Builder,
    Objective,
    get_objective,
    mean_of,
    register,
)
from transformer.train.objectives.tasks import (  # noqa: F401
    _task_loss,
    best_metric,
    forward,
    head_config,
    pack_row_multiple,
    placement,
    task_of,
)
