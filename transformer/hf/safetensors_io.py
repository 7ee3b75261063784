"""Reading tensors (or slices of them) from a Hugging Face folder's safetensors files, and writing one.

Only safetensors are read: pickle-based weights (`pytorch_model.bin`, `*.pt`) can run arbitrary code
when loaded, so a folder holding only those is refused with the command that converts it.
"""

from __future__ import annotations

import json
import math
import pathlib
import struct
from collections.abc import Mapping, Sequence

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.h5", "*.msgpack")

# Dtypes that numpy lacks: safetensors' numpy reader cannot return them, so those tensors are read
# through a memory map of the file with the ml_dtypes type instead.
_EXTRA_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}

CONVERT_HINT = (
    "Convert the weights to safetensors once, in an environment you trust, e.g. "
    "`python -c \"from transformers import AutoModel; "
    "AutoModel.from_pretrained('{dir}')"
    ".save_pretrained('{dir}-safetensors', safe_serialization=True)\"` "
    "(use the model's own class, e.g. AutoModelForCausalLM, to keep its head), then copy the tokenizer "
    "files beside it."
)


def open_weights(path: pathlib.Path):
    """`safe_open(path)`, or an error naming the file (a truncated download, most often)."""
    try:
        return safe_open(path, framework="numpy")
    except Exception as error:  # safetensors' SafetensorError: a bare "header too large" etc.
        raise ValueError(f"{path}: not a readable safetensors file ({error}); it may be "
                         "truncated or damaged: copy or download it again") from None


def weight_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """{tensor name: file} for a single `model.safetensors` or a sharded, indexed checkpoint."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: folder / f for name, f in weight_map.items()}
        if missing := sorted({str(p.name) for p in files.values() if not p.is_file()}):
            raise FileNotFoundError(f"{index} lists shards that are not in {folder}: {missing}")
        return files
    single = folder / SINGLE_FILE
    if single.is_file():
        with open_weights(single) as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 (not a dict)
    others = sorted(folder.glob("*.safetensors"))
    if len(others) == 1:
        with open_weights(others[0]) as f:
            return {name: others[0] for name in f.keys()}  # noqa: SIM118
    pickles = sorted({p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern)})
    if pickles:
        raise ValueError(
            f"{folder} has only pickle-based weights {pickles}; these can execute code when loaded "
            f"and are not read. " + CONVERT_HINT.format(dir=folder)
        )
    raise FileNotFoundError(
        f"no weights in {folder}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards"
    )


class SafetensorsReader:
    """Shapes and slices of the tensors of a folder; files stay memory-mapped, read lazily."""

    def __init__(self, folder: str | pathlib.Path):
        self.folder = pathlib.Path(folder)
        self.files = weight_files(self.folder)
        self._handles: dict[pathlib.Path, object] = {}
        self._headers: dict[pathlib.Path, tuple[int, dict]] = {}

    def names(self) -> set[str]:
        return set(self.files)

    def _handle(self, name: str):
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = open_weights(path)
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handle(name).get_slice(name).get_dtype()

    def read(self, name: str, index: Sequence[slice] | None = None) -> np.ndarray:
        """The tensor, or the block `index` (one slice per axis, step 1) of it."""
        index = tuple(index) if index is not None else (slice(None),) * len(self.shape(name))
        dtype = self.dtype(name)
        if dtype in _EXTRA_DTYPES:
            return np.array(self._memmap(name, _EXTRA_DTYPES[dtype])[index])
        sliced = self._handle(name).get_slice(name)
        return np.asarray(sliced[index] if index else sliced[:])

    def _memmap(self, name: str, dtype: np.dtype) -> np.ndarray:
        path = self.files[name]
        if path not in self._headers:
            with open(path, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                self._headers[path] = (8 + size, json.loads(fh.read(size)))
        start, header = self._headers[path]
        entry = header[name]
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        assert end - begin == math.prod(shape) * np.dtype(dtype).itemsize, name
        return np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str | pathlib.Path) -> None:
    """One `model.safetensors`; 'format: pt' is the metadata transformers expects."""
    contiguous = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(contiguous, str(path), metadata={"format": "pt"})
