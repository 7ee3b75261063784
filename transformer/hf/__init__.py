"""Hugging Face interop: import local HF folders (safetensors only) and export our models to them.

Reads and writes config.json and safetensors directly: neither torch nor transformers is needed.
"""

from transformer.hf.exporter import export_hf, hf_tensors
from transformer.hf.families import FAMILIES, family_for_config, family_for_model_type
from transformer.hf.importer import hf_model_config, is_hf_folder, load_hf_model, read_hf_config

__all__ = [
    "FAMILIES", "export_hf", "family_for_config", "family_for_model_type", "hf_model_config",
    "hf_tensors", "is_hf_folder", "load_hf_model", "read_hf_config",
]
