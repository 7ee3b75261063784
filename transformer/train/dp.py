"""Differentially private fine-tuning (DP-SGD, Abadi et al. 2016): per-example clipping, Gaussian
noise, Poisson-sampled batches, and privacy accounting with `dp_accounting` (RDP or PLD).

One step, for a Poisson-sampled batch padded to a fixed shape (padding rows have weight 0):

    g = (Σ_i clip_C(∇ℓ_i) + σ·C·N(0, I)) / expected_batch_size

with clip_C(v) = v·min(1, C/‖v‖) over the trainable parameters (all of them, or LoRA adapters and
`finetune.train_also`). Per-example gradients are `jax.vmap`ped inside the jitted step over
microbatches of `dp.microbatch_size` examples (a `lax.scan`), so memory grows with the microbatch,
not the batch. The division is by the expected batch size, never the realized one: the realized
size depends on the private data. The accountant composes `steps` Poisson-subsampled Gaussian
mechanisms with sampling rate q = expected_batch_size / n (add-or-remove-one neighbours).

The unit of privacy is one training example (a record of the training split):
- classification, token classification, relation: one row each;
- causal LM fine-tuning (`lm`) and SFT: one document or conversation each, a row of its own
  (never packed), truncated or padded to `data.max_length` (transformer/data/dp_records.py). Its
  loss is the mean over its target tokens, so its gradient norm does not grow with its length and
  clipping treats long and short records alike (a sum would clip long records harder, and C
  would have to be chosen per length);
- extractive QA: one question, whose context may give several windows. Its windows travel
  together (a [dp.windows_per_example, ...] block, padded with weight-0 windows): the gradient
  of the sum of their losses is clipped once, so one question moves the sum by at most C.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections.config_dict import placeholder

# Objectives whose training examples are clipped one by one (the unit the guarantee is about).
PRIVATE_OBJECTIVES = ("classification", "token_classification", "relation", "qa", "lm", "sft")
# Objectives whose per-example loss is the mean over its tokens, not the sum (see above).
TOKEN_MEAN_OBJECTIVES = ("lm", "sft")
# Objectives whose example is a block of rows (QA windows), clipped as one unit.
GROUPED_OBJECTIVES = ("qa",)
# Physical batch = expected + this many standard deviations of the Poisson batch size (rounded up):
# a draw overflows it with probability ~3e-7 a step (then it is truncated, counted and logged).
BATCH_MARGIN_STDS = 5.0
# σ calibration searches up to this; beyond it the noise drowns any signal anyway.
MAX_NOISE_MULTIPLIER = 100.0


def default_config() -> ml_collections.ConfigDict:
    """The `config.dp` block, every field with its meaning."""
    c = ml_collections.ConfigDict()
    c.enabled = False  # Train with DP-SGD (fine-tuning objectives; see PRIVATE_OBJECTIVES).
    c.clip_norm = 1.0  # C: each example's gradient is clipped to this L2 norm (inf = no clipping).
    c.noise_multiplier = placeholder(float)  # σ: noise std is σ·C; None = calibrated to target.
    c.target_epsilon = placeholder(float)  # ε to reach after num_train_steps (σ is calibrated).
    c.delta = placeholder(float)  # δ; None = 1 / (training examples).
    c.accountant = "rdp"  # 'rdp' (Rényi DP) or 'pld' (privacy loss distributions, tighter).
    # Examples per step on average (q = this / n); 0 = data.global_batch_size. The physical batch
    # (data.global_batch_size after resolving) is larger, padded with weight-0 examples.
    c.expected_batch_size = 0
    c.microbatch_size = 16  # Examples whose per-example gradients are held at once (0 = all).
    c.physical_batch_size = 0  # Padded rows a step; 0 = expected + 5 standard deviations.
    c.dataset_size = 0  # n, training examples (0 = counted from the training split).
    # QA: rows (windows) an example's block holds; a question with more is an error.
    c.windows_per_example = 4
    return c


@dataclasses.dataclass(frozen=True)
class Accountant:
    """ε spent after a number of Poisson-subsampled Gaussian steps (dp_accounting)."""

    noise_multiplier: float
    sampling_rate: float
    delta: float
    kind: str = "rdp"

    def epsilon(self, steps: int) -> float:
        return epsilon(self.noise_multiplier, self.sampling_rate, steps, self.delta, self.kind)

    def metrics(self, steps: int) -> dict[str, float]:
        return {"dp_epsilon": self.epsilon(steps), "dp_delta": self.delta,
                "dp_noise_multiplier": self.noise_multiplier}


def _accounting() -> Any:
    """dp_accounting, imported on first use: it takes longer to import than jax, and every
    config (transformer/train/config.py) reads this module."""
    import dp_accounting

    return dp_accounting


def _event(noise_multiplier: float, sampling_rate: float, steps: int) -> Any:
    a = _accounting()
    return a.SelfComposedDpEvent(a.PoissonSampledDpEvent(
        sampling_rate, a.GaussianDpEvent(noise_multiplier)), steps)


def _fresh_accountant(kind: str) -> Any:
    if kind not in ("rdp", "pld"):
        raise ValueError(f"dp.accountant must be 'rdp' or 'pld', got {kind!r}")
    a = _accounting()
    return a.rdp.RdpAccountant() if kind == "rdp" else a.pld.PLDAccountant()


@functools.lru_cache(maxsize=4096)
def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
            kind: str = "rdp") -> float:
    """ε at `delta` after `steps` steps (∞ without noise; 0 before the first step)."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    with _quiet_accountant():
        accountant = _fresh_accountant(kind)
        accountant.compose(_event(noise_multiplier, sampling_rate, steps))
        return float(accountant.get_epsilon(delta))


@contextlib.contextmanager
def _quiet_accountant():
    """RDP logs a warning for every order it cannot bound at small σ (and leaves it out)."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def calibrate_noise(target_epsilon: float, sampling_rate: float, steps: int, delta: float,
                    kind: str = "rdp") -> float:
    """The smallest σ whose ε after `steps` steps is at most `target_epsilon`."""
    if not target_epsilon > 0:
        raise ValueError(f"dp.target_epsilon must be > 0, got {target_epsilon}")
    most = epsilon(MAX_NOISE_MULTIPLIER, sampling_rate, steps, delta, kind)
    if most > target_epsilon:
        raise ValueError(
            f"dp.target_epsilon={target_epsilon} cannot be reached in {steps} steps at sampling "
            f"rate q={sampling_rate:.4g} (δ={delta:.3g}): even σ={MAX_NOISE_MULTIPLIER:g} gives "
            f"ε={most:.3g}; train fewer steps, sample fewer examples a step "
            "(dp.expected_batch_size), or accept a larger ε")
    with _quiet_accountant():
        sigma = _accounting().calibrate_dp_mechanism(
            lambda: _fresh_accountant(kind), lambda s: _event(s, sampling_rate, steps),
            target_epsilon, delta,
            _accounting().ExplicitBracketInterval(1e-3, MAX_NOISE_MULTIPLIER), tol=1e-4)
    # Brent's method returns a σ within tol; step up until the target is met, never above it.
    while epsilon(float(sigma), sampling_rate, steps, delta, kind) > target_epsilon:
        sigma *= 1.0 + 1e-4
    return float(sigma)


# --- Configuration: checked, then resolved against the training set. --------------------------


def check(config: ml_collections.ConfigDict) -> None:
    """A DP config that cannot mean what it says fails here, naming the field and the fix."""
    dp = config.dp
    if config.objective not in PRIVATE_OBJECTIVES:
        raise ValueError(
            f"dp.enabled with objective={config.objective!r}: DP-SGD here clips one training "
            f"example at a time, which is built for {list(PRIVATE_OBJECTIVES)} only")
    if config.objective == "lm" and config.data.objective != "causal":
        raise ValueError(
            f"dp.enabled with objective='lm' needs data.objective='causal' (got "
            f"{config.data.objective!r}): masked-LM masking runs on packed batches, not on one "
            "record a row; fine-tune a causal LM, or a masked LM on a classification task")
    if config.objective in GROUPED_OBJECTIVES and dp.windows_per_example < 1:
        raise ValueError(f"dp.windows_per_example must be ≥ 1, got {dp.windows_per_example}")
    if not dp.clip_norm > 0:
        raise ValueError(f"dp.clip_norm must be > 0 (the per-example gradient norm bound C), "
                         f"got {dp.clip_norm}")
    if (dp.noise_multiplier is None) == (dp.target_epsilon is None):
        raise ValueError("set exactly one of dp.noise_multiplier (σ) and dp.target_epsilon "
                         f"(σ calibrated to it); got {dp.noise_multiplier} and {dp.target_epsilon}")
    if dp.noise_multiplier is not None and dp.noise_multiplier < 0:
        raise ValueError(f"dp.noise_multiplier must be ≥ 0, got {dp.noise_multiplier}")
    if dp.delta is not None and not 0 < dp.delta < 1:
        raise ValueError(f"dp.delta must lie in (0, 1), got {dp.delta}")
    _fresh_accountant(dp.accountant)
    if config.grad_accum_steps != 1:
        raise ValueError("dp.enabled needs grad_accum_steps=1: per-example gradients are taken in "
                         "microbatches of dp.microbatch_size instead")
    if dp.microbatch_size < 0:
        raise ValueError(f"dp.microbatch_size must be ≥ 0, got {dp.microbatch_size}")


def physical_batch_size(expected: int, sampling_rate: float, multiple: int) -> int:
    """Rows that hold a Poisson batch of mean `expected` but in ~3e-7 of the steps."""
    std = math.sqrt(expected * (1 - sampling_rate))
    rows = math.ceil(expected + BATCH_MARGIN_STDS * std)
    return -(-rows // multiple) * multiple


def resolve(config: ml_collections.ConfigDict, dataset_size: Callable[[], int],
            process_count: int = 1) -> tuple[ml_collections.ConfigDict, Accountant | None]:
    """(config, accountant): with `dp.enabled`, a copy whose `dp` block is resolved (n, q, δ, σ,
    expected and physical batch) and whose `data.global_batch_size` is the padded physical batch;
    examples are not packed. `dataset_size()` counts the training examples."""
    if not config.get("dp") or not config.dp.enabled:
        return config, None
    check(config)
    config = ml_collections.ConfigDict(config.to_dict())
    dp = config.dp
    if config.data.pack_examples and config.objective not in TOKEN_MEAN_OBJECTIVES:
        logging.info("dp.enabled: data.pack_examples switched off (per-example gradients need "
                     "one example per row)")
        config.data.pack_examples = False
    n = dp.dataset_size or dataset_size()
    expected = dp.expected_batch_size or config.data.global_batch_size
    if not 0 < expected <= n:
        raise ValueError(f"dp.expected_batch_size={expected} must lie in [1, n={n}] (examples in "
                         "the training split)")
    q = expected / n
    microbatch = dp.microbatch_size or 0
    physical = dp.physical_batch_size or physical_batch_size(
        expected, q, math.lcm(microbatch or 1, process_count))
    microbatch = microbatch or physical
    if physical % microbatch or physical % process_count:
        raise ValueError(f"dp.physical_batch_size={physical} must be a multiple of "
                         f"dp.microbatch_size={microbatch} and of the {process_count} processes")
    delta = dp.delta or 1.0 / n
    sigma = dp.noise_multiplier
    if sigma is None:
        sigma = calibrate_noise(dp.target_epsilon, q, config.num_train_steps, delta, dp.accountant)
    dp.update(dataset_size=n, expected_batch_size=expected, physical_batch_size=physical,
              microbatch_size=microbatch, delta=delta, noise_multiplier=sigma)
    config.data.global_batch_size = physical
    accountant = Accountant(sigma, q, delta, dp.accountant)
    logging.info("DP-SGD: n=%d, expected batch %d (q=%.4g), %d padded rows, C=%g, σ=%.4g, δ=%.3g: "
                 "ε=%.4g after %d steps (%s)", n, expected, q, physical, dp.clip_norm, sigma, delta,
                 accountant.epsilon(config.num_train_steps), config.num_train_steps, dp.accountant)
    return config, accountant


# --- The private gradient, inside the jitted step. --------------------------------------------


def clipped_gradient_sum(
    grad_fn: Callable, params: Any, frozen: Any, microbatches: dict[str, jax.Array],
    rngs: jax.Array | None, clip_norm: float, spmd_axis_name: Any = None, extra: tuple = (),
    token_mean: bool = False, grouped: bool = False,
) -> tuple[Any, dict[str, jax.Array], jax.Array]:
    """(Σ_i clip_C(∇ℓ_i), Σ_i loss sums, per-example gradient norms [count, microbatch]).

    `grad_fn(params, frozen, batch, rng, *extra) → ((loss_sum, sums), grads)` on a one-example
    batch; `microbatches` has leading dims [count, microbatch] (`grouped`: [count, microbatch,
    rows], an example being a block of rows whose summed gradient is clipped once); `rngs` one
    key per example (or None: no dropout). ℓ_i is the example's loss sum, or with `token_mean`
    that sum over its weight sum (its tokens). Examples whose weights are all 0 (padding)
    contribute exactly nothing."""

    def one(example: dict[str, jax.Array], rng: jax.Array | None):
        batch = example if grouped else jax.tree.map(lambda x: x[None], example)
        (_, sums), grads = grad_fn(params, frozen, batch, rng, *extra)
        if token_mean:  # The weight sum is data, not a function of the parameters.
            grads = jax.tree.map(lambda g: g / jnp.maximum(sums["weight_sum"], 1.0), grads)
        return grads, sums

    per_example = jax.vmap(one, in_axes=(0, None if rngs is None else 0),
                           spmd_axis_name=spmd_axis_name)

    def microbatch(carry, inputs):
        batch, keys = inputs
        grads, sums = per_example(batch, keys)
        norms = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)),
                                     axis=tuple(range(1, g.ndim))) for g in jax.tree.leaves(grads)))
        weights = batch["weights"]  # [microbatch] or [microbatch, tokens or rows]
        real = (weights.reshape(weights.shape[0], -1) > 0).any(axis=1).astype(jnp.float32)
        scale = real * jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-30))
        clipped = jax.tree.map(lambda g: jnp.tensordot(scale, g, axes=1), grads)
        sums = jax.tree.map(lambda s: jnp.sum(s, axis=0), sums)
        return jax.tree.map(jnp.add, carry, (clipped, sums)), jnp.where(real > 0, norms, 0.0)

    first = jax.tree.map(lambda x: x[0], microbatches)
    shapes = jax.eval_shape(per_example, first, None if rngs is None else rngs[0])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape[1:], s.dtype), shapes)
    (total, sums), norms = jax.lax.scan(microbatch, zeros, (microbatches, rngs))
    return total, sums, norms


def add_noise(grad_sum: Any, rng: jax.Array, stddev: float) -> Any:
    """grad_sum + N(0, stddev²) per coordinate.

    One draw of all the coordinates, cut into the leaves: a draw per leaf compiles one
    random-bits program per parameter (about 8× the compile time of a small BERT). The flat draw
    is as large as the trainable part, which DP runs keep small (LoRA, a head)."""
    leaves, treedef = jax.tree.flatten(grad_sum)
    noise = jax.random.normal(rng, (sum(g.size for g in leaves),), jnp.float32)
    ends = np.cumsum([g.size for g in leaves])[:-1].tolist()
    noisy = [g + (stddev * z).reshape(g.shape).astype(g.dtype)
             for g, z in zip(leaves, jnp.split(noise, ends))]
    return jax.tree.unflatten(treedef, noisy)


def spmd_axes(batch_sharding: jax.sharding.NamedSharding, microbatch: int) -> Any:
    """The mesh axes that the batch rows are sharded over, for the vmap over a microbatch's
    examples (each device computes the per-example gradients of its own rows)."""
    axes = batch_sharding.spec[0] if batch_sharding.spec else None
    size = 1 if axes is None else math.prod(batch_sharding.mesh.shape[a] for a in (
        (axes,) if isinstance(axes, str) else axes))
    if microbatch % size:
        raise ValueError(f"dp.microbatch_size={microbatch} must be a multiple of the "
                         f"data-parallel size {size} (mesh data×fsdp)")
    return axes


def make_private_gradient(grad_fn: Callable, config: ml_collections.ConfigDict,
                          spmd_axis_name: Any = None) -> Callable:
    """(params, frozen, microbatches, rng, use_dropout, *extra) → (noisy mean gradient, sums,
    metrics): the DP-SGD gradient of one Poisson batch, split into microbatches."""
    dp = config.dp
    clip, sigma, expected = float(dp.clip_norm), float(dp.noise_multiplier), dp.expected_batch_size

    def private_gradient(params, frozen, microbatches, rng, use_dropout, *extra):
        count, size = microbatches["weights"].shape[:2]
        noise_rng, dropout_rng = jax.random.split(rng)
        rngs = (jax.random.split(dropout_rng, count * size).reshape(count, size)
                if use_dropout else None)
        total, sums, norms = clipped_gradient_sum(
            grad_fn, params, frozen, microbatches, rngs, clip, spmd_axis_name, extra,
            token_mean=config.objective in TOKEN_MEAN_OBJECTIVES,
            grouped=config.objective in GROUPED_OBJECTIVES)
        stddev = sigma * clip if math.isfinite(clip) else 0.0
        if stddev > 0:
            total = add_noise(total, noise_rng, stddev)
        grads = jax.tree.map(lambda g: g / expected, total)
        weights = microbatches["weights"]
        real = (weights.reshape(count * size, -1) > 0).any(axis=1).sum()
        metrics = {"dp_batch_examples": real,
                   "dp_clipped_fraction": (norms > clip).sum() / jnp.maximum(real, 1)}
        return grads, sums, metrics

    return private_gradient
