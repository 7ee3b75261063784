"""Data layer: tokenizers, TFDS/local sources, grain pipelines, packing, MLM masking, tasks."""
