"""One model configuration for every family (BERT, GPT-2, Llama, MoE, T5, BART) and the named presets."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "sinusoidal", "rope", "relative", "none")
# 'splash', 'splash_interpret', 'cudnn': fused kernels (transformer/models/kernels/).
ATTENTION_IMPLS = ("einsum", "xla", "splash", "splash_interpret", "cudnn")
CONTEXT_STRATEGIES = ("ring", "all_gather")  # transformer/models/context_parallel.py
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ARCHITECTURES = ("encoder", "decoder", "encoder_decoder")
INITIALIZERS = ("normal", "t5")
ROPE_SCALINGS = ("none", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")
MOE_IMPLS = ("dropless", "dense")
MOE_DISPATCHES = ("partitioner", "all_to_all")
# Weights a LoRA adapter can target, and how many of their leading axes are inputs.
LORA_TARGETS = {"query": 1, "key": 1, "value": 1, "out": 2, "wi": 1, "wi_gate": 1, "wo": 1}
# Other names a target list may use: groups, and the Llama/Mistral module names of Hugging Face.
LORA_ALIASES = {
    "all-linear": tuple(LORA_TARGETS), "attention": ("query", "key", "value", "out"),
    "mlp": ("wi", "wi_gate", "wo"), "q_proj": ("query",), "k_proj": ("key",),
    "v_proj": ("value",), "o_proj": ("out",), "gate_proj": ("wi",), "up_proj": ("wi_gate",),
    "down_proj": ("wo",),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Describes every model variant; validated at construction.

    The field names follow the Transformer literature; `num_kv_heads < num_heads` gives
    grouped-query attention (1 = multi-query).
    """

    architecture: str = "decoder"  # 'encoder' (bidirectional, BERT), 'decoder' (causal, GPT/Llama)
    # or 'encoder_decoder' (T5, BART).
    vocab_size: int = 32000  # Rows of the token-embedding table.
    hidden_size: int = 768  # Width of the residual stream ('embed' axis).
    num_layers: int = 12  # Transformer blocks.
    num_heads: int = 12  # Query heads.
    num_kv_heads: int | None = None  # Key/value heads (None = num_heads).
    head_dim: int | None = None  # Per-head width (None = hidden_size // num_heads).
    mlp_dim: int = 3072  # Hidden width of the feed-forward block.
    activation: str = "gelu"  # One of ACTIVATIONS.
    gated_mlp: bool = False  # Gated feed-forward (SwiGLU with silu, GeGLU with gelu).
    norm: str = "layernorm"  # 'layernorm' or 'rmsnorm'.
    norm_eps: float = 1e-5  # Epsilon inside the normalization.
    pre_norm: bool = True  # Pre-LN (GPT-2, Llama) or post-LN (BERT) residual blocks.
    final_norm: bool = True  # Norm after the last block (pre-LN models need it).
    position: str = "learned"  # One of POSITIONS.
    max_length: int = 1024  # Longest sequence (size of a learned position table).
    rope_base: float = 10000.0  # RoPE wavelength base (theta).
    rope_scaling: str = "none"  # 'none', 'linear' (positions / factor) or 'llama3'.
    rope_factor: float = 1.0  # Scaling factor of 'linear' and 'llama3'.
    rope_low_freq_factor: float = 1.0  # Llama-3 scaling: low-frequency factor.
    rope_high_freq_factor: float = 4.0  # Llama-3 scaling: high-frequency factor.
    rope_original_max_length: int = 8192  # Llama-3 scaling: pre-training context length.
    type_vocab_size: int = 0  # Token-type (segment) embeddings; BERT uses 2.
    attention_bias: bool = True  # Biases on the Q/K/V/output projections.
    mlp_bias: bool = True  # Biases on the feed-forward projections.
    tie_embeddings: bool = True  # LM head shares the token-embedding matrix.
    pooler: bool = False  # BERT pooler (dense + tanh on the first token).
    mlm_head: bool = False  # BERT masked-LM head transform (dense + act + norm) before the output.
    embedding_norm: bool = False  # Norm right after the embeddings (BERT).
    dropout_rate: float = 0.0  # Dropout on embeddings and residual branches.
    attention_dropout_rate: float = 0.0  # Dropout on the attention weights.
    attention_impl: str = "xla"  # 'einsum' (reference) or 'xla' (jax.nn.dot_product_attention);
    # fused kernels: 'splash' (TPU), 'cudnn' (GPU), 'splash_interpret' (tests) (models/kernels/).
    sliding_window: int | None = None  # Decoders: each token sees itself and the previous W-1.
    # Under a 'context' mesh axis (the sequence split over devices): 'ring' passes key/value
    # blocks around the devices, 'all_gather' gathers them all (transformer/models/context_parallel.py).
    context_parallel: str = "ring"
    context_load_balance: bool = True  # Causal: batches laid out zig-zag (the train step does it).
    initializer_range: float = 0.02  # Std of the normal initializers.
    # 'normal': every weight normal(0, initializer_range); 't5': T5's per-weight-kind fan-in
    # scaling times initializer_factor (as transformers' T5PreTrainedModel._init_weights), which
    # its unscaled attention logits and d^-1/2-scaled tied output rely on.
    initializer: str = "normal"
    initializer_factor: float = 1.0  # Scales every std of initializer='t5' (T5's own factor).
    scale_residual_init: bool = False  # GPT-2: output projections init std / sqrt(2 * layers).
    param_dtype: str = "float32"  # Storage dtype of the parameters.
    dtype: str = "float32"  # Compute dtype (activations and matmuls); softmax stays float32.
    scan_layers: bool = True  # Run the layer stack with lax.scan (one compiled layer) or unrolled.
    remat_policy: str = "none"  # One of REMAT_POLICIES: what the backward pass recomputes.
    lora_rank: int = 0  # LoRA adapters of this rank on `lora_targets` (0 = none).
    lora_alpha: float = 16.0  # The update is scaled by lora_alpha / lora_rank.
    lora_targets: tuple[str, ...] = ()  # Names in LORA_TARGETS or LORA_ALIASES.
    lora_dropout: float = 0.0  # Dropout on the adapters' inputs.
    lora_rslora: bool = False  # Scale by lora_alpha / sqrt(lora_rank) (rank-stabilized LoRA).
    # Mixture of experts (transformer/models/moe.py): 0 = a dense feed-forward block everywhere.
    num_experts: int = 0  # Experts of each MoE feed-forward block.
    num_experts_per_token: int = 2  # Top-k experts each token is routed to.
    moe_mlp_dim: int | None = None  # Hidden width of each expert (None = mlp_dim).
    moe_every: int = 1  # Layers i with (i + 1) % moe_every == 0 are MoE (Qwen2-MoE sparse step).
    moe_renormalize: bool = True  # Top-k weights renormalized to sum 1 (Mixtral; Qwen2-MoE: no).
    moe_shared_expert_dim: int = 0  # Width of an always-on shared expert with a sigmoid gate.
    moe_impl: str = "dropless"  # 'dropless' (sorted grouped matmuls) or 'dense' (reference).
    # How tokens reach experts split over the 'expert' mesh axis: 'partitioner' (XLA's SPMD
    # partitioner moves them) or 'all_to_all' (explicit exchange in shard_map, moe_all_to_all.py).
    moe_dispatch: str = "partitioner"
    # 0 = dropless; f > 0: each expert takes at most ceil(f · length · top_k / E) (token, choice)
    # pairs of a sequence, first choices first, then by position; the rest are dropped (counted).
    moe_capacity_factor: float = 0.0
    router_aux_loss_weight: float = 0.0  # Weight of the load-balancing loss (Mixtral 0.02).
    router_z_loss_weight: float = 0.0  # Weight of the router z-loss (ST-MoE 0.001).
    # Encoder-decoders (transformer/models/encoder_decoder.py: T5, BART).
    num_decoder_layers: int | None = None  # Decoder blocks (None = num_layers).
    relative_buckets: int = 32  # position='relative' (T5): buckets of the relative position bias.
    relative_max_distance: int = 128  # Distances from here on share the last bucket.
    position_offset: int = 0  # Learned positions are looked up at position + offset (BART: 2).
    scaled_attention: bool = True  # Logits divided by sqrt(head_dim) (T5: no, its init absorbs it).
    embedding_scale: bool = False  # Token embeddings times sqrt(hidden_size) (BART scale_embedding).
    scale_decoder_output: bool = False  # T5 v1.0: final states times hidden_size**-0.5 before
    # the (tied) output layer.
    final_logits_bias: bool = False  # A bias on the output logits (BART's final_logits_bias).
    decoder_start_token_id: int = 0  # Shifted in before the targets (T5: pad 0; BART: eos 2).

    def __post_init__(self):
        _check_choice("architecture", self.architecture, ARCHITECTURES)
        _check_choice("initializer", self.initializer, INITIALIZERS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("position", self.position, POSITIONS)
        _check_choice("rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _check_choice("context_parallel", self.context_parallel, CONTEXT_STRATEGIES)
        _check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("param_dtype", self.param_dtype, DTYPES)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"ModelConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}; change one of them or set head_dim explicitly"
            )
        kv = self.kv_heads
        if kv <= 0 or self.num_heads % kv:
            raise ValueError(
                f"ModelConfig.num_kv_heads={kv} must divide num_heads={self.num_heads} "
                f"(allowed: {[d for d in range(1, self.num_heads + 1) if self.num_heads % d == 0]})"
            )
        if self.sliding_window is not None and (self.sliding_window <= 0 or not self.causal):
            raise ValueError(f"ModelConfig.sliding_window={self.sliding_window}: a window needs a "
                             "decoder and a positive size (None = full attention)")
        if self.position == "rope" and self.dim_per_head % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.dim_per_head}")
        self._check_lora()
        self._check_moe()
        self._check_encoder_decoder()
        if self.initializer == "t5" and self.position != "relative":
            raise ValueError("initializer='t5' initializes T5 models (architecture="
                             "'encoder_decoder', position='relative'); use initializer='normal'")
        for name in ("dropout_rate", "attention_dropout_rate", "lora_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {getattr(self, name)}")

    def _check_lora(self) -> None:
        """Resolves `lora_targets` to LORA_TARGETS names; clear errors for what cannot work."""
        names = self.lora_targets
        names = names.split(",") if isinstance(names, str) else names
        linear = [t for t in LORA_TARGETS if t != "wi_gate" or self.gated_mlp]
        resolved: list[str] = []
        for name in names:
            for target in LORA_ALIASES.get(name, (name,)):
                if target not in linear and name in LORA_ALIASES:
                    continue  # A group names what this model has of it.
                if target not in linear:
                    raise ValueError(f"LoRA target {name!r} matches no linear layer; this model's "
                                     f"linear layers are {linear} (or the groups "
                                     f"{['all-linear', 'attention', 'mlp']})")
                if target not in resolved:
                    resolved.append(target)
        object.__setattr__(self, "lora_targets", tuple(resolved))
        if self.lora_rank < 0:
            raise ValueError(f"ModelConfig.lora_rank={self.lora_rank} must be positive (0 = no "
                             "LoRA)")
        if self.lora_rank == 0 and resolved:
            raise ValueError(f"ModelConfig.lora_targets={tuple(resolved)} but lora_rank=0: set a "
                             "rank (e.g. lora_rank=16) or clear lora_targets")
        if self.lora_rank > 0 and not resolved:
            raise ValueError(f"ModelConfig.lora_rank={self.lora_rank} but lora_targets is empty; "
                             f"name the weights to adapt among {linear}")

    def _check_moe(self) -> None:
        if self.num_experts == 0:
            return
        _check_choice("moe_impl", self.moe_impl, MOE_IMPLS)
        _check_choice("moe_dispatch", self.moe_dispatch, MOE_DISPATCHES)
        if self.moe_dispatch == "all_to_all" and self.moe_impl != "dropless":
            raise ValueError("ModelConfig.moe_dispatch='all_to_all' runs the dropless experts; set "
                             "moe_impl='dropless' or moe_dispatch='partitioner'")
        if not self.moe_capacity_factor >= 0:
            raise ValueError(f"ModelConfig.moe_capacity_factor={self.moe_capacity_factor} must be "
                             ">= 0 (0 = dropless)")
        if self.num_experts < 0 or not 1 <= self.num_experts_per_token <= self.num_experts:
            raise ValueError(
                f"ModelConfig.num_experts_per_token={self.num_experts_per_token} must be between "
                f"1 and num_experts={self.num_experts}: a token cannot use more experts than exist")
        if self.moe_every < 1 or self.num_layers % self.moe_every:
            raise ValueError(f"ModelConfig.moe_every={self.moe_every} must divide "
                             f"num_layers={self.num_layers} (1 = every layer is MoE)")
        if self.lora_rank:
            raise ValueError("LoRA on mixture-of-experts models is not supported; set "
                             "lora_rank=0 or num_experts=0")
        if not self.causal:
            raise ValueError("mixture-of-experts blocks are built for decoders; set "
                             "architecture='decoder' or num_experts=0")

    def _check_encoder_decoder(self) -> None:
        if self.position == "relative" and self.architecture != "encoder_decoder":
            raise ValueError("position='relative' (T5's relative bias) is built for "
                             "architecture='encoder_decoder'; use 'learned' or 'rope' here")
        if self.architecture != "encoder_decoder":
            return
        if self.position not in ("relative", "learned"):
            raise ValueError(f"encoder-decoders use position='relative' (T5) or 'learned' (BART), "
                             f"got {self.position!r}")
        if self.decoder_layers <= 0:
            raise ValueError(f"ModelConfig.num_decoder_layers must be positive, got "
                             f"{self.num_decoder_layers}")
        if self.lora_rank or self.num_experts or self.type_vocab_size:
            raise ValueError("encoder-decoders do not support LoRA, experts or token types yet; "
                             "set lora_rank=0, num_experts=0 and type_vocab_size=0")

    @property
    def decoder_layers(self) -> int:
        """Blocks of an encoder-decoder's decoder stack."""
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @property
    def expert_dim(self) -> int:
        return self.mlp_dim if self.moe_mlp_dim is None else self.moe_mlp_dim

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def dim_per_head(self) -> int:
        return self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def causal(self) -> bool:
        return self.architecture == "decoder"

    def replace(self, **changes: Any) -> ModelConfig:
        unknown = [k for k in changes if k not in _FIELDS]
        if unknown:
            raise ValueError(_unknown_message("ModelConfig field", unknown[0], _FIELDS))
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        unknown = [k for k in values if k not in _FIELDS]
        if unknown:
            raise ValueError(_unknown_message("ModelConfig field", unknown[0], _FIELDS))
        return cls(**values)


_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"ModelConfig.{name}={value!r} is not one of {list(allowed)}")


def _unknown_message(kind: str, name: str, known: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {close}?" if close else ""
    return f"unknown {kind} {name!r}{hint} Known: {sorted(known)}"


_BERT = dict(
    architecture="encoder",
    vocab_size=30522,
    max_length=512,
    type_vocab_size=2,
    activation="gelu",
    norm="layernorm",
    norm_eps=1e-12,
    pre_norm=False,
    final_norm=False,
    embedding_norm=True,
    position="learned",
    pooler=True,
    mlm_head=True,
    tie_embeddings=True,
    dropout_rate=0.1,
    attention_dropout_rate=0.1,
)
_GPT2 = dict(
    architecture="decoder",
    vocab_size=50257,
    max_length=1024,
    activation="gelu_tanh",
    norm="layernorm",
    norm_eps=1e-5,
    pre_norm=True,
    position="learned",
    tie_embeddings=True,
    scale_residual_init=True,
    dropout_rate=0.1,
    attention_dropout_rate=0.1,
)
_LLAMA = dict(
    architecture="decoder",
    vocab_size=32000,
    max_length=4096,
    activation="silu",
    gated_mlp=True,
    norm="rmsnorm",
    norm_eps=1e-5,
    pre_norm=True,
    position="rope",
    attention_bias=False,
    mlp_bias=False,
    tie_embeddings=False,
)

_MIXTRAL = dict(_LLAMA, num_experts=8, num_experts_per_token=2, moe_renormalize=True,
                router_aux_loss_weight=0.02, rope_base=1e6)
_QWEN2_MOE = dict(_LLAMA, attention_bias=True, norm_eps=1e-6, rope_base=1e6, num_experts=60,
                  num_experts_per_token=4, moe_renormalize=False, router_aux_loss_weight=0.001)

# T5 v1.0: ReLU, tied embeddings, decoder output scaled; v1.1 / flan-T5: gated GELU, untied head.
_T5 = dict(
    architecture="encoder_decoder", vocab_size=32128, max_length=512, activation="relu",
    norm="rmsnorm", norm_eps=1e-6, pre_norm=True, final_norm=True, position="relative",
    attention_bias=False, mlp_bias=False, tie_embeddings=True, scale_decoder_output=True,
    scaled_attention=False, dropout_rate=0.1, decoder_start_token_id=0, initializer="t5",
)
_T5_V1_1 = dict(_T5, activation="gelu_tanh", gated_mlp=True, tie_embeddings=False,
                scale_decoder_output=False)
_BART = dict(
    architecture="encoder_decoder", vocab_size=50265, max_length=1024, activation="gelu",
    norm="layernorm", norm_eps=1e-5, pre_norm=False, final_norm=False, embedding_norm=True,
    position="learned", position_offset=2, tie_embeddings=True, final_logits_bias=True,
    dropout_rate=0.1, attention_dropout_rate=0.1, decoder_start_token_id=2,
)

PRESETS: dict[str, dict[str, Any]] = {
    "bert-tiny": {**_BERT, "hidden_size": 128, "num_layers": 2, "num_heads": 2, "mlp_dim": 512},
    "bert-base": {**_BERT, "hidden_size": 768, "num_layers": 12, "num_heads": 12, "mlp_dim": 3072},
    "bert-large": {**_BERT, "hidden_size": 1024, "num_layers": 24, "num_heads": 16, "mlp_dim": 4096},
    "gpt2-tiny": {**_GPT2, "hidden_size": 128, "num_layers": 2, "num_heads": 4, "mlp_dim": 512},
    "gpt2": {**_GPT2, "hidden_size": 768, "num_layers": 12, "num_heads": 12, "mlp_dim": 3072},
    "gpt2-medium": {**_GPT2, "hidden_size": 1024, "num_layers": 24, "num_heads": 16, "mlp_dim": 4096},
    "gpt2-large": {**_GPT2, "hidden_size": 1280, "num_layers": 36, "num_heads": 20, "mlp_dim": 5120},
    "gpt2-xl": {**_GPT2, "hidden_size": 1600, "num_layers": 48, "num_heads": 25, "mlp_dim": 6400},
    "llama-tiny": {
        **_LLAMA, "hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
        "mlp_dim": 384, "max_length": 1024,
    },
    # Llama-3.2-1B: GQA 32/8, tied embeddings, RoPE theta 5e5 with Llama-3 scaling.
    "llama-1b": {
        **_LLAMA, "vocab_size": 128256, "hidden_size": 2048, "num_layers": 16, "num_heads": 32,
        "num_kv_heads": 8, "mlp_dim": 8192, "max_length": 131072, "rope_base": 500000.0,
        "rope_scaling": "llama3", "rope_factor": 32.0, "rope_low_freq_factor": 1.0,
        "rope_high_freq_factor": 4.0, "rope_original_max_length": 8192, "tie_embeddings": True,
    },
    "mixtral-tiny": {
        **_MIXTRAL, "hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
        "mlp_dim": 256, "num_experts": 4, "max_length": 1024,
    },
    # Mixtral-8x7B: 46.7B parameters, 12.9B active per token.
    "mixtral-8x7b": {
        **_MIXTRAL, "hidden_size": 4096, "num_layers": 32, "num_heads": 32, "num_kv_heads": 8,
        "mlp_dim": 14336, "max_length": 32768,
    },
    "qwen2-moe-tiny": {
        **_QWEN2_MOE, "vocab_size": 32000, "hidden_size": 128, "num_layers": 2, "num_heads": 4,
        "mlp_dim": 256, "moe_mlp_dim": 64, "moe_shared_expert_dim": 256, "num_experts": 8,
        "num_experts_per_token": 2, "max_length": 1024,
    },
    # Qwen1.5-MoE-A2.7B: 60 experts of width 1408, top-4, and a shared expert of width 5632.
    "qwen1.5-moe-a2.7b": {
        **_QWEN2_MOE, "vocab_size": 151936, "hidden_size": 2048, "num_layers": 24, "num_heads": 16,
        "mlp_dim": 5632, "moe_mlp_dim": 1408, "moe_shared_expert_dim": 5632, "max_length": 8192,
    },
    "t5-tiny": {**_T5, "vocab_size": 128, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                "head_dim": 8, "mlp_dim": 64, "relative_buckets": 8, "relative_max_distance": 20},
    "t5-v1_1-tiny": {**_T5_V1_1, "vocab_size": 128, "hidden_size": 32, "num_layers": 2,
                     "num_heads": 4, "head_dim": 8, "mlp_dim": 48, "relative_buckets": 8,
                     "relative_max_distance": 20},
    "t5-small": {**_T5, "hidden_size": 512, "num_layers": 6, "num_heads": 8, "head_dim": 64,
                 "mlp_dim": 2048},
    "t5-base": {**_T5, "hidden_size": 768, "num_layers": 12, "num_heads": 12, "head_dim": 64,
                "mlp_dim": 3072},
    "flan-t5-small": {**_T5_V1_1, "hidden_size": 512, "num_layers": 8, "num_heads": 6,
                      "head_dim": 64, "mlp_dim": 1024},
    "flan-t5-base": {**_T5_V1_1, "hidden_size": 768, "num_layers": 12, "num_heads": 12,
                     "head_dim": 64, "mlp_dim": 2048},
    "bart-tiny": {**_BART, "vocab_size": 128, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                  "mlp_dim": 64, "max_length": 64},
    "bart-base": {**_BART, "hidden_size": 768, "num_layers": 6, "num_heads": 12, "mlp_dim": 3072},
    # Llama-2-7B.
    "llama-7b": {
        **_LLAMA, "hidden_size": 4096, "num_layers": 32, "num_heads": 32, "mlp_dim": 11008,
        "norm_eps": 1e-5,
    },
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset, with any field overridden (e.g. `get_preset('gpt2', num_layers=2)`)."""
    if name not in PRESETS:
        raise ValueError(_unknown_message("model preset", name, list(PRESETS)))
    unknown = [k for k in overrides if k not in _FIELDS]
    if unknown:
        raise ValueError(_unknown_message("ModelConfig field", unknown[0], _FIELDS))
    return ModelConfig(**{**PRESETS[name], **overrides})
