"""Paths on a local disk or in Google Cloud Storage (`gs://bucket/dir`), as one `epath.Path` type.

`etils.epath` is what Orbax uses; gs:// goes through fsspec + gcsfs (or tf.io.gfile where TensorFlow
is installed), with credentials from the environment (on a TPU VM, its service account). What object
stores cannot do (append to a file, resolve a path) is handled by the callers that need it.
"""

from __future__ import annotations

import io
import os
import shutil
from typing import Any

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs such as gs://bucket/dir: object stores, not the local file system."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path; `~` expanded when local."""
    text = os.fspath(path)
    return epath.Path(text if is_remote(text) else os.path.expanduser(text))


def absolute(path: str | os.PathLike) -> epath.Path:
    """Local paths resolved (Orbax wants absolute ones); remote paths are absolute already."""
    path = as_path(path)
    return path if is_remote(path) else path.resolve()


def copy_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copies one file between any two places (local ↔ gs://)."""
    source, target = as_path(source), as_path(target)
    if is_remote(source) or is_remote(target):
        target.write_bytes(source.read_bytes())  # Small files only: tokenizers, eval outputs.
    else:
        shutil.copy2(source, target)


def save_figure(figure: Any, path: str | os.PathLike, **kwargs: Any) -> None:
    """`figure.savefig` to a local or remote path (matplotlib writes only local files)."""
    path = as_path(path)
    if not is_remote(path):
        figure.savefig(path, **kwargs)
        return
    buffer = io.BytesIO()
    figure.savefig(buffer, format=path.suffix.lstrip(".") or "png", **kwargs)
    path.write_bytes(buffer.getvalue())
