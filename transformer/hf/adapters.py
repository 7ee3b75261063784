"""LoRA adapters as Hugging Face peft folders: `adapter_config.json` + `adapter_model.safetensors`.

peft stores, for each adapted torch module `M` of the base model, `base_model.model.M.lora_A.weight`
[r, in_features] and `...lora_B.weight` [out_features, r], and scales B·A by `lora_alpha / r`.
Ours are A [*in, r] and B [r, *out] in the layout of the weight they adapt, so each factor's
mapping is derived from the weight's own `mapping.Spec`: the same factors, with the rank standing in
for the other side. Two layouts need more than that:
- GPT-2's fused `c_attn` holds query, key and value, each with its own adapter here: it is written
  as one adapter of rank 3r whose A stacks the three A's and whose B is block-diagonal (exact),
  and read back by giving each part the shared A and its rows of B;
- peft has one rank per file: smaller adapters are padded with zero rank components (exact).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer import model_io
from transformer.hf import families, mapping
from transformer.hf.safetensors_io import SafetensorsReader, write_safetensors
from transformer.models import MODELS, Decoder, Encoder, ModelConfig
from transformer.models import lora as lora_lib
from transformer.models.config import LORA_TARGETS

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Our weight paths of each target, inside the layer stack.
TARGET_PATHS = {
    "query": "layers.blocks.attention.query", "key": "layers.blocks.attention.key",
    "value": "layers.blocks.attention.value", "out": "layers.blocks.attention.out",
    "wi": "layers.blocks.mlp.wi", "wi_gate": "layers.blocks.mlp.wi_gate",
    "wo": "layers.blocks.mlp.wo",
}
TASK_TYPES = {"decoder": "CAUSAL_LM", "encoder": "FEATURE_EXTRACTION"}


@dataclasses.dataclass(frozen=True)
class FactorSpecs:
    a: mapping.Spec  # ours A [*in, r] ↔ lora_A.weight [r, in]
    b: mapping.Spec  # ours B [r, *out] ↔ lora_B.weight [out, r] (a window of it for c_attn)
    module: tuple[str, ...]  # The torch module path of each layer, e.g. 'model.layers.0.mlp.up_proj'


def factor_specs(base: mapping.Spec, num_inputs: int, rank: int) -> FactorSpecs:
    """The specs of a weight's LoRA factors, from the weight's spec."""
    owner = [axis for axis, factors in enumerate(base.hf_split) for _ in factors]
    start = [sum(len(f) for f in base.hf_split[:axis]) for axis in range(len(base.hf_split))]
    in_axis = owner[base.perm[0]]
    out_axis = 1 - in_axis
    in_factors, out_factors = base.hf_split[in_axis], base.hf_split[out_axis]
    perm_a = (*[1 + j - start[in_axis] for j in base.perm[:num_inputs]], 0)
    perm_b = (len(out_factors), *[j - start[out_axis] for j in base.perm[num_inputs:]])
    if base.window is not None and base.window[0] != out_axis:
        raise ValueError(f"{base.names[0]}: a fused tensor split on its input side has no LoRA form")
    window = None if base.window is None else (0, base.window[1], base.window[2])
    modules = tuple(n.removesuffix(".weight") for n in base.names)
    return FactorSpecs(
        a=mapping.Spec(tuple(m + ".lora_A.weight" for m in modules), ((rank,), in_factors), perm_a,
                       stacked=base.stacked),
        b=mapping.Spec(tuple(m + ".lora_B.weight" for m in modules), (out_factors, (rank,)),
                       perm_b, stacked=base.stacked, window=window),
        module=modules,
    )


def target_specs(family: families.Family, config: ModelConfig, prefix: str, rank: int
                 ) -> dict[str, FactorSpecs]:
    """FactorSpecs of every weight a LoRA target can name, for a model of `config`."""
    base = family.specs(config, prefix)
    return {t: factor_specs(base[p], LORA_TARGETS[t], rank)
            for t, p in TARGET_PATHS.items() if p in base}


def _module_names(specs: dict[str, FactorSpecs], targets: list[str]) -> list[str]:
    """peft `target_modules`: per target, the shortest module-name suffix that names exactly that
    target's modules, else their full paths."""
    everything = [m for s in specs.values() for m in s.module]
    names: list[str] = []
    for t in targets:
        own = set(specs[t].module)
        parts = specs[t].module[0].split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if {m for m in everything if m == suffix or m.endswith("." + suffix)} == own:
                names.append(suffix)
                break
        else:
            names.extend(sorted(own))
    return sorted(set(names))


def adapter_tensors(model: Encoder | Decoder) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(adapter_config.json fields, {peft tensor name: array}) of a model with LoRA adapters."""
    config = model.config
    if config.lora_rank <= 0:
        raise ValueError("the model has no LoRA adapters (model.lora_rank=0): nothing to export")
    family = families.family_for_config(config)
    r = config.lora_rank
    specs = target_specs(family, config, family.export_prefix(config), r)
    params = {k: np.asarray(jax.device_get(v), np.float32)
              for k, v in model_io.flat_params(nnx.state(model, nnx.Param)).items()}
    factors = {t: (params[TARGET_PATHS[t] + "_lora.a"], params[TARGET_PATHS[t] + "_lora.b"])
               for t in config.lora_targets}
    tensors: dict[str, np.ndarray] = {}
    fused: dict[str, list[tuple[FactorSpecs, np.ndarray, np.ndarray]]] = {}
    for t, (a, b) in factors.items():
        spec = specs[t]
        if spec.b.window is not None:  # One part of a fused tensor (GPT-2 c_attn).
            for name_a, layer_a, layer_b in zip(spec.a.names, _layers(spec.a, a), _layers(spec.b, b)):
                fused.setdefault(name_a, []).append((spec, layer_a, layer_b))
            continue
        tensors.update(mapping.to_hf(spec.a, a))
        tensors.update(mapping.to_hf(spec.b, b))
    for name_a, parts in fused.items():
        tensors.update(_fused_adapter(name_a, parts, r))
    rank = max(t.shape[0] for n, t in tensors.items() if n.endswith("lora_A.weight"))
    tensors = {PEFT_PREFIX + n: _pad_rank(n, t, rank) for n, t in tensors.items()}
    scale = lora_lib.lora_scale(config)
    adapter_config = {
        "peft_type": "LORA", "task_type": TASK_TYPES[config.architecture],
        "r": rank, "lora_alpha": scale * (math.sqrt(rank) if config.lora_rslora else rank),
        "use_rslora": config.lora_rslora, "lora_dropout": config.lora_dropout,
        "target_modules": _module_names(specs, list(config.lora_targets)),
        "bias": "none", "fan_in_fan_out": family is families.GPT2, "inference_mode": True,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "init_lora_weights": True, "use_dora": False, "base_model_name_or_path": None,
    }
    return adapter_config, tensors


def _layers(spec: mapping.Spec, value: np.ndarray) -> list[np.ndarray]:
    """Per-layer HF tensors of one factor (a part of the fused tensor for a window)."""
    return list(mapping.to_hf(dataclasses.replace(spec, window=None), value).values())


def _fused_adapter(name_a: str, parts: list, r: int) -> dict[str, np.ndarray]:
    """One adapter of rank r·parts for a fused tensor whose parts each have their own."""
    parts = sorted(parts, key=lambda p: p[0].b.window[1])
    total = parts[0][0].b.window[2]
    a = np.concatenate([layer_a for _, layer_a, _ in parts], axis=0)
    b = np.zeros((total, r * len(parts)), np.float32)
    for i, (spec, _, layer_b) in enumerate(parts):
        offset = spec.b.window[1]
        b[offset:offset + layer_b.shape[0], i * r:(i + 1) * r] = layer_b
    return {name_a: a, name_a.replace("lora_A", "lora_B"): b}


def _pad_rank(name: str, tensor: np.ndarray, rank: int) -> np.ndarray:
    """Zero rank components up to `rank`: A gains rows, B columns; B·A is unchanged."""
    missing = rank - (tensor.shape[0] if name.endswith("lora_A.weight") else tensor.shape[1])
    if missing == 0:
        return tensor
    pad = ((0, missing), (0, 0)) if name.endswith("lora_A.weight") else ((0, 0), (0, missing))
    return np.pad(tensor, pad)


def export_adapter(model: Encoder | Decoder, output: str | pathlib.Path,
                   base_model_name_or_path: str | None = None) -> pathlib.Path:
    """Writes the model's LoRA adapters as a peft folder that `PeftModel.from_pretrained` loads
    onto the transformers model of the base (its Hugging Face export)."""
    output = pathlib.Path(output)
    adapter_config, tensors = adapter_tensors(model)
    adapter_config["base_model_name_or_path"] = base_model_name_or_path
    if jax.process_index() == 0:
        output.mkdir(parents=True, exist_ok=True)
        (output / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
        write_safetensors(tensors, output / WEIGHTS_FILE)
    return output


def read_adapter_config(folder: str | pathlib.Path) -> dict[str, Any]:
    path = pathlib.Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {folder}: not a peft adapter folder")
    settings = json.loads(path.read_text())
    unsupported = {
        "peft_type": settings.get("peft_type", "LORA") != "LORA",
        "use_dora": bool(settings.get("use_dora")),
        "bias": settings.get("bias", "none") != "none",
        "rank_pattern": bool(settings.get("rank_pattern")),
        "alpha_pattern": bool(settings.get("alpha_pattern")),
        "modules_to_save": bool(settings.get("modules_to_save")),
    }
    bad = [f"{k}={settings.get(k)!r}" for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"{path}: {', '.join(bad)} is not supported; only plain LoRA adapters "
                         "(peft_type LORA, one rank and alpha, bias 'none', no DoRA, no "
                         "modules_to_save) load here")
    return settings


def load_adapter(model: Encoder | Decoder, folder: str | pathlib.Path) -> Encoder | Decoder:
    """`model` (a base model without adapters) with the peft LoRA adapter of `folder`."""
    folder = pathlib.Path(folder)
    settings = read_adapter_config(folder)
    config = model.config
    if config.lora_rank:
        raise ValueError("load_adapter needs the base model without adapters (lora_rank=0); "
                         "merge or drop the current ones first (transformer.hf.adapters.merge)")
    reader = SafetensorsReader(folder)
    names = set(reader.names())
    rank = int(settings["r"])
    family = families.family_for_config(config)
    prefix = _peft_prefix(names, family, config, rank)
    specs = target_specs(family, config, prefix, rank)
    targets = [t for t, s in specs.items() if PEFT_PREFIX + s.a.names[0] in names]
    if not targets:
        raise ValueError(f"{folder}/{WEIGHTS_FILE} adapts none of this {family.name} model's "
                         f"linear layers; its tensors start with {sorted(names)[:4]}")
    read = lambda name, index: reader.read(PEFT_PREFIX + name, index)
    used, arrays = set(), {}
    for t in targets:
        spec = specs[t]
        for factor, s in (("a", spec.a), ("b", spec.b)):
            for name in s.names:
                used.add(PEFT_PREFIX + name)
                have, want = reader.shape(PEFT_PREFIX + name), s.hf_shape
                if have != want:
                    raise ValueError(f"{folder}: {name} has shape {have}, the base model needs "
                                     f"{want}: the adapter was trained for another base model")
            whole = tuple(slice(0, n) for n in s.shape)
            shared_a = dataclasses.replace(s, window=None)  # A fused tensor's parts share A.
            arrays[f"{TARGET_PATHS[t]}_lora.{factor}"] = mapping.read_block(
                shared_a if factor == "a" else s, whole, read)
    if unused := sorted(names - used):
        raise ValueError(f"{folder}: {len(unused)} adapter tensor(s) fit no layer of the base "
                         f"model: {unused[:6]}")
    alpha = float(settings.get("lora_alpha", 8))
    adapted = config.replace(lora_rank=rank, lora_alpha=alpha, lora_targets=tuple(targets),
                             lora_dropout=float(settings.get("lora_dropout", 0.0)),
                             lora_rslora=bool(settings.get("use_rslora", False)))
    return with_params(adapted, {**model_io.flat_params(nnx.state(model, nnx.Param)), **arrays})


def _peft_prefix(names: set[str], family: families.Family, config: ModelConfig, rank: int) -> str:
    """The base model's name prefix the adapter was saved under (e.g. 'model.' or 'bert.')."""
    for prefix in (*family.prefixes, family.export_prefix(config)):
        specs = target_specs(family, config, prefix, rank)
        if any(PEFT_PREFIX + s.a.names[0] in names for s in specs.values()):
            return prefix
    raise ValueError(f"the adapter's tensors are not named as peft names {family.name} modules "
                     f"('{PEFT_PREFIX}' + module + '.lora_A.weight'): {sorted(names)[:4]}")


def with_params(config: ModelConfig, flat: dict[str, Any]) -> Encoder | Decoder:
    """A model of `config` holding the flat {dotted path: array} parameters."""
    abstract = nnx.eval_shape(lambda: MODELS[config.architecture](config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    expected = model_io.flat_params(state)
    if missing := sorted(set(expected) - set(flat)):
        raise ValueError(f"parameters missing for the model: {missing[:6]}")
    arrays = {k: jnp.asarray(flat[k], expected[k].dtype) for k in expected}
    nnx.replace_by_pure_dict(state, model_io.unflatten(arrays))
    return nnx.merge(graphdef, state)


def merge(model: Encoder | Decoder) -> Encoder | Decoder:
    """The same function without adapters: each folded into its weight (W + (α/r)·A·B)."""
    config = model.config
    if config.lora_rank <= 0:
        return model
    flat = model_io.flat_params(nnx.state(model, nnx.Param))
    merged = lora_lib.merge(flat, config)
    return with_params(config.replace(lora_rank=0, lora_targets=()), merged)
