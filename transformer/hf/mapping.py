"""How one of our parameters relates to Hugging Face tensors, in both directions.

A `Spec` says which HF tensor(s) hold a parameter and how their layout maps to ours: each HF axis
is split into factors (e.g. a torch Linear's [heads * head_dim, embed] rows into (heads, head_dim)),
and the factors are permuted into our axis order ([embed, heads, head_dim]). Stacked parameters
read one HF tensor per layer into our leading 'layers' axis. The same spec drives import (reading
only the block a device needs) and export (writing whole tensors).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Spec:
    """Where a parameter lives in a Hugging Face checkpoint."""

    names: tuple[str, ...]  # HF tensor names: one per layer when `stacked`, else one.
    hf_split: tuple[tuple[int, ...], ...]  # Each HF axis as the sizes of the factors it holds.
    perm: tuple[int, ...]  # Ours = hf.reshape(all factors).transpose(perm).
    stacked: bool = False  # Our leading 'layers' axis runs over `names`.
    # (HF axis, offset, total size): the parameter is a window of a fused tensor (GPT-2 c_attn).
    window: tuple[int, int, int] | None = None
    # Per-expert tensors (Mixtral on the Hub): `names` runs over layers, then `experts` experts
    # each, read into our leading [layers, experts] axes.
    experts: int = 0

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """Our shape of one layer's part."""
        flat = [f for factors in self.hf_split for f in factors]
        return tuple(flat[p] for p in self.perm)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """Our leading axes that run over `names`: (), (layers,) or (layers, experts)."""
        if self.experts:
            return (len(self.names) // self.experts, self.experts)
        return (len(self.names),) if self.stacked else ()

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stack_shape + self.layer_shape

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """Expected shape of each HF tensor (the whole fused tensor for a window)."""
        sizes = [math.prod(f) for f in self.hf_split]
        if self.window is not None:
            sizes[self.window[0]] = self.window[2]
        return tuple(sizes)


def select_layers(spec: Spec, layers: Sequence[int]) -> Spec:
    """The spec of a stacked parameter restricted to some of its layers, in that order."""
    per = spec.experts or 1
    names = tuple(n for i in layers for n in spec.names[i * per:(i + 1) * per])
    return dataclasses.replace(spec, names=names)


def per_layer(template: str, num_layers: int) -> tuple[str, ...]:
    return tuple(template.format(i=i) for i in range(num_layers))


def plain(names: str | tuple[str, ...], shape: Sequence[int], **kw) -> Spec:
    """Same layout in both (embeddings, norms, biases, Conv1D weights)."""
    names = (names,) if isinstance(names, str) else names
    return Spec(names, tuple((s,) for s in shape), tuple(range(len(shape))), **kw)


def transposed(names: str | tuple[str, ...], out_dim: int, in_dim: int, **kw) -> Spec:
    """A torch Linear weight [out, in] → ours [in, out]."""
    names = (names,) if isinstance(names, str) else names
    return Spec(names, ((out_dim,), (in_dim,)), (1, 0), **kw)


def heads_in(names: tuple[str, ...], embed: int, heads: int, head_dim: int, **kw) -> Spec:
    """A torch Linear weight [heads * head_dim, embed] → ours [embed, heads, head_dim]."""
    return Spec(names, ((heads, head_dim), (embed,)), (2, 0, 1), **kw)


def heads_out(names: tuple[str, ...], embed: int, heads: int, head_dim: int, **kw) -> Spec:
    """A torch Linear weight [embed, heads * head_dim] → ours [heads, head_dim, embed]."""
    return Spec(names, ((embed,), (heads, head_dim)), (1, 2, 0), **kw)


def heads_bias(names: tuple[str, ...], heads: int, head_dim: int, **kw) -> Spec:
    """A bias [heads * head_dim] → ours [heads, head_dim]."""
    return Spec(names, ((heads, head_dim),), (0, 1), **kw)


Reader = Callable[[str, Sequence[slice]], np.ndarray]


def read_block(spec: Spec, index: Sequence[slice], read: Reader) -> np.ndarray:
    """Our block `index` of the parameter, reading from HF only the rows and columns it needs.

    Per HF axis, the outer factor's range is read as a contiguous slice; inner factors (e.g. the
    head_dim inside a heads axis) are read whole and cut after the reshape.
    """
    index = [slice(*s.indices(n)) for s, n in zip(index, spec.shape)]
    stack = spec.stack_shape
    if not stack:
        return _read_layer(spec, spec.names[0], index, read)
    outer, rest = index[:len(stack)], index[len(stack):]
    flat = [int(i) for i in np.ravel_multi_index(
        np.meshgrid(*[np.arange(s.start, s.stop) for s in outer], indexing="ij"), stack).ravel()]
    blocks = [_read_layer(spec, spec.names[i], rest, read) for i in flat]
    if not blocks:
        return np.zeros((*_sizes(outer), *_sizes(rest)), np.float32)
    return np.stack(blocks).reshape(*_sizes(outer), *blocks[0].shape)


def _sizes(index: Sequence[slice]) -> list[int]:
    return [s.stop - s.start for s in index]


def _read_layer(spec: Spec, name: str, index: Sequence[slice], read: Reader) -> np.ndarray:
    inverse = np.argsort(spec.perm)  # Factor a is our axis inverse[a].
    factor_index = [index[inverse[a]] for a in range(len(spec.perm))]
    hf_index, block_shape, post = [], [], []
    a = 0
    for axis, factors in enumerate(spec.hf_split):
        outer = factor_index[a]
        inner = math.prod(factors[1:])
        offset = spec.window[1] if spec.window and spec.window[0] == axis else 0
        hf_index.append(slice(offset + outer.start * inner, offset + outer.stop * inner))
        block_shape += [outer.stop - outer.start, *factors[1:]]
        post += [slice(None), *factor_index[a + 1:a + len(factors)]]
        a += len(factors)
    block = read(name, hf_index).reshape(block_shape)[tuple(post)]
    return block.transpose(spec.perm)


def to_hf(spec: Spec, value: np.ndarray) -> dict[str, np.ndarray]:
    """Our parameter → {HF name: tensor} (for a window: that part of the fused tensor)."""
    layers = value.reshape(-1, *spec.layer_shape)
    inverse = tuple(int(i) for i in np.argsort(spec.perm))
    part_shape = tuple(math.prod(f) for f in spec.hf_split)
    return {
        name: np.ascontiguousarray(layer.transpose(inverse).reshape(part_shape))
        for name, layer in zip(spec.names, layers)
    }


def assemble(specs: Sequence[Spec], values: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """HF tensors from our parameters, concatenating the windows of fused tensors in order."""
    whole: dict[str, np.ndarray] = {}
    parts: dict[str, list[tuple[int, int, np.ndarray]]] = {}
    for spec, value in zip(specs, values):
        for name, tensor in to_hf(spec, value).items():
            if spec.window is None:
                whole[name] = tensor
            else:
                parts.setdefault(name, []).append((spec.window[1], spec.window[0], tensor))
    for name, pieces in parts.items():
        pieces.sort(key=lambda p: p[0])
        whole[name] = np.concatenate([p[2] for p in pieces], axis=pieces[0][1])
    return whole
