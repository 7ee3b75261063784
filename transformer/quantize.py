"""Weight-only quantization for inference: int8 per output channel (symmetric), or int4 in groups.

    qmodel = quantize(model, "int8")          # a new model; `model` is left as it is
    tokenizer, qmodel = from_pretrained(path, quantize="int8")
    save_quantized("/tmp/q", qmodel)          # int8 weights + scales; from_pretrained reads it back

Every matrix-product weight (attention query/key/value/out, MLP, output layer, pooler, task head)
and the token and position embedding tables become a `QuantizedParam`: `{'qvalue': int8 [shape of
the weight], 'scale': float32}` with one scale per output channel (a table: per row), the absmax
of its input channel over 127.5 (so |w - q·scale| <= scale / 2). Norms and biases stay float32.
Model code reads a weight as `param[...]`, which for a `QuantizedParam` dequantizes it inside the
jitted computation (q · scale, fused by XLA): the same models, decode loop, scoring and features
run unchanged. Memory holds int8 (about a quarter of float32); each product still runs in the
compute dtype, so it is no faster (on CPU decoding is somewhat slower: the dequantized weight is
written before the product reads it).

`int4`: groups of 32 consecutive inputs of the (last) contracted axis share a scale (per output
channel), where that axis divides into such groups; else per output channel. XLA:CPU stores int4
one value a byte, so on CPU it saves no memory over int8 (TPUs pack two a byte).

`group_size` (e.g. `quantize(model, "int8", group_size=128)`) gives int8 the same grouping:
finer scales where one per output channel is too coarse. On all-MiniLM-L6-v2's sentence features
(300 SST-2 sentences) per-channel int8 keeps a mean cosine of 0.9995 with float32 but a minimum of
0.9975 (the MLP output projection's 1536 inputs per scale); groups of 128 keep every sentence at
>= 0.999 (minimum 0.9991), for 1/128 more scale bytes per weight.

qwix (Google's JAX quantization library) does the numerics: `qwix.quantize` (absmax calibration,
per-channel and tiled scales, rounding) and `qwix.dequantize`. Its model-level PTQ
(`qwix.quantize_model(model, qwix.PtqProvider(rules), inputs)`) does not fit these models, for
three reasons seen with qwix 0.1.8: it finds a weight by looking it up among the attributes of the
module calling the product and swaps it in place, which cannot happen for the stacked layers (the
`lax.scan`/loop in `LayerStack` merges a fresh module per layer from sliced arrays); after the
swap, the codebase's `param[...].astype(dtype)` fails (`WithAux.astype`: "Unsupported type
QArray"); and a tied embedding table is read by a gather and a product alike.

A quantized checkpoint is our model checkpoint format with `{qvalue, scale}` pairs in `params/`
and a "quantization" entry in model_config.json: `from_pretrained` loads it quantized, and the
float loaders (`model_io.load_model`, `init_from`) refuse it, naming the way to load it.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding

from transformer import model_io, paths
from transformer.models import MODELS, Decoder, Encoder, ModelConfig
from transformer.models.attention import MultiHeadAttention
from transformer.models.encoder_decoder import EncoderDecoder, Stack
from transformer.models.heads import Head
from transformer.models.layers import MLP, Embeddings, Norm

MODES = ("int8", "int4")
QTYPES = {"int8": jnp.int8, "int4": jnp.int4}
INT4_GROUP = 32  # Inputs per scale, along the last contracted axis, for int4.
CONFIG_KEY = "quantization"  # The marker in model_config.json: {"mode": ..., "format": 1}.

# The contracted (input) axes of each weight, counted from the end, so that the leading 'layers'
# axis of stacked layers keeps a scale per layer. A table's "input" is its row (tied output layer).
CONTRACTED: dict[type, dict[str, tuple[int, ...]]] = {
    MultiHeadAttention: {"query": (-3,), "key": (-3,), "value": (-3,), "out": (-3, -2)},
    MLP: {"wi": (-2,), "wi_gate": (-2,), "wo": (-2,)},
    Embeddings: {"tokens": (-1,), "positions": (-1,)},
    Encoder: {"lm_head": (-2,), "pooler": (-2,), "mlm_dense": (-2,)},
    Decoder: {"lm_head": (-2,)},
    EncoderDecoder: {"lm_head": (-2,)},  # Untied heads (T5 v1.1); T5's relative bias stays float.
    Head: {"kernel": (-2,)},
}
# Layers whose parameters stay float on purpose: norms, and an encoder-decoder stack's own small
# tables read by a gather (T5's relative position bias, BART's learned positions).
KEPT_FLOAT = (Norm, Stack)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"quantization mode {mode!r} is not one of {list(MODES)}")
    return mode


class QuantizedParam(nnx.Param):
    """A weight held as {'qvalue': int, 'scale': float32}; `param[...]` is the float weight."""

    def __getitem__(self, key: Any) -> jax.Array:
        import qwix  # Here, not at import: loading it takes a second or two.

        value = self.get_value()
        weight = qwix.dequantize(qwix.QArray(value["qvalue"], value["scale"]))
        return weight if key is Ellipsis else weight[key]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.get_value()["qvalue"].shape

    @property
    def mode(self) -> str:
        return self.get_metadata("quantization")


def quantize_array(weight: jax.Array, mode: str, contracted: tuple[int, ...],
                   group_size: int | None = None) -> dict[str, jax.Array]:
    """{'qvalue', 'scale'} of a float weight: a scale per output channel (int8) or per group of
    `group_size` inputs (int4: `INT4_GROUP` by default) and output channel; `contracted` are the
    input axes (negative). Groups run along the last input axis, where it divides into them."""
    import qwix

    ndim = weight.ndim
    inputs = [ndim + a for a in contracted]
    tiled = {}
    group = INT4_GROUP if mode == "int4" and group_size is None else group_size
    if group:
        last = inputs[-1]
        inputs = [last]  # Every other axis keeps its own scales.
        if weight.shape[last] % group == 0:
            tiled = {last: group}
    channelwise = [a for a in range(ndim) if a not in inputs]
    q = qwix.quantize(weight.astype(jnp.float32), QTYPES[mode], channelwise_axes=channelwise,
                      tiled_axes=tiled)
    return {"qvalue": q.qvalue, "scale": q.scale}


def _weights(model: nnx.Module) -> list[tuple[nnx.Module, str, tuple[int, ...]]]:
    found = []
    for _, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        for kind, names in CONTRACTED.items():
            if isinstance(node, kind):
                found += [(node, n, axes) for n, axes in names.items()
                          if isinstance(getattr(node, n, None), nnx.Param)]
    return found


def check_supported(model: nnx.Module) -> None:
    """Fails, naming the layer, where a weight would silently stay float: every parameter must
    be one that `CONTRACTED` quantizes or a float one of those layers (biases) or of `KEPT_FLOAT`."""
    unsupported = sorted({
        f"{type(node).__name__}.{name}" for _, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Module) and not isinstance(node, (*CONTRACTED, *KEPT_FLOAT))
        for name, value in vars(node).items() if isinstance(value, nnx.Param)})
    if unsupported:
        raise ValueError(
            f"quantize does not support the layers holding {unsupported}: it quantizes the "
            "attention, dense MLP, embedding and head weights of Encoder, Decoder, EncoderDecoder "
            "and TaskModel models (mixture-of-experts layers are not supported; "
            "merge LoRA adapters into the weights first, transformer.models.lora.merge)")


def quantize(model: nnx.Module, mode: str = "int8", group_size: int | None = None) -> nnx.Module:
    """A copy of `model` (Encoder, Decoder or TaskModel) with its weights quantized; it shares the
    arrays left in float (norms, biases) with `model`, which is unchanged. `group_size`: inputs
    per scale (None: int8 per output channel, int4 groups of `INT4_GROUP`)."""
    check_mode(mode)
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size={group_size!r}: give a positive number of inputs per scale "
                         "(e.g. 128), or None for one scale per output channel")
    check_supported(model)
    if quantization_mode(model) is not None:
        raise ValueError(f"the model is already quantized ({quantization_mode(model)})")
    graphdef, state = nnx.split(model)
    quantized = nnx.merge(graphdef, state)  # New variables over the same arrays.
    for module, name, axes in _weights(quantized):
        param = getattr(module, name)
        metadata = {k: v for k, v in param.get_metadata().items()
                    if k not in ("hijax", "ref", "eager_sharding")}
        value = quantize_array(param[...], mode, axes, group_size)
        setattr(module, name, QuantizedParam(value, eager_sharding=False, **metadata,
                                             quantization=mode, group_size=group_size))
    return quantized


def group_size_of(model: nnx.Module) -> int | None:
    """The `group_size` a model was quantized with (None: the mode's default)."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, QuantizedParam):
            return node.get_metadata().get("group_size")
    return None


def quantization_mode(model: nnx.Module) -> str | None:
    """'int8' / 'int4' for a quantized model, None for a float one."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, QuantizedParam):
            return node.mode
    return None


def state_shardings(state: Any, mesh: Any, rules: Any) -> Any:
    """`sharding.state_shardings` for a state that may hold `QuantizedParam`s: the int values
    take the weight's logical axes; the scales the same axes where they divide (the size-1
    contracted axes stay replicated)."""
    from transformer import sharding

    table = sharding.normalize_rules(rules)

    def leaf(variable: nnx.Variable) -> nnx.Variable:
        if not isinstance(variable, QuantizedParam):
            return sharding.state_shardings(variable, mesh, rules)
        names = sharding.variable_axes(variable)

        def spec(x):
            axes = names if len(names) == x.ndim else (None,) * x.ndim
            return NamedSharding(mesh, sharding.logical_to_spec(axes, table, x.shape, mesh))

        return variable.replace({k: spec(v) for k, v in variable.get_value().items()})

    return jax.tree.map(leaf, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_bytes(model: nnx.Module) -> int:
    """Bytes of all the parameters in memory (int8 values, scales and float parameters)."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves)


# ---------------------------------------------------------------- checkpoints


def save_quantized(directory: str | os.PathLike, model: nnx.Module,
                   tokenizer_dir: str | os.PathLike | None = None):
    """Our checkpoint format with the quantized weights, marked in model_config.json."""
    mode = quantization_mode(model)
    if mode is None:
        raise ValueError("the model is not quantized: save it with model_io.save_model")
    directory = model_io.save_model(directory, model, tokenizer_dir)
    if jax.process_index() == 0:
        config_file = directory / model_io.CONFIG_FILE
        saved = json.loads(config_file.read_text())
        saved[CONFIG_KEY] = {"mode": mode, "format": 1, "group_size": group_size_of(model)}
        config_file.write_text(json.dumps(saved, indent=2) + "\n")
    return directory


def saved_mode(directory: str | os.PathLike) -> str | None:
    """The quantization of a saved checkpoint ('int8', 'int4'), None for a float one."""
    config_file = paths.as_path(directory) / model_io.CONFIG_FILE
    if not config_file.is_file():
        return None
    entry = json.loads(config_file.read_text()).get(CONFIG_KEY)
    return None if entry is None else check_mode(entry["mode"])


def load_quantized(directory: str | os.PathLike, *, dtype: str | None = None,
                   mode: str | None = None, mesh: Any = None) -> nnx.Module:
    """A checkpoint written by `save_quantized`, on the first local device; `mode`, if given,
    must be the one it was saved with."""
    directory = paths.as_path(directory)
    saved = json.loads((directory / model_io.CONFIG_FILE).read_text())
    entry = saved.pop(CONFIG_KEY, None)
    if entry is None:
        raise ValueError(f"{directory} is not a quantized checkpoint: load it with from_pretrained "
                         "(and quantize=... to quantize it)")
    saved_as = check_mode(entry["mode"])
    if mode not in (None, saved_as):
        raise ValueError(f"{directory} was saved quantized as {saved_as}; it cannot be loaded as "
                         f"{mode} (pass quantize=None or {saved_as!r})")
    if mesh is not None:
        raise ValueError(f"{directory} is a quantized checkpoint: it loads on one device (mesh=None)")
    mode = saved_as
    config = ModelConfig.from_dict(saved)
    if dtype is not None:
        config = config.replace(dtype=dtype)
    build = lambda: quantize(MODELS[config.architecture](config, rngs=nnx.Rngs(0)), mode,
                             entry.get("group_size"))
    graphdef, state = nnx.split(nnx.eval_shape(build))
    shapes = model_io.flat_params(state)
    model_io.check_shapes({p: x.shape for p, x in shapes.items()}, directory)
    device = SingleDeviceSharding(jax.local_devices()[0])
    target = {p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device) for p, x in shapes.items()}
    restored = ocp.StandardCheckpointer().restore(
        paths.absolute(directory) / model_io.PARAMS_DIR, model_io.unflatten(target))
    for path, variable in nnx.to_flat_state(state):
        value = restored
        for key in path:
            value = value[str(key)]
        variable.set_value(value)
    return nnx.merge(graphdef, state)
