"""The Hugging Face model families we read and write: BERT, GPT-2, Llama/Mistral, MoE, T5, BART.

Each family maps `config.json` to our `ModelConfig` (and back), and names, for every parameter of
our model, the HF tensor(s) that hold it (`mapping.Spec`). Our parameter paths are the dotted keys
of `nnx.to_pure_dict(nnx.state(model, nnx.Param))`, e.g. 'layers.blocks.attention.query'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from typing import Any

from transformer.hf import mapping as m
from transformer.models.config import ModelConfig

Specs = dict[str, m.Spec]

# HF activation names → ours, and ours → the HF name each family writes.
ACTIVATIONS_FROM_HF = {
    "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu",
}
ACTIVATIONS_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
# Buffers some checkpoints carry that are not parameters; skipped without a warning.
IGNORED_SUFFIXES = ("position_ids", ".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    config_from_hf: Callable[[dict[str, Any], Collection[str]], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    specs: Callable[..., Specs]  # (config, prefix[, tensor names: MoE layouts]) → specs
    prefixes: tuple[str, ...]  # Name prefixes of the base model ('' = a bare base model).
    probe: str  # A tensor every checkpoint of the family has, to find the prefix.
    export_prefix: Callable[[ModelConfig], str]
    requirements: Callable[[ModelConfig], dict[str, Any]]  # Fields an exportable config must have.

    def prefix(self, names: Collection[str]) -> str:
        for prefix in self.prefixes:
            if prefix + self.probe in names:
                return prefix
        raise ValueError(
            f"{self.name} checkpoint has no tensor {self.probe!r} under any of the prefixes "
            f"{list(self.prefixes)}; its tensors start with {sorted(names)[:5]}"
        )


def unsupported(field: str, value: Any, family: str, allowed: str) -> ValueError:
    return ValueError(f"config.json {field}={value!r} is not supported for {family} ({allowed})")


def _activation(hf: dict[str, Any], key: str, family: str) -> str:
    act = hf.get(key, "gelu")
    if act not in ACTIVATIONS_FROM_HF:
        raise unsupported(key, act, family, f"supported: {sorted(ACTIVATIONS_FROM_HF)}")
    return ACTIVATIONS_FROM_HF[act]


# ----------------------------------------------------------------------------------------- BERT


def _bert_config(hf: dict[str, Any], names: Collection[str]) -> ModelConfig:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise unsupported("position_embedding_type", hf["position_embedding_type"], "BERT", "'absolute'")
    prefix = BERT.prefix(names)
    return ModelConfig(
        architecture="encoder", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        mlp_dim=hf["intermediate_size"], activation=_activation(hf, "hidden_act", "BERT"),
        norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-12), pre_norm=False,
        final_norm=False, embedding_norm=True, position="learned",
        max_length=hf.get("max_position_embeddings", 512), type_vocab_size=hf.get("type_vocab_size", 2),
        pooler=prefix + "pooler.dense.weight" in names,
        mlm_head="cls.predictions.transform.dense.weight" in names,
        tie_embeddings=hf.get("tie_word_embeddings", True)
        or "cls.predictions.decoder.weight" not in names,
        dropout_rate=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout_rate=hf.get("attention_probs_dropout_prob", 0.1),
        initializer_range=hf.get("initializer_range", 0.02),
    )


def _norm(specs: Specs, ours: str, hf: str | tuple[str, ...], d: int, bias: bool = True) -> None:
    names = (hf,) if isinstance(hf, str) else hf
    stacked = len(names) > 1 or ours.startswith("layers.")
    specs[f"{ours}.scale"] = m.plain(tuple(n + ".weight" for n in names), (d,), stacked=stacked)
    if bias:
        specs[f"{ours}.bias"] = m.plain(tuple(n + ".bias" for n in names), (d,), stacked=stacked)


def _bert_specs(c: ModelConfig, p: str) -> Specs:
    d, h, hd, f, v = c.hidden_size, c.num_heads, c.dim_per_head, c.mlp_dim, c.vocab_size
    layer = lambda suffix: m.per_layer(p + "encoder.layer.{i}." + suffix, c.num_layers)
    s: Specs = {
        "embeddings.tokens": m.plain(p + "embeddings.word_embeddings.weight", (v, d)),
        "embeddings.positions": m.plain(p + "embeddings.position_embeddings.weight", (c.max_length, d)),
        "embeddings.token_types": m.plain(
            p + "embeddings.token_type_embeddings.weight", (c.type_vocab_size, d)),
    }
    _norm(s, "embedding_norm", p + "embeddings.LayerNorm", d)
    a = "layers.blocks.attention."
    for ours, theirs in (("query", "query"), ("key", "key"), ("value", "value")):
        s[a + ours] = m.heads_in(layer(f"attention.self.{theirs}.weight"), d, h, hd, stacked=True)
        s[a + ours + "_bias"] = m.heads_bias(layer(f"attention.self.{theirs}.bias"), h, hd, stacked=True)
    s[a + "out"] = m.heads_out(layer("attention.output.dense.weight"), d, h, hd, stacked=True)
    s[a + "out_bias"] = m.plain(layer("attention.output.dense.bias"), (d,), stacked=True)
    _norm(s, "layers.blocks.attention_norm", layer("attention.output.LayerNorm"), d)
    s["layers.blocks.mlp.wi"] = m.transposed(layer("intermediate.dense.weight"), f, d, stacked=True)
    s["layers.blocks.mlp.bi"] = m.plain(layer("intermediate.dense.bias"), (f,), stacked=True)
    s["layers.blocks.mlp.wo"] = m.transposed(layer("output.dense.weight"), d, f, stacked=True)
    s["layers.blocks.mlp.bo"] = m.plain(layer("output.dense.bias"), (d,), stacked=True)
    _norm(s, "layers.blocks.mlp_norm", layer("output.LayerNorm"), d)
    if c.pooler:
        s["pooler"] = m.transposed(p + "pooler.dense.weight", d, d)
        s["pooler_bias"] = m.plain(p + "pooler.dense.bias", (d,))
    if c.mlm_head:
        s["mlm_dense"] = m.transposed("cls.predictions.transform.dense.weight", d, d)
        s["mlm_dense_bias"] = m.plain("cls.predictions.transform.dense.bias", (d,))
        _norm(s, "mlm_norm", "cls.predictions.transform.LayerNorm", d)
        s["lm_bias"] = m.plain("cls.predictions.bias", (v,))
    if not c.tie_embeddings:
        s["lm_head"] = m.transposed("cls.predictions.decoder.weight", v, d)
    return s


def _bert_to_hf(c: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["BertForMaskedLM" if c.mlm_head else "BertModel"], "model_type": "bert",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "intermediate_size": c.mlp_dim, "hidden_act": ACTIVATIONS_TO_HF[c.activation],
        "hidden_dropout_prob": c.dropout_rate, "attention_probs_dropout_prob": c.attention_dropout_rate,
        "max_position_embeddings": c.max_length, "type_vocab_size": c.type_vocab_size,
        "layer_norm_eps": c.norm_eps, "initializer_range": c.initializer_range,
        "position_embedding_type": "absolute", "tie_word_embeddings": c.tie_embeddings,
        "pad_token_id": 0,
    }


def _bert_requirements(c: ModelConfig) -> dict[str, Any]:
    return dict(architecture="encoder", norm="layernorm", pre_norm=False, final_norm=False,
                embedding_norm=True, position="learned", gated_mlp=False, attention_bias=True,
                mlp_bias=True, kv_heads=c.num_heads, dim_per_head=c.hidden_size // c.num_heads,
                type_vocab_size=max(c.type_vocab_size, 1), num_experts=0)


BERT = Family(
    "BERT", ("bert",), _bert_config, _bert_to_hf, _bert_specs, ("", "bert."),
    "embeddings.word_embeddings.weight", lambda c: "bert." if c.mlm_head else "", _bert_requirements,
)


# ---------------------------------------------------------------------------------------- GPT-2


def _gpt2_config(hf: dict[str, Any], names: Collection[str]) -> ModelConfig:
    for field, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if field in hf and hf[field] != ok:
            raise unsupported(field, hf[field], "GPT-2", f"only {ok}")
    d = hf["n_embd"]
    return ModelConfig(
        architecture="decoder", vocab_size=hf["vocab_size"], hidden_size=d,
        num_layers=hf["n_layer"], num_heads=hf["n_head"], mlp_dim=hf.get("n_inner") or 4 * d,
        activation=_activation(hf, "activation_function", "GPT-2"), norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), pre_norm=True, final_norm=True,
        position="learned", max_length=hf.get("n_positions", 1024),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        dropout_rate=hf.get("resid_pdrop", 0.1), attention_dropout_rate=hf.get("attn_pdrop", 0.1),
        initializer_range=hf.get("initializer_range", 0.02), scale_residual_init=True,
    )


def _gpt2_specs(c: ModelConfig, p: str) -> Specs:
    d, h, hd, f, v = c.hidden_size, c.num_heads, c.dim_per_head, c.mlp_dim, c.vocab_size
    layer = lambda suffix: m.per_layer(p + "h.{i}." + suffix, c.num_layers)
    s: Specs = {
        "embeddings.tokens": m.plain(p + "wte.weight", (v, d)),
        "embeddings.positions": m.plain(p + "wpe.weight", (c.max_length, d)),
    }
    a = "layers.blocks.attention."
    # c_attn is a Conv1D [embed, 3 * embed] holding query, key and value side by side.
    for i, ours in enumerate(("query", "key", "value")):
        s[a + ours] = m.Spec(layer("attn.c_attn.weight"), ((d,), (h, hd)), (0, 1, 2), stacked=True,
                             window=(1, i * d, 3 * d))
        s[a + ours + "_bias"] = m.Spec(layer("attn.c_attn.bias"), ((h, hd),), (0, 1), stacked=True,
                                       window=(0, i * d, 3 * d))
    s[a + "out"] = m.Spec(layer("attn.c_proj.weight"), ((h, hd), (d,)), (0, 1, 2), stacked=True)
    s[a + "out_bias"] = m.plain(layer("attn.c_proj.bias"), (d,), stacked=True)
    _norm(s, "layers.blocks.attention_norm", layer("ln_1"), d)
    s["layers.blocks.mlp.wi"] = m.plain(layer("mlp.c_fc.weight"), (d, f), stacked=True)
    s["layers.blocks.mlp.bi"] = m.plain(layer("mlp.c_fc.bias"), (f,), stacked=True)
    s["layers.blocks.mlp.wo"] = m.plain(layer("mlp.c_proj.weight"), (f, d), stacked=True)
    s["layers.blocks.mlp.bo"] = m.plain(layer("mlp.c_proj.bias"), (d,), stacked=True)
    _norm(s, "layers.blocks.mlp_norm", layer("ln_2"), d)
    _norm(s, "final_norm", p + "ln_f", d)
    if not c.tie_embeddings:
        s["lm_head"] = m.transposed("lm_head.weight", v, d)
    return s


def _gpt2_to_hf(c: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
        "n_embd": c.hidden_size, "n_layer": c.num_layers, "n_head": c.num_heads,
        "n_inner": c.mlp_dim, "activation_function": ACTIVATIONS_TO_HF[c.activation],
        "layer_norm_epsilon": c.norm_eps, "n_positions": c.max_length,
        "resid_pdrop": c.dropout_rate, "embd_pdrop": c.dropout_rate,
        "attn_pdrop": c.attention_dropout_rate, "initializer_range": c.initializer_range,
        "tie_word_embeddings": c.tie_embeddings, "scale_attn_weights": True,
    }


def _gpt2_requirements(c: ModelConfig) -> dict[str, Any]:
    return dict(architecture="decoder", norm="layernorm", pre_norm=True, final_norm=True,
                embedding_norm=False, position="learned", gated_mlp=False, attention_bias=True,
                mlp_bias=True, kv_heads=c.num_heads, dim_per_head=c.hidden_size // c.num_heads,
                type_vocab_size=0, num_experts=0)


GPT2 = Family(
    "GPT-2", ("gpt2",), _gpt2_config, _gpt2_to_hf, _gpt2_specs, ("", "transformer."), "wte.weight",
    lambda c: "transformer.", _gpt2_requirements,
)


# ---------------------------------------------------------------------------------- Llama/Mistral

_ROPE = {"default": "none", "linear": "linear", "llama3": "llama3"}


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE:
        raise unsupported("rope_type", kind, "Llama", f"supported: {sorted(_ROPE)}")
    out = {"rope_base": float(params.get("rope_theta", hf.get("rope_theta", 10000.0))),
           "rope_scaling": _ROPE[kind]}
    if kind in ("linear", "llama3"):
        out["rope_factor"] = float(params["factor"])
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]),
                   rope_original_max_length=int(params["original_max_position_embeddings"]))
    return out


def _llama_config(hf: dict[str, Any], names: Collection[str]) -> ModelConfig:
    if hf.get("mlp_bias"):
        raise unsupported("mlp_bias", True, "Llama", "only false")
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d // heads
    return ModelConfig(
        architecture="decoder", vocab_size=hf["vocab_size"], hidden_size=d,
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=None if head_dim * heads == d else head_dim, mlp_dim=hf["intermediate_size"],
        activation=_activation(hf, "hidden_act", "Llama"), gated_mlp=True, norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), pre_norm=True, final_norm=True, position="rope",
        max_length=hf.get("max_position_embeddings", 4096), **_rope(hf),
        attention_bias=bool(hf.get("attention_bias", False)), mlp_bias=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dropout_rate=0.0,
        attention_dropout_rate=float(hf.get("attention_dropout", 0.0)),
        initializer_range=hf.get("initializer_range", 0.02), sliding_window=window,
    )


def _llama_specs(c: ModelConfig, p: str) -> Specs:
    d, h, k, hd, f, v = (c.hidden_size, c.num_heads, c.kv_heads, c.dim_per_head, c.mlp_dim,
                         c.vocab_size)
    layer = lambda suffix: m.per_layer(p + "layers.{i}." + suffix, c.num_layers)
    s: Specs = {"embeddings.tokens": m.plain(p + "embed_tokens.weight", (v, d))}
    a = "layers.blocks.attention."
    for ours, theirs, n in (("query", "q_proj", h), ("key", "k_proj", k), ("value", "v_proj", k)):
        s[a + ours] = m.heads_in(layer(f"self_attn.{theirs}.weight"), d, n, hd, stacked=True)
        if c.attention_bias:
            s[a + ours + "_bias"] = m.heads_bias(layer(f"self_attn.{theirs}.bias"), n, hd, stacked=True)
    s[a + "out"] = m.heads_out(layer("self_attn.o_proj.weight"), d, h, hd, stacked=True)
    if c.attention_bias:
        s[a + "out_bias"] = m.plain(layer("self_attn.o_proj.bias"), (d,), stacked=True)
    _norm(s, "layers.blocks.attention_norm", layer("input_layernorm"), d, bias=False)
    _norm(s, "layers.blocks.mlp_norm", layer("post_attention_layernorm"), d, bias=False)
    # Ours: act(x·wi) * (x·wi_gate) · wo; HF: down(act(gate(x)) * up(x)).
    s["layers.blocks.mlp.wi"] = m.transposed(layer("mlp.gate_proj.weight"), f, d, stacked=True)
    s["layers.blocks.mlp.wi_gate"] = m.transposed(layer("mlp.up_proj.weight"), f, d, stacked=True)
    s["layers.blocks.mlp.wo"] = m.transposed(layer("mlp.down_proj.weight"), d, f, stacked=True)
    _norm(s, "final_norm", p + "norm", d, bias=False)
    if not c.tie_embeddings:
        s["lm_head"] = m.transposed("lm_head.weight", v, d)
    return s


def _llama_to_hf(c: ModelConfig) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": {"none": "default"}.get(c.rope_scaling, c.rope_scaling),
                            "rope_theta": c.rope_base}
    if c.rope_scaling != "none":
        rope["factor"] = c.rope_factor
    if c.rope_scaling == "llama3":
        rope.update(low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor,
                    original_max_position_embeddings=c.rope_original_max_length)
    act = {"gelu_tanh": "gelu_pytorch_tanh"}.get(c.activation, c.activation)
    # Llama has no sliding window; Mistral has one and no biases.
    window = {"sliding_window": c.sliding_window} if c.sliding_window else {}
    kind = "mistral" if window and not c.attention_bias else "llama"
    if window and c.attention_bias:
        raise ValueError("no Hugging Face Llama/Mistral model has both a sliding window and "
                         "attention biases; export needs one of them off")
    return {
        "architectures": [f"{kind.capitalize()}ForCausalLM"], "model_type": kind, **window,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.kv_heads,
        "head_dim": c.dim_per_head, "intermediate_size": c.mlp_dim, "hidden_act": act,
        "rms_norm_eps": c.norm_eps, "max_position_embeddings": c.max_length,
        "rope_theta": c.rope_base, "rope_parameters": rope, "attention_bias": c.attention_bias,
        "mlp_bias": False, "attention_dropout": c.attention_dropout_rate,
        "tie_word_embeddings": c.tie_embeddings, "initializer_range": c.initializer_range,
    }


def _llama_requirements(c: ModelConfig) -> dict[str, Any]:
    return dict(architecture="decoder", norm="rmsnorm", pre_norm=True, final_norm=True,
                embedding_norm=False, position="rope", gated_mlp=True, mlp_bias=False,
                type_vocab_size=0, num_experts=0)


LLAMA = Family(
    "Llama", ("llama", "mistral"), _llama_config, _llama_to_hf, _llama_specs, ("", "model."),
    "embed_tokens.weight", lambda c: "model.", _llama_requirements,
)


# ------------------------------------------------------------------------ Mixtral and Qwen2-MoE
#
# Two layouts of the experts: the Hub's one tensor per expert (what save_pretrained writes,
# `block_sparse_moe.experts.{j}.w1` for Mixtral, `mlp.experts.{j}.gate_proj` for Qwen2-MoE), and
# transformers 5's fused modules (`mlp.experts.gate_up_proj` [E, 2f, d], `mlp.experts.down_proj`
# [E, d, f]). Import reads either; export writes the Hub layout, which transformers 5 converts.


def _moe_config(hf: dict[str, Any], names: Collection[str], experts_key: str,
                family: str) -> dict[str, Any]:
    if hf.get("router_jitter_noise"):
        raise unsupported("router_jitter_noise", hf["router_jitter_noise"], family, "only 0")
    return dict(num_experts=hf[experts_key], num_experts_per_token=hf["num_experts_per_tok"],
                router_aux_loss_weight=float(hf.get("router_aux_loss_coef", 0.0)))


def _mixtral_config(hf: dict[str, Any], names: Collection[str]) -> ModelConfig:
    return _llama_config(hf, names).replace(
        **_moe_config(hf, names, "num_local_experts", "Mixtral"), moe_renormalize=True)


def _qwen2_moe_config(hf: dict[str, Any], names: Collection[str]) -> ModelConfig:
    if hf.get("mlp_only_layers"):
        raise unsupported("mlp_only_layers", hf["mlp_only_layers"], "Qwen2-MoE", "only []")
    return _llama_config({**hf, "attention_bias": hf.get("qkv_bias", True)}, names).replace(
        **_moe_config(hf, names, "num_experts", "Qwen2-MoE"), moe_mlp_dim=hf["moe_intermediate_size"],
        moe_shared_expert_dim=hf["shared_expert_intermediate_size"],
        moe_renormalize=bool(hf.get("norm_topk_prob", False)),
        moe_every=hf.get("decoder_sparse_step", 1))


def _expert_specs(c: ModelConfig, mlp: str, hub: tuple[str, str, str], names: Collection[str],
                  ) -> Specs:
    """Router and experts of every layer; `mlp` is the HF module of the block, `hub` the names
    of the per-expert gate, up and down projections. Fused when the checkpoint holds them so."""
    d, f, e, layers = c.hidden_size, c.expert_dim, c.num_experts, c.num_layers
    o = "layers.blocks.mlp."
    s: Specs = {}
    if any(n.endswith(".mlp.experts.gate_up_proj") for n in names):
        mlp = mlp.replace(".block_sparse_moe", ".mlp")
        layer = lambda suffix: m.per_layer(mlp + suffix, layers)
        for i, ours in enumerate(("wi", "wi_gate")):
            s[o + ours] = m.Spec(layer(".experts.gate_up_proj"), ((e,), (f,), (d,)), (0, 2, 1),
                                 stacked=True, window=(1, i * f, 2 * f))
        s[o + "wo"] = m.Spec(layer(".experts.down_proj"), ((e,), (d,), (f,)), (0, 2, 1),
                             stacked=True)
    else:
        per_expert = lambda name: tuple(f"{mlp.format(i=i)}.experts.{j}.{name}.weight"
                                        for i in range(layers) for j in range(e))
        gate, up, down = hub
        s[o + "wi"] = m.transposed(per_expert(gate), f, d, stacked=True, experts=e)
        s[o + "wi_gate"] = m.transposed(per_expert(up), f, d, stacked=True, experts=e)
        s[o + "wo"] = m.transposed(per_expert(down), d, f, stacked=True, experts=e)
    s[o + "router"] = m.transposed(m.per_layer(mlp + ".gate.weight", layers), e, d, stacked=True)
    return s


def _dense_attention_specs(c: ModelConfig, p: str) -> Specs:
    return {k: v for k, v in _llama_specs(c, p).items() if not k.startswith("layers.blocks.mlp.")}


def _mixtral_specs(c: ModelConfig, p: str, names: Collection[str] = ()) -> Specs:
    return {**_dense_attention_specs(c, p), **_expert_specs(
        c, p + "layers.{i}.block_sparse_moe", ("w1", "w3", "w2"), names)}


def _qwen2_moe_specs(c: ModelConfig, p: str, names: Collection[str] = ()) -> Specs:
    dense = _llama_specs(c, p)  # Attention, norms and the dense MLP, for every layer.
    dense.pop("layers.blocks.attention.out_bias", None)  # Qwen2 has no o_proj bias: ours stays 0.
    experts = _expert_specs(c, p + "layers.{i}.mlp", ("gate_proj", "up_proj", "down_proj"), names)
    layer = lambda suffix: m.per_layer(p + "layers.{i}.mlp." + suffix, c.num_layers)
    k, d, o = c.moe_shared_expert_dim, c.hidden_size, "layers.blocks.mlp."
    experts[o + "shared_wi"] = m.transposed(layer("shared_expert.gate_proj.weight"), k, d,
                                            stacked=True)
    experts[o + "shared_wi_gate"] = m.transposed(layer("shared_expert.up_proj.weight"), k, d,
                                                 stacked=True)
    experts[o + "shared_wo"] = m.transposed(layer("shared_expert.down_proj.weight"), d, k,
                                            stacked=True)
    experts[o + "shared_gate"] = m.transposed(layer("shared_expert_gate.weight"), 1, d,
                                              stacked=True)
    if c.moe_every == 1:
        return {**{n: v for n, v in dense.items() if not n.startswith(o)}, **experts}
    # decoder_sparse_step k: layers (i + 1) % k == 0 are MoE (our `moe_blocks`), others dense.
    moe_layers = [i for i in range(c.num_layers) if (i + 1) % c.moe_every == 0]
    dense_layers = [i for i in range(c.num_layers) if (i + 1) % c.moe_every]
    s = {n: v for n, v in dense.items() if not n.startswith("layers.")}
    for n, v in dense.items():
        if n.startswith("layers.blocks."):
            s[n] = m.select_layers(v, dense_layers)
            if not n.startswith(o):
                s[n.replace("layers.blocks.", "layers.moe_blocks.")] = m.select_layers(v, moe_layers)
    for n, v in experts.items():
        s[n.replace("layers.blocks.", "layers.moe_blocks.")] = m.select_layers(v, moe_layers)
    return s


def _moe_to_hf(c: ModelConfig, kind: str) -> dict[str, Any]:
    hf = _llama_to_hf(c)
    hf.update(architectures=[f"{kind}ForCausalLM"], num_experts_per_tok=c.num_experts_per_token,
              router_aux_loss_coef=c.router_aux_loss_weight, output_router_logits=False)
    for key in ("mlp_bias", "attention_bias"):
        hf.pop(key)
    return hf


def _mixtral_to_hf(c: ModelConfig) -> dict[str, Any]:
    hf = _moe_to_hf(c, "Mixtral")
    hf.update(model_type="mixtral", num_local_experts=c.num_experts, router_jitter_noise=0.0,
              sliding_window=c.sliding_window)
    return hf


def _qwen2_moe_to_hf(c: ModelConfig) -> dict[str, Any]:
    hf = _moe_to_hf(c, "Qwen2Moe")
    hf.update(model_type="qwen2_moe", num_experts=c.num_experts, moe_intermediate_size=c.expert_dim,
              shared_expert_intermediate_size=c.moe_shared_expert_dim, qkv_bias=c.attention_bias,
              norm_topk_prob=c.moe_renormalize, decoder_sparse_step=c.moe_every,
              intermediate_size=c.mlp_dim, mlp_only_layers=[],
              use_sliding_window=c.sliding_window is not None,
              sliding_window=c.sliding_window or 4096)
    return hf


def _moe_requirements(c: ModelConfig, shared: bool) -> dict[str, Any]:
    return dict(architecture="decoder", norm="rmsnorm", pre_norm=True, final_norm=True,
                embedding_norm=False, position="rope", gated_mlp=True, mlp_bias=False,
                type_vocab_size=0, num_experts=max(c.num_experts, 1),
                moe_every=c.moe_every if shared else 1,
                moe_shared_expert_dim=max(c.moe_shared_expert_dim, 1) if shared else 0)


MIXTRAL = Family(
    "Mixtral", ("mixtral",), _mixtral_config, _mixtral_to_hf, _mixtral_specs, ("", "model."),
    "embed_tokens.weight", lambda c: "model.",
    lambda c: {**_moe_requirements(c, shared=False), "attention_bias": False,
               "moe_renormalize": True},
)
QWEN2_MOE = Family(
    "Qwen2-MoE", ("qwen2_moe",), _qwen2_moe_config, _qwen2_moe_to_hf, _qwen2_moe_specs,
    ("", "model."), "embed_tokens.weight", lambda c: "model.",
    lambda c: _moe_requirements(c, shared=True),
)


# ------------------------------------------------------------------------------ T5 and BART
#
# Our encoder-decoder (transformer/models/encoder_decoder.py) holds one token table
# ('embeddings.tokens', HF 'shared'), then 'encoder.*' and 'decoder.*' stacks of blocks; the
# decoder's blocks add 'cross_attention' and its norm.


def _t5_config(hf: dict[str, Any], names: Collection[str]) -> ModelConfig:
    projection = hf.get("feed_forward_proj", "relu")
    gated = projection.startswith("gated-")
    act = hf.get("dense_act_fn") or projection.split("-")[-1]
    act = "gelu_new" if projection == "gated-gelu" else act
    if act not in ACTIVATIONS_FROM_HF:
        raise unsupported("feed_forward_proj", projection, "T5", "relu, gated-gelu, gated-silu")
    tied = hf.get("tie_word_embeddings", True) is not False or "lm_head.weight" not in names
    # transformers 5 ties the head always and says whether to scale in scale_decoder_outputs;
    # older configs said it with tie_word_embeddings (T5 v1.0: tied and scaled; v1.1: neither).
    scaled = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    return ModelConfig(
        architecture="encoder_decoder", vocab_size=hf["vocab_size"], hidden_size=hf["d_model"],
        num_layers=hf["num_layers"], num_decoder_layers=hf.get("num_decoder_layers"),
        num_heads=hf["num_heads"], head_dim=hf["d_kv"], mlp_dim=hf["d_ff"],
        activation=ACTIVATIONS_FROM_HF[act], gated_mlp=gated, norm="rmsnorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), pre_norm=True, final_norm=True,
        position="relative", relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        max_length=hf.get("n_positions", 512), attention_bias=False, mlp_bias=False,
        scaled_attention=False, tie_embeddings=tied, scale_decoder_output=bool(scaled),
        dropout_rate=hf.get("dropout_rate", 0.1), initializer="t5",
        initializer_factor=hf.get("initializer_factor", 1.0),
        decoder_start_token_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)),
    )


def _attention_specs(s: Specs, ours: str, layer: Callable[[str], tuple[str, ...]],
                     names: tuple[str, str, str, str], c: ModelConfig, bias: bool) -> None:
    """q, k, v, o projections of one attention module in every layer (`names` in HF)."""
    d, h, hd = c.hidden_size, c.num_heads, c.dim_per_head
    for part, theirs in zip(("query", "key", "value"), names[:3]):
        s[f"{ours}.{part}"] = m.heads_in(layer(theirs + ".weight"), d, h, hd, stacked=True)
        if bias:
            s[f"{ours}.{part}_bias"] = m.heads_bias(layer(theirs + ".bias"), h, hd, stacked=True)
    s[f"{ours}.out"] = m.heads_out(layer(names[3] + ".weight"), d, h, hd, stacked=True)
    if bias:
        s[f"{ours}.out_bias"] = m.plain(layer(names[3] + ".bias"), (d,), stacked=True)


def _t5_specs(c: ModelConfig, p: str) -> Specs:
    d, f, v = c.hidden_size, c.mlp_dim, c.vocab_size
    s: Specs = {"embeddings.tokens": m.plain(p + "shared.weight", (v, d))}
    qkvo = ("q", "k", "v", "o")
    for side, layers in (("encoder", c.num_layers), ("decoder", c.decoder_layers)):
        layer = lambda suffix, side=side, n=layers: m.per_layer(
            f"{p}{side}.block.{{i}}.layer.{suffix}", n)
        b = f"{side}.layers.blocks."
        s[f"{side}.relative_bias"] = m.plain(
            f"{p}{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            (c.relative_buckets, c.num_heads))
        _attention_specs(s, b + "attention", layer, tuple(f"0.SelfAttention.{n}" for n in qkvo),
                         c, bias=False)
        _norm(s, b + "attention_norm", layer("0.layer_norm"), d, bias=False)
        mlp = "1" if side == "encoder" else "2"
        if side == "decoder":
            _attention_specs(s, b + "cross_attention", layer,
                             tuple(f"1.EncDecAttention.{n}" for n in qkvo), c, bias=False)
            _norm(s, b + "cross_attention_norm", layer("1.layer_norm"), d, bias=False)
        dense = f"{mlp}.DenseReluDense."
        if c.gated_mlp:  # HF: wo(act(wi_0 x) * wi_1 x); ours: act(x·wi) * (x·wi_gate) · wo.
            s[b + "mlp.wi"] = m.transposed(layer(dense + "wi_0.weight"), f, d, stacked=True)
            s[b + "mlp.wi_gate"] = m.transposed(layer(dense + "wi_1.weight"), f, d, stacked=True)
        else:
            s[b + "mlp.wi"] = m.transposed(layer(dense + "wi.weight"), f, d, stacked=True)
        s[b + "mlp.wo"] = m.transposed(layer(dense + "wo.weight"), d, f, stacked=True)
        _norm(s, b + "mlp_norm", layer(f"{mlp}.layer_norm"), d, bias=False)
        _norm(s, f"{side}.final_norm", f"{p}{side}.final_layer_norm", d, bias=False)
    if not c.tie_embeddings:
        s["lm_head"] = m.transposed("lm_head.weight", v, d)
    return s


def _t5_to_hf(c: ModelConfig) -> dict[str, Any]:
    act = ACTIVATIONS_TO_HF[c.activation]
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
        "is_encoder_decoder": True, "vocab_size": c.vocab_size, "d_model": c.hidden_size,
        "num_layers": c.num_layers, "num_decoder_layers": c.decoder_layers,
        "num_heads": c.num_heads, "d_kv": c.dim_per_head, "d_ff": c.mlp_dim,
        "feed_forward_proj": f"gated-{act}" if c.gated_mlp else act, "dense_act_fn": act,
        "is_gated_act": c.gated_mlp, "layer_norm_epsilon": c.norm_eps,
        "relative_attention_num_buckets": c.relative_buckets,
        "relative_attention_max_distance": c.relative_max_distance,
        "dropout_rate": c.dropout_rate, "tie_word_embeddings": c.tie_embeddings,
        "scale_decoder_outputs": c.scale_decoder_output, "pad_token_id": 0, "eos_token_id": 1,
        "decoder_start_token_id": c.decoder_start_token_id,
        "initializer_factor": c.initializer_factor,
    }


_ENCODER_DECODER = dict(architecture="encoder_decoder", num_experts=0, lora_rank=0,
                        type_vocab_size=0, embedding_scale=False)


def _t5_requirements(c: ModelConfig) -> dict[str, Any]:
    return dict(_ENCODER_DECODER, position="relative", norm="rmsnorm", pre_norm=True,
                final_norm=True, embedding_norm=False, attention_bias=False, mlp_bias=False,
                scaled_attention=False, final_logits_bias=False, kv_heads=c.num_heads)


T5 = Family(
    "T5", ("t5",), _t5_config, _t5_to_hf, _t5_specs, ("",), "shared.weight", lambda c: "",
    _t5_requirements,
)


def _bart_config(hf: dict[str, Any], names: Collection[str]) -> ModelConfig:
    for ours, theirs in (("encoder_attention_heads", "decoder_attention_heads"),
                         ("encoder_ffn_dim", "decoder_ffn_dim")):
        if hf.get(ours) != hf.get(theirs, hf.get(ours)):
            raise unsupported(theirs, hf[theirs], "BART", f"only equal to {ours}={hf[ours]}")
    for field in ("normalize_before", "add_final_layer_norm"):
        if hf.get(field):
            raise unsupported(field, hf[field], "BART", "only false (BART, not mBART)")
    return ModelConfig(
        architecture="encoder_decoder", vocab_size=hf["vocab_size"], hidden_size=hf["d_model"],
        num_layers=hf["encoder_layers"], num_decoder_layers=hf["decoder_layers"],
        num_heads=hf["encoder_attention_heads"], mlp_dim=hf["encoder_ffn_dim"],
        activation=_activation(hf, "activation_function", "BART"), norm="layernorm",
        norm_eps=1e-5, pre_norm=False, final_norm=False, embedding_norm=True,
        position="learned", position_offset=2, max_length=hf.get("max_position_embeddings", 1024),
        embedding_scale=bool(hf.get("scale_embedding", False)), tie_embeddings=True,
        final_logits_bias=True, dropout_rate=hf.get("dropout", 0.1),
        attention_dropout_rate=hf.get("attention_dropout", 0.0),
        initializer_range=hf.get("init_std", 0.02),
        decoder_start_token_id=hf.get("decoder_start_token_id", 2),
    )


def _bart_specs(c: ModelConfig, p: str, names: Collection[str] = ()) -> Specs:
    """`names`: the checkpoint's tensors; one without final_logits_bias (a BartModel, or a
    checkpoint that left the zero buffer out) leaves ours at zero."""
    d, f, v = c.hidden_size, c.mlp_dim, c.vocab_size
    s: Specs = {"embeddings.tokens": m.plain(p + "shared.weight", (v, d))}
    if not names or "final_logits_bias" in names:
        s["logits_bias"] = m.plain("final_logits_bias", (1, v))
    for side, layers in (("encoder", c.num_layers), ("decoder", c.decoder_layers)):
        layer = lambda suffix, side=side, n=layers: m.per_layer(
            f"{p}{side}.layers.{{i}}.{suffix}", n)
        b = f"{side}.layers.blocks."
        s[f"{side}.positions"] = m.plain(f"{p}{side}.embed_positions.weight",
                                         (c.max_length + c.position_offset, d))
        _norm(s, f"{side}.embedding_norm", f"{p}{side}.layernorm_embedding", d)
        qkvo = ("q_proj", "k_proj", "v_proj", "out_proj")
        _attention_specs(s, b + "attention", layer, tuple(f"self_attn.{n}" for n in qkvo), c,
                         bias=True)
        _norm(s, b + "attention_norm", layer("self_attn_layer_norm"), d)
        if side == "decoder":
            _attention_specs(s, b + "cross_attention", layer,
                             tuple(f"encoder_attn.{n}" for n in qkvo), c, bias=True)
            _norm(s, b + "cross_attention_norm", layer("encoder_attn_layer_norm"), d)
        s[b + "mlp.wi"] = m.transposed(layer("fc1.weight"), f, d, stacked=True)
        s[b + "mlp.bi"] = m.plain(layer("fc1.bias"), (f,), stacked=True)
        s[b + "mlp.wo"] = m.transposed(layer("fc2.weight"), d, f, stacked=True)
        s[b + "mlp.bo"] = m.plain(layer("fc2.bias"), (d,), stacked=True)
        _norm(s, b + "mlp_norm", layer("final_layer_norm"), d)
    return s


def _bart_to_hf(c: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["BartForConditionalGeneration"], "model_type": "bart",
        "is_encoder_decoder": True, "vocab_size": c.vocab_size, "d_model": c.hidden_size,
        "encoder_layers": c.num_layers, "decoder_layers": c.decoder_layers,
        "encoder_attention_heads": c.num_heads, "decoder_attention_heads": c.num_heads,
        "encoder_ffn_dim": c.mlp_dim, "decoder_ffn_dim": c.mlp_dim,
        "activation_function": ACTIVATIONS_TO_HF[c.activation],
        "max_position_embeddings": c.max_length, "scale_embedding": c.embedding_scale,
        "dropout": c.dropout_rate, "attention_dropout": c.attention_dropout_rate,
        "activation_dropout": 0.0, "init_std": c.initializer_range,
        "tie_word_embeddings": True, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
        "decoder_start_token_id": c.decoder_start_token_id, "forced_eos_token_id": 2,
    }


def _bart_requirements(c: ModelConfig) -> dict[str, Any]:
    return dict(_ENCODER_DECODER, position="learned", position_offset=2, norm="layernorm",
                norm_eps=1e-5, pre_norm=False, final_norm=False, embedding_norm=True,
                attention_bias=True, mlp_bias=True, gated_mlp=False, tie_embeddings=True,
                scaled_attention=True, final_logits_bias=True, scale_decoder_output=False,
                kv_heads=c.num_heads, dim_per_head=c.hidden_size // c.num_heads)


BART = Family(
    "BART", ("bart",), _bart_config, _bart_to_hf, _bart_specs, ("model.", ""), "shared.weight",
    lambda c: "model.", _bart_requirements,
)

# Families whose specs depend on the checkpoint's tensor names (the expert layout, BART's
# optional final_logits_bias).
LAYOUT_DEPENDENT = (MIXTRAL, QWEN2_MOE, BART)

FAMILIES = (BERT, GPT2, LLAMA, MIXTRAL, QWEN2_MOE, T5, BART)


def specs_for(family: Family, config: ModelConfig, prefix: str,
              names: Collection[str] = ()) -> Specs:
    """The family's specs for a checkpoint holding the tensors `names` (() = export layout)."""
    if family in LAYOUT_DEPENDENT:
        return family.specs(config, prefix, names)
    return family.specs(config, prefix)


def family_for_model_type(model_type: str | None) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = sorted(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"unknown architecture: config.json model_type={model_type!r}; supported: {known}")


def family_for_config(config: ModelConfig) -> Family:
    """The HF family our config can be written as, or an error naming the fields that differ."""
    mismatches = {}
    for family in FAMILIES:
        wanted = family.requirements(config)
        bad = {k: (getattr(config, k), v) for k, v in wanted.items() if getattr(config, k) != v}
        if not bad:
            return family
        mismatches[family.name] = bad
    detail = "; ".join(
        f"{name}: " + ", ".join(f"{k}={have!r} (needs {want!r})" for k, (have, want) in bad.items())
        for name, bad in mismatches.items()
    )
    raise ValueError(f"this model has no Hugging Face equivalent; closest families differ in {detail}")
