"""The bundled Shakespeare corpus (data/shakespeare/) as a recipe's data: shared by the CPU-sized
variants. Not a recipe itself."""

import pathlib

import ml_collections

from transformer import locations

CORPUS = pathlib.Path(__file__).resolve().parents[1] / "data" / "shakespeare"


def use_bundled_corpus(c: ml_collections.ConfigDict, *, vocab_size: int = 4096,
                       max_length: int = 128, batch_size: int = 16) -> None:
    """Train on the plays up to Twelfth Night, evaluate on the last two; one document per
    blank-line block; a SentencePiece tokenizer trained on the training text at first run."""
    c.model.vocab_size = vocab_size
    c.tokenizer_training.files = str(CORPUS / "train.txt.gz")
    c.tokenizer_training.vocab_size = vocab_size
    # Trained once, then reused by every run: in the user cache, never in the source tree.
    c.data.tokenizer = str(locations.cache_dir("tokenizers") / f"shakespeare_sp{vocab_size}.model")
    c.data.cache_dir = ""  # Prepared datasets: the user cache too (transformer.locations).
    c.data.dataset = ""
    c.data.local_format = "text"
    c.data.local_options.document = "blank_line"
    c.data.local_files.train = str(CORPUS / "train.txt.gz")
    c.data.local_files.validation = str(CORPUS / "validation.txt.gz")
    c.data.max_length = max_length
    c.data.global_batch_size = batch_size
    c.mesh.update({"data": 1, "fsdp": -1, "tensor": 1})
