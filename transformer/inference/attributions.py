"""Integrated gradients and gradient × input over the input embeddings of a model.

    attributor = Attributor(model)                          # a TaskModel or a Decoder
    result = attributor.integrated_gradients(input_ids, attention_mask, token_type_ids,
                                             target=1, baseline_embeds=baseline, steps=50)
    result.token_scores                                     # [batch, length]

What is explained (`model_kind`):
  classification         the logit (or probability) of class `target` (an int; None = predicted);
  token_classification   that of label `l` at token `p`: `target=(p, l)` (`l` None = predicted);
  lm                     that of the next token `v` predicted at position `p`: `target=(p, v)`
                         (`v` None = predicted; `target=None` = the last real token's prediction).
The inputs are the token embeddings (`inputs_embeds`): positions, token types and the embedding
norm stay inside the model, as `IntegratedGradients` on Hugging Face's `inputs_embeds` does. The
baseline replaces the token embeddings only (`baseline_embeddings`: zero vectors or a fill token
such as [PAD], special tokens kept). A token's score is the sum of its attributions over the
embedding dimension. Integrated gradients use Captum's quadratures (default Gauss-Legendre); the
steps run in chunks of `chunk_size` interpolated batches inside one jitted `lax.scan`.

`Attributor(model, mesh=mesh)` splits the batch over the mesh's batch axes (data × fsdp × expert,
`sharding.DEFAULT_RULES`), the parameters replicated: every example's attributions depend on its
own row only, so each device explains its own examples. A batch that the devices do not divide is
padded with copies of its last example, which are dropped from the results.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from transformer import sharding
from transformer.models import Decoder, Encoder
from transformer.models.heads import TaskModel

KINDS = ("classification", "token_classification", "lm")
METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
OUTPUTS = ("logit", "probability")


def model_kind(model: Any) -> str:
    """What `model` predicts, one of KINDS; a ValueError naming the fix for anything else."""
    if isinstance(model, TaskModel):
        kind = model.head_config.kind
        if kind in KINDS:
            return kind
        raise ValueError(
            f"attributions are not supported for a {kind!r} head: they explain sequence "
            "classification, token classification and language-model next-token predictions "
            "(a TaskModel with a 'classification' or 'token_classification' head, or a Decoder)")
    if isinstance(model, Decoder):
        return "lm"
    if isinstance(model, Encoder):
        raise ValueError(
            "attributions are not supported for a bare encoder (masked-LM or feature model): "
            "fine-tune a 'classification' or 'token_classification' head on it (a TaskModel, "
            "e.g. WORKDIR/best of configs/glue.py) or attribute a decoder's next-token predictions")
    raise ValueError(f"attributions need a TaskModel or a Decoder, got {type(model).__name__}")


def quadrature(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) of Captum's integral approximations on [0, 1]: Gauss-Legendre nodes or
    Riemann left/right/middle/trapezoid points; the weights sum to 1."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {list(METHODS)}")
    if steps < (1 if method == "gausslegendre" else 2):
        raise ValueError(f"steps={steps} is too few for {method!r} (at least 1, Riemann 2)")
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (1 + nodes), 0.5 * weights
    weights = np.full(steps, 1.0 / steps)
    if method == "riemann_trapezoid":
        weights[[0, -1]] /= 2
        return np.linspace(0, 1, steps), weights
    start = {"riemann_left": 0.0, "riemann_middle": 0.5, "riemann_right": 1.0}[method]
    return (np.arange(steps) + start) / steps, weights


@dataclasses.dataclass(frozen=True)
class Attribution:
    """Attributions of a batch; `baseline_score` and `delta` only for integrated gradients."""

    method: str  # 'integrated_gradients' or 'grad_x_input'
    embeddings: np.ndarray  # [batch, length, hidden]: per embedding coordinate
    token_scores: np.ndarray  # [batch, length]: summed over the hidden dimension
    score: np.ndarray  # [batch]: f(input), the explained logit or probability
    positions: np.ndarray  # [batch]: the explained token (0 for sequence classification)
    labels: np.ndarray  # [batch]: the explained class, label or next-token id
    baseline_score: np.ndarray | None = None  # [batch]: f(baseline)
    delta: np.ndarray | None = None  # [batch]: sum of attributions − (f(input) − f(baseline))


class Attributor:
    """Attributions of one model's predictions; the jitted functions are built once per model
    and compile once per input shape, step count and chunk size."""

    def __init__(self, model: Any, output: str = "logit", mesh: Mesh | None = None):
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r} is not one of {list(OUTPUTS)}")
        self.kind = model_kind(model)
        self.output = output
        self.backbone = model.backbone if isinstance(model, TaskModel) else model
        self.uses_token_types = bool(self.backbone.config.type_vocab_size)
        self.num_outputs = (self.backbone.config.vocab_size if self.kind == "lm"
                            else model.head_config.num_labels)
        self.graphdef, self.state = nnx.split(model)
        self.mesh = mesh
        if mesh is not None:  # Replicated: the batch, not the model, is what is split.
            self.state = jax.device_put(self.state, NamedSharding(mesh, PartitionSpec()))
        self._integrated = jax.jit(self._integrated_impl, static_argnames="chunk")
        self._gradient = jax.jit(self._gradient_impl)

    # ------------------------------------------------------------------------------- the mesh

    def _rows(self, batch: int) -> int:
        """Rows the batch is padded to: a multiple of the mesh's batch devices."""
        devices = 1 if self.mesh is None else sharding.batch_devices(self.mesh)
        return -(-batch // devices) * devices

    def _on_mesh(self, function: Any, batch: int, sharded: tuple, replicated: tuple = (),
                 **static: Any) -> tuple[np.ndarray, ...]:
        """`function(state, *sharded, *replicated)` with the `sharded` arrays (leading dim
        `batch`) padded and split over the mesh's batch axes; outputs cut back to `batch`."""
        if self.mesh is None:
            return tuple(map(np.asarray, function(self.state, *sharded, *replicated, **static)))
        rows = self._rows(batch)
        spec = sharding.logical_to_spec(("batch",), sharding.DEFAULT_RULES, (rows,), self.mesh)
        place = lambda a: jax.device_put(
            jnp.concatenate([a, jnp.repeat(a[-1:], rows - batch, axis=0)]),
            NamedSharding(self.mesh, spec))
        with sharding.use_mesh(self.mesh, sharding.DEFAULT_RULES):
            out = function(self.state, *map(place, sharded), *replicated, **static)
        return tuple(np.asarray(o)[:batch] for o in out)

    # ------------------------------------------------------------------------------- inputs

    def token_embeddings(self, input_ids: Any) -> jax.Array:
        """The token-embedding rows of `input_ids` [batch, length] → [batch, length, hidden]."""
        dtype = self.backbone.embeddings.tokens[...].dtype
        return jnp.take(self.backbone.embeddings.tokens[...], jnp.asarray(input_ids), axis=0
                        ).astype(jnp.promote_types(dtype, jnp.float32))

    def baseline_embeddings(self, input_ids: Any, keep: Any = None,
                            fill_id: int | None = None) -> jax.Array:
        """The baseline: token `fill_id`'s embedding (zero vectors when None) at every position
        but those where `keep` [batch, length] is true (e.g. [CLS], [SEP], padding), which keep
        their own embeddings and so get attribution 0."""
        ids = jnp.asarray(input_ids)
        own = self.token_embeddings(ids)
        fill = jnp.zeros_like(own) if fill_id is None else self.token_embeddings(
            jnp.full_like(ids, fill_id))
        return own if keep is None else jnp.where(jnp.asarray(keep, bool)[..., None], own, fill)

    def _batch(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> tuple:
        ids = jnp.asarray(input_ids, jnp.int32)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
        mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask,
                                                                              jnp.int32)
        types = (jnp.zeros_like(ids) if token_type_ids is None or not self.uses_token_types
                 else jnp.asarray(token_type_ids, jnp.int32))
        if mask.shape != ids.shape or types.shape != ids.shape:
            raise ValueError(f"attention_mask {mask.shape} and token_type_ids {types.shape} must "
                             f"have the shape of input_ids {ids.shape}")
        return ids, mask, types

    # ------------------------------------------------------------------------------ the model

    def _outputs_at(self, state: Any, embeds: jax.Array, ids: jax.Array, mask: jax.Array,
                    types: jax.Array, positions: jax.Array) -> jax.Array:
        """Logits (or probabilities) [batch, classes] at each example's explained position."""
        model = nnx.merge(self.graphdef, state)
        rows = jnp.arange(ids.shape[0])
        if self.kind == "lm":
            hidden = model(ids, mask, inputs_embeds=embeds, compute_logits=False).last_hidden_state
            logits = model.lm_logits(hidden[rows, positions][:, None])[:, 0]
        else:
            logits = model(ids, mask, types, inputs_embeds=embeds)["logits"]
            if self.kind == "token_classification":
                logits = logits[rows, positions]
        logits = logits.astype(jnp.float32)
        return jax.nn.softmax(logits, axis=-1) if self.output == "probability" else logits

    def _scores(self, state: Any, embeds: jax.Array, ids: jax.Array, mask: jax.Array,
                types: jax.Array, positions: jax.Array, labels: jax.Array) -> jax.Array:
        outputs = self._outputs_at(state, embeds, ids, mask, types, positions)
        return jnp.take_along_axis(outputs, labels[:, None], axis=1)[:, 0]

    def _predicted(self, state: Any, inputs: jax.Array, ids: jax.Array, mask: jax.Array,
                   types: jax.Array, positions: jax.Array, labels: jax.Array) -> jax.Array:
        """`labels`, where negative the model's prediction for the input (in the same compiled
        program as the attributions: one compilation, not two)."""
        outputs = self._outputs_at(state, inputs, ids, mask, types, positions)
        return jnp.where(labels < 0, outputs.argmax(-1).astype(labels.dtype), labels)

    def _integrated_impl(self, state: Any, inputs: jax.Array, baselines: jax.Array,
                         ids: jax.Array, mask: jax.Array, types: jax.Array, positions: jax.Array,
                         labels: jax.Array, alphas: jax.Array, weights: jax.Array, *,
                         chunk: int) -> tuple[jax.Array, ...]:
        """Σ_k w_k ∂f/∂x (baseline + α_k (x − baseline)) × (x − baseline), `chunk` α's at a time.

        Each example's score depends on its own row only, so the gradient of the sum over a
        chunk's [chunk × batch] interpolated rows is every row's own gradient."""
        labels = self._predicted(state, inputs, ids, mask, types, positions, labels)
        tile = lambda a: jnp.tile(a, (chunk,) + (1,) * (a.ndim - 1))
        tiled = tuple(tile(a) for a in (ids, mask, types, positions, labels))
        grad = jax.grad(lambda e: self._scores(state, e, *tiled).sum())
        difference = inputs - baselines

        def step(accumulated: jax.Array, alpha_weight: tuple[jax.Array, jax.Array]):
            alpha, weight = alpha_weight  # [chunk] each
            scaled = baselines[None] + alpha[:, None, None, None] * difference[None]
            g = grad(scaled.reshape(-1, *inputs.shape[1:])).reshape(chunk, *inputs.shape)
            return accumulated + jnp.tensordot(weight, g, axes=1), None

        summed, _ = jax.lax.scan(step, jnp.zeros_like(inputs), (alphas, weights))
        scores = lambda e: self._scores(state, e, ids, mask, types, positions, labels)
        return difference * summed, scores(inputs), scores(baselines), labels

    def _gradient_impl(self, state: Any, inputs: jax.Array, ids: jax.Array, mask: jax.Array,
                       types: jax.Array, positions: jax.Array,
                       labels: jax.Array) -> tuple[jax.Array, ...]:
        labels = self._predicted(state, inputs, ids, mask, types, positions, labels)
        scores = lambda e: self._scores(state, e, ids, mask, types, positions, labels)
        values, pullback = jax.vjp(scores, inputs)
        (grad,) = pullback(jnp.ones_like(values))
        return inputs * grad, values, labels

    # ------------------------------------------------------------------------------- targets

    def resolve_target(self, input_ids: Any, attention_mask: Any = None,
                       target: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(positions [batch], labels [batch]) of `target` (see the module docstring): one for the
        whole batch or a sequence of them, one per example; label −1 = the model's prediction."""
        ids = np.asarray(input_ids)
        real = (np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)) > 0
        batch, length = ids.shape
        per_example = (list(target) if isinstance(target, (list, np.ndarray))
                       else [target] * batch)
        if len(per_example) != batch:
            raise ValueError(f"{len(per_example)} targets for a batch of {batch}")
        positions, labels = np.zeros(batch, np.int32), np.full(batch, -1, np.int32)
        for i, t in enumerate(per_example):
            n = int(real[i].sum())
            position, label = self._parse_target(t, n)
            if not 0 <= position < length or not real[i, position]:
                raise ValueError(f"target position {position} of example {i} is not one of its "
                                 f"{n} real tokens (0-based, special tokens count)")
            if label is not None and not 0 <= label < self.num_outputs:
                raise ValueError(f"target label {label} of example {i} is out of range: the "
                                 f"model has {self.num_outputs} outputs")
            positions[i], labels[i] = position, -1 if label is None else label
        return positions, labels

    def _parse_target(self, target: Any, length: int) -> tuple[int, int | None]:
        if self.kind == "classification":
            if isinstance(target, (tuple, list)):
                raise ValueError(f"sequence classification takes a class index as target, got "
                                 f"{target!r}")
            return 0, None if target is None else int(target)
        if target is None:
            if self.kind == "token_classification":
                raise ValueError("token classification needs target=(position, label) (label "
                                 "None = the predicted one): which token to explain")
            return length - 1, None
        if not isinstance(target, (tuple, list)) or len(target) != 2:
            what = "(position, label)" if self.kind == "token_classification" else "(position, token_id)"
            raise ValueError(f"{self.kind} takes target={what}, got {target!r}")
        position, label = target
        return int(position), None if label is None else int(label)

    # -------------------------------------------------------------------------- attributions

    def integrated_gradients(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        token_type_ids: Any = None,
        *,
        target: Any = None,
        baseline_embeds: Any = None,
        steps: int = 50,
        method: str = "gausslegendre",
        chunk_size: int | None = None,
    ) -> Attribution:
        """Integrated gradients (Sundararajan et al. 2017) from `baseline_embeds` (default: zero
        token embeddings everywhere) to the input's token embeddings. `chunk_size` interpolation
        steps (default: all) are evaluated at once, on [chunk_size × batch] rows."""
        ids, mask, types = self._batch(input_ids, attention_mask, token_type_ids)
        positions, labels = self.resolve_target(ids, mask, target)
        inputs = self.token_embeddings(ids)
        baselines = jnp.zeros_like(inputs) if baseline_embeds is None else jnp.asarray(
            baseline_embeds, inputs.dtype)
        if baselines.shape != inputs.shape:
            raise ValueError(f"baseline_embeds {baselines.shape} must have the input embeddings' "
                             f"shape {inputs.shape}")
        alphas, weights = quadrature(method, steps)
        chunk = min(chunk_size or steps, steps)
        if chunk < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        padded = -(-steps // chunk) * chunk  # Extra steps weigh 0.
        alphas = np.pad(alphas, (0, padded - steps)).reshape(-1, chunk)
        weights = np.pad(weights, (0, padded - steps)).reshape(-1, chunk)
        attributions, score, base, labels = self._on_mesh(
            self._integrated, len(ids),
            (inputs, baselines, ids, mask, types, jnp.asarray(positions), jnp.asarray(labels)),
            (jnp.asarray(alphas, inputs.dtype), jnp.asarray(weights, inputs.dtype)), chunk=chunk)
        delta = attributions.reshape(len(score), -1).sum(1) - (score - base)
        return Attribution("integrated_gradients", attributions, attributions.sum(-1), score,
                           positions, labels, base, delta)

    def grad_x_input(self, input_ids: Any, attention_mask: Any = None,
                     token_type_ids: Any = None, *, target: Any = None) -> Attribution:
        """Gradient × input (Shrikumar et al. 2016) at the input's token embeddings."""
        ids, mask, types = self._batch(input_ids, attention_mask, token_type_ids)
        positions, labels = self.resolve_target(ids, mask, target)
        attributions, score, labels = self._on_mesh(self._gradient, len(ids), (
            self.token_embeddings(ids), ids, mask, types, jnp.asarray(positions),
            jnp.asarray(labels)))
        return Attribution("grad_x_input", attributions, attributions.sum(-1), score, positions,
                           labels)


def special_token_mask(tokenizer: Any, input_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """True at the tokenizer's special tokens ([CLS], [SEP], [PAD], <s>, ...): the positions a
    baseline keeps."""
    special = np.asarray(sorted(set(tokenizer.special_ids.values())), np.int64)
    return np.isin(np.asarray(input_ids), special)
