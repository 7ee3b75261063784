"""Task heads on a backbone (Encoder or Decoder), and the task model that joins them.

    model = TaskModel(get_preset("bert-tiny"), HeadConfig("classification", num_labels=2),
                      rngs=nnx.Rngs(0))
    logits = model(input_ids, attention_mask, token_type_ids)          # [batch, labels]

The parameter tree is {"backbone": <the Encoder/Decoder tree>, "head": {...}}, so the parameters
of a model checkpoint (a plain Encoder/Decoder) load into "backbone" unchanged while the head keeps
its fresh initialization. Head parameters name their axes like the backbone's ('embed'; the label
axis is small and replicated), so the same sharding rules apply.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from transformer.models.common import dropout, param, split_rng
from transformer.models.config import ModelConfig
from transformer.models.transformer import Decoder, Encoder, ModelOutput

HEAD_KINDS = ("classification", "token_classification", "qa", "relation")
POOLINGS = ("pooler", "cls", "mean", "last")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """What the head computes; saved next to fine-tuned checkpoints as head_config.json."""

    kind: str  # One of HEAD_KINDS (the task kinds of `transformer.data.tasks`).
    num_labels: int = 2  # Classes (ignored by 'qa', which always predicts start and end).
    pooling: str = "pooler"  # Sequence classification: 'pooler' (BERT: tanh dense on [CLS]),
    # 'cls' (the first token's state), 'mean' (over non-padding tokens), 'last' (the last
    # non-padding token: decoders, whose last token has seen the whole text).
    dropout_rate: float | None = None  # Dropout before the classifier; None = the backbone's.

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"HeadConfig.kind={self.kind!r} is not one of {list(HEAD_KINDS)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"HeadConfig.pooling={self.pooling!r} is not one of {list(POOLINGS)}")
        if self.kind != "qa" and self.num_labels < 1:
            raise ValueError(f"HeadConfig.num_labels must be positive, got {self.num_labels}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@struct.dataclass
class Placement:
    """Where the examples of a packed batch lie (`transformer.data.task_packing`): example i is
    tokens starts[i] .. starts[i] + lengths[i] - 1 of row rows[i], segment segment_ids there."""

    rows: jax.Array  # [examples]
    starts: jax.Array  # [examples]
    lengths: jax.Array  # [examples]
    segment_ids: jax.Array  # [rows, length]

    def first(self, x: jax.Array) -> jax.Array:
        """The states [examples, hidden] of each example's first token."""
        return x[self.rows, self.starts]

    def pool(self, x: jax.Array, pooling: str, pooled: jax.Array | None) -> jax.Array:
        if pooling == "pooler":
            return pooled
        if pooling == "cls":
            return self.first(x)
        if pooling == "last":
            return x[self.rows, self.starts + jnp.maximum(self.lengths - 1, 0)]
        segment = self.segment_ids[self.rows, self.starts]  # Mean over the example's segment.
        member = (self.segment_ids[self.rows] == segment[:, None]) & (self.lengths[:, None] > 0)
        m = member.astype(x.dtype)[..., None]
        return (x[self.rows] * m).sum(1) / jnp.maximum(m.sum(1), 1.0)

    def entities(self, x: jax.Array, entity_positions: jax.Array) -> jax.Array:
        """The states [examples, 2, hidden] at the entity markers (positions within the example)."""
        index = self.starts[:, None] + entity_positions.astype(jnp.int32)
        return x[self.rows[:, None], index]

    def unpack_tokens(self, values: jax.Array, length: int) -> jax.Array:
        """Per-token values [rows, T, ...] → per example [examples, length, ...] (0 beyond it)."""
        index = jnp.arange(length)
        inside = index[None, :] < self.lengths[:, None]
        gathered = values[self.rows[:, None], jnp.where(inside, self.starts[:, None] + index, 0)]
        shape = inside.shape + (1,) * (values.ndim - 2)
        return jnp.where(inside.reshape(shape), gathered, jnp.zeros_like(gathered))


def _pool(out: ModelOutput, mask: jax.Array, pooling: str) -> jax.Array:
    x = out.last_hidden_state
    if pooling == "pooler":
        if out.pooler_output is None:
            raise ValueError("pooling='pooler' needs a backbone with a pooler (model.pooler=True); "
                             "use pooling='cls' or 'mean' (or 'last' for decoders)")
        return out.pooler_output
    if pooling == "cls":
        return x[:, 0]
    m = mask.astype(x.dtype)[..., None]
    if pooling == "mean":
        return (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    last = jnp.maximum(mask.astype(jnp.int32).sum(1) - 1, 0)  # Right padding: the last real token.
    return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]


class Head(nnx.Module):
    """One linear layer over the features the task needs; logits in float32."""

    def __init__(self, model: ModelConfig, head: HeadConfig, *, rngs: nnx.Rngs):
        self.head_config = head
        d = model.hidden_size * (2 if head.kind == "relation" else 1)
        outputs = 2 if head.kind == "qa" else head.num_labels
        self.kernel = param(rngs, (d, outputs), ("embed", None), std=model.initializer_range,
                            dtype=model.param_dtype)
        self.bias = param(rngs, (outputs,), (None,), dtype=model.param_dtype)
        self.rate = model.dropout_rate if head.dropout_rate is None else head.dropout_rate

    def __call__(
        self,
        out: ModelOutput,
        mask: jax.Array,
        entity_positions: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
        placement: Placement | None = None,
    ) -> dict[str, jax.Array]:
        kind = self.head_config.kind
        x = out.last_hidden_state
        if kind == "qa" and placement is not None:
            raise ValueError("extractive QA batches are not packed: its windows fill the row and "
                             "its loss is a softmax over the window")
        if kind == "classification":
            x = (_pool(out, mask, self.head_config.pooling) if placement is None else
                 placement.pool(x, self.head_config.pooling, out.pooler_output))
        elif kind == "relation":
            if entity_positions is None:
                raise ValueError("the relation head needs entity_positions [batch, 2]")
            # The states at the two entity-start markers, side by side (Baldini Soares et al.).
            if placement is None:
                starts = jnp.take_along_axis(
                    x, entity_positions[:, :, None].astype(jnp.int32), axis=1)
            else:
                starts = placement.entities(x, entity_positions)
            x = starts.reshape(starts.shape[0], -1)
        if kind != "qa":  # As BERT's fine-tuning heads: no dropout before the span classifier.
            x = dropout(x, self.rate, dropout_rng)
        logits = (x @ self.kernel[...].astype(x.dtype) + self.bias[...].astype(x.dtype))
        logits = logits.astype(jnp.float32)
        if kind == "qa":
            return {"start_logits": logits[..., 0], "end_logits": logits[..., 1]}
        return {"logits": logits}


class TaskModel(nnx.Module):
    """A backbone and a task head. `config` is the backbone's ModelConfig (so checkpoint code that
    reads `model.config` keeps working); `head_config` describes the head."""

    def __init__(self, config: ModelConfig, head: HeadConfig, *, rngs: nnx.Rngs):
        if config.architecture == "encoder_decoder":
            raise ValueError("task heads sit on an encoder or a decoder; fine-tune an "
                             "encoder-decoder (T5, BART) on text-to-text targets instead")
        self.config = config
        self.head_config = head
        backbone = Encoder if config.architecture == "encoder" else Decoder
        self.backbone = backbone(config, rngs=rngs)
        self.head = Head(config, head, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        entity_positions: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
        positions: jax.Array | None = None,
        placement: Placement | None = None,
        inputs_embeds: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """Logits of the head: {'logits'} ([batch, labels] or [batch, length, labels] for tokens),
        or {'start_logits', 'end_logits'} ([batch, length]) for QA.

        A packed batch (several examples per row) gives `placement`, the rows' `positions`, and
        its segment ids as `attention_mask`; logits are then per example ([examples, labels]),
        or per row token for token classification. `inputs_embeds` replace the token
        embeddings of `input_ids` (see `Encoder.__call__`)."""
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if self.config.type_vocab_size == 0:
            token_type_ids = None  # Decoders (GPT-2, Llama) have no segment embeddings.
        backbone_rng, head_rng = split_rng(dropout_rng, 2)
        packed = {} if placement is None else {"segment_ids": placement.segment_ids,
                                               "positions": positions}
        out = self.backbone(input_ids, attention_mask, token_type_ids, dropout_rng=backbone_rng,
                            compute_logits=False, inputs_embeds=inputs_embeds, **packed)
        if placement is not None and out.pooler_output is not None:
            out = out.replace(pooler_output=self.backbone.pool(
                placement.first(out.last_hidden_state)))
        return self.head(out, attention_mask, entity_positions, head_rng, placement)
