"""Convert between Hugging Face folders and our model checkpoint format.

  python -m transformer.convert import --hf_dir=path/to/hf-folder --output=path/to/checkpoint
  python -m transformer.convert export --checkpoint=path/to/checkpoint --output=path/to/hf-folder

Import reads only safetensors (never pickle) and keeps the tokenizer files and, for
sentence-transformers folders, the pooling; export writes config.json, model.safetensors and the
tokenizer files, which `transformers.AutoModel.from_pretrained` loads as they are.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Sequence

from transformer import model_io
from transformer.hf import export_hf, load_hf_model
from transformer.inference.features import read_pooling, write_pooling


def _has_tokenizer(folder: pathlib.Path) -> bool:
    return folder.is_dir() and any(
        p.is_file() for pattern in model_io.TOKENIZER_PATTERNS for p in folder.glob(pattern))


def import_hf(hf_dir: str | pathlib.Path, output: str | pathlib.Path) -> pathlib.Path:
    """An HF folder → our checkpoint (with its tokenizer files and sentence pooling, if any)."""
    hf_dir = pathlib.Path(hf_dir)
    model = load_hf_model(hf_dir)
    tokenizer_dir = hf_dir if _has_tokenizer(hf_dir) else None
    if tokenizer_dir is None:
        logging.warning("%s has no tokenizer files; the checkpoint will have none", hf_dir)
    output = model_io.save_model(output, model, tokenizer_dir=tokenizer_dir)
    if (pooling := read_pooling(hf_dir)) is not None:
        write_pooling(pooling, output)
    return output


def export_checkpoint(checkpoint: str | pathlib.Path, output: str | pathlib.Path) -> pathlib.Path:
    """Our checkpoint → an HF folder."""
    checkpoint = pathlib.Path(checkpoint)
    model = model_io.load_model(checkpoint)
    tokenizer_dir = checkpoint / model_io.TOKENIZER_DIR
    return export_hf(model, output, tokenizer_dir if _has_tokenizer(tokenizer_dir) else None)


def main(argv: Sequence[str]) -> None:
    from absl import flags

    FLAGS = flags.FLAGS
    commands = [a for a in argv[1:] if not a.startswith("-")]
    if commands not in (["import"], ["export"]):
        raise ValueError("usage: python -m transformer.convert import|export --... (see --help)")
    if commands == ["import"]:
        if not FLAGS.hf_dir or not FLAGS.output:
            raise ValueError("import needs --hf_dir and --output")
        out = import_hf(FLAGS.hf_dir, FLAGS.output)
    else:
        if not FLAGS.checkpoint or not FLAGS.output:
            raise ValueError("export needs --checkpoint and --output")
        out = export_checkpoint(FLAGS.checkpoint, FLAGS.output)
    print(f"wrote {out}")


if __name__ == "__main__":
    from absl import flags

    from transformer import cli

    flags.DEFINE_string("hf_dir", None, "import: a local Hugging Face folder (config + safetensors)")
    flags.DEFINE_string("checkpoint", None, "export: a checkpoint directory written by save_model")
    flags.DEFINE_string("output", None, "the directory to write")
    cli.run(main)
