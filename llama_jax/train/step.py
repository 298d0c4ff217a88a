"""The train state and the one pure, jitted train step.

    state, metrics = train_step(state, batch)

`state` (TrainState: step, float32 params, optimizer state) is donated and sharded by the rules
table: FSDP splits params and Adam moments alike. `batch` is a dict of [B, T] arrays (see
data.py), rows split over dp x fsdp and tokens over cp (put_batch lays them out in context
parallelism's load-balanced order). Matmuls run in cfg.dtype (bf16 on accelerators); master
weights, grads, optimizer state and the loss stay float32.

The loss is a sum over weighted targets divided by the batch's total weight, and gradient
accumulation sums per-microbatch gradients before that one division, so `grad_accum=k` gives the
same update as one big batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.config import LlamaConfig
from llama_jax.model import Llama
from llama_jax.params import init_sharded_params, param_shapes, param_shardings
from llama_jax.sharding import BATCH_AXES, activation_sharding, batch_split, logical_to_sharding
from llama_jax.sharding.context import check_seq_len, context_size, load_balance

Batch = dict[str, jax.Array]
BATCH_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32, "positions": jnp.int32,
                "segment_ids": jnp.int32}


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any
    opt_state: Any


# Shardings -----------------------------------------------------------------------------------

# `trained`, where these functions take it: the trained parameters when they are not the model's own
# (LoRA's adapters, llama_jax/lora.py), as a tree of jax.ShapeDtypeStruct carrying their shardings.

def abstract_state(cfg: LlamaConfig, optimizer: optax.GradientTransformation, trained=None) -> TrainState:
    shapes = param_shapes(cfg) if trained is None else trained
    return jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)), shapes)


def state_shardings(cfg: LlamaConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                    trained=None) -> TrainState:
    """Params as the rules say; every per-parameter optimizer buffer exactly like its parameter."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params = param_shardings(cfg, mesh) if trained is None else jax.tree.map(lambda s: s.sharding, trained)
    opt = optax.tree_map_params(optimizer, lambda _, sharding: sharding,
                                abstract_state(cfg, optimizer, trained).opt_state,
                                params, transform_non_params=lambda _: replicated,
                                is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    return TrainState(replicated, params, opt)


def batch_sharding(mesh: Mesh, batch_shape: tuple[int, int]) -> NamedSharding:
    return logical_to_sharding(BATCH_AXES, mesh, batch_shape)


def sharded_abstract_state(cfg: LlamaConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                           trained=None) -> TrainState:
    """The state's shapes, dtypes and shardings on `mesh`: a restore target, or AOT compile input."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        abstract_state(cfg, optimizer, trained), state_shardings(cfg, optimizer, mesh, trained))


def abstract_batch(mesh: Mesh, batch_shape: tuple[int, int]) -> dict[str, jax.ShapeDtypeStruct]:
    """A batch's shapes, dtypes and shardings on `mesh`, for compiling a step ahead of time:
    `step.lower(sharded_abstract_state(...), abstract_batch(...)).compile().memory_analysis()`."""
    sharding = batch_sharding(mesh, batch_shape)
    return {k: jax.ShapeDtypeStruct(batch_shape, dtype, sharding=sharding) for k, dtype in BATCH_DTYPES.items()}


def check_batch_shape(mesh: Mesh, batch_shape: tuple[int, int], grad_accum: int = 1) -> None:
    batch_size, seq_len = batch_shape
    data_ways = batch_split(mesh)
    if batch_size % (data_ways * grad_accum):
        raise ValueError(f"batch size {batch_size} must be a multiple of dp x fsdp ({data_ways}) x grad_accum "
                         f"({grad_accum}) = {data_ways * grad_accum}, so every device gets whole microbatch rows")
    check_seq_len(seq_len, context_size(mesh))


# Init ----------------------------------------------------------------------------------------

def init_state(cfg: LlamaConfig, optimizer: optax.GradientTransformation, mesh: Mesh, *, seed: int = 0,
               params=None, trained=None) -> TrainState:
    """A fresh state, created shard by shard; `params` (already on `mesh`) replace the random init."""
    if params is None:
        params = init_sharded_params(cfg, mesh, seed)
    shardings = state_shardings(cfg, optimizer, mesh, trained)
    make = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)),
                   in_shardings=(shardings.params,), out_shardings=shardings, donate_argnums=0)
    return make(params)


# Loss ----------------------------------------------------------------------------------------

def loss_sums(cfg: LlamaConfig, params, batch: Batch, z_loss: float = 0.0):
    """(objective, sums): the weighted sums of next-token NLL (+ z_loss * log(Z)^2) over the batch.

    Sums, not means, so microbatches add up exactly; the caller divides by sums['weight'].
    """
    logits_BTV = Llama(cfg).apply({"params": params}, batch["inputs"], positions=batch["positions"],
                                  segment_ids=batch["segment_ids"])
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, batch["targets"][..., None], axis=-1)[..., 0]
    w_BT = batch["weights"]
    nll = jnp.sum((log_z_BT - target_logit_BT) * w_BT)
    z = jnp.sum(jnp.square(log_z_BT) * w_BT)
    correct = jnp.sum((jnp.argmax(logits_BTV, axis=-1) == batch["targets"]) * w_BT)
    return nll + z_loss * z, {"nll": nll, "z": z, "correct": correct, "weight": jnp.sum(w_BT)}


class Objective(Protocol):
    """What a train step minimises: what a batch holds (`batch_dtypes`), the sums its loss is made of
    (`loss_sums` -> (value to differentiate, sums); the summed gradient is divided by sums["weight"],
    so microbatches add up exactly) and the logged metrics those sums give."""

    batch_dtypes: ClassVar[dict[str, Any]]

    def loss_sums(self, cfg: LlamaConfig, params, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]: ...

    def metrics(self, sums: dict[str, jax.Array]) -> dict[str, jax.Array]: ...


@dataclasses.dataclass(frozen=True)
class LanguageModeling:
    """Pre-training and SFT: next-token NLL (+ z_loss * log(Z)^2) per weighted target."""

    z_loss: float = 0.0
    batch_dtypes: ClassVar[dict[str, Any]] = BATCH_DTYPES

    def loss_sums(self, cfg: LlamaConfig, params, batch: Batch):
        return loss_sums(cfg, params, batch, self.z_loss)

    def metrics(self, sums):
        weight = jnp.maximum(sums["weight"], 1.0)
        return {"loss": sums["nll"] / weight, "z_loss": sums["z"] / weight, "accuracy": sums["correct"] / weight,
                "tokens": sums["weight"]}


def _microbatches(batch: Batch, grad_accum: int, mesh: Mesh) -> Batch:
    """[B, T] -> [A, B/A, T] with microbatch i = rows i, A+i, 2A+i, ...: each device's block of rows
    splits into A equal parts locally, so no row moves between devices."""
    def split(x):
        B, T = x.shape
        x = x.reshape(B // grad_accum, grad_accum, T).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(None, *batch_sharding(
            mesh, (B // grad_accum, T)).spec)))
    return jax.tree.map(split, batch)


def grads_and_sums(cfg: LlamaConfig, params, batch: Batch, mesh: Mesh, *, grad_accum: int = 1,
                   z_loss: float = 0.0, objective: Objective | None = None, model_params: Callable | None = None):
    """Gradients of the summed objective and the loss sums, over `grad_accum` sequential microbatches.
    model_params(params) -> what the model applies (LoRA: the frozen base adapted by `params`)."""
    objective = objective or LanguageModeling(z_loss)
    model_params = model_params or (lambda p: p)
    grad_fn = jax.grad(lambda p, b: objective.loss_sums(cfg, model_params(p), b), has_aux=True)
    with activation_sharding(mesh):
        if grad_accum == 1:
            return grad_fn(params, batch)

        def accumulate(carry, microbatch):
            return jax.tree.map(jnp.add, carry, grad_fn(params, microbatch)), None

        microbatches = _microbatches(batch, grad_accum, mesh)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], microbatches)))
        (grads, sums), _ = jax.lax.scan(accumulate, zeros, microbatches)
        return grads, sums


def make_train_step(cfg: LlamaConfig, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                    batch_shape: tuple[int, int], grad_accum: int = 1, z_loss: float = 0.0,
                    schedule: Callable | None = None, objective: Objective | None = None, trained=None,
                    adapt: Callable | None = None):
    """The jitted `train_step(state, batch) -> (state, metrics)` for this mesh and batch shape;
    the objective is next-token prediction unless given (`z_loss` is its auxiliary loss's weight).

    Parameter-efficient training (LoRA): `trained` describes state.params (see abstract_state), and
    `adapt(params, frozen)` gives the weights the model applies: the step is then
    `train_step(state, batch, frozen)`, where `frozen` (the base model) is read in place, never
    donated, gets no gradient and no optimizer state."""
    objective = objective or LanguageModeling(z_loss)
    check_batch_shape(mesh, batch_shape, grad_accum)
    state_sh = state_shardings(cfg, optimizer, mesh, trained)
    batch_sh = {k: batch_sharding(mesh, batch_shape) for k in objective.batch_dtypes}
    replicated = NamedSharding(mesh, PartitionSpec())

    def train_step(state: TrainState, batch: Batch, frozen=None):
        model_params = None if adapt is None else (lambda p: adapt(p, frozen))
        grads, sums = grads_and_sums(cfg, state.params, batch, mesh, grad_accum=grad_accum, objective=objective,
                                     model_params=model_params)
        weight = jnp.maximum(sums["weight"], 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**objective.metrics(sums), "grad_norm": optax.tree.norm(grads),
                   "param_norm": optax.tree.norm(params)}
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        return TrainState(state.step + 1, params, opt_state), metrics

    if adapt is not None:  # the frozen tree keeps the shardings it was loaded with
        return jax.jit(train_step, in_shardings=(state_sh, batch_sh, None), out_shardings=(state_sh, replicated),
                       donate_argnums=0)
    return jax.jit(train_step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                   donate_argnums=0)


def put_batch(batch: dict[str, Any], mesh: Mesh) -> Batch:
    """Place a global numpy batch (identical on every process) on the mesh; each process transfers
    only the rows its own devices hold. With context parallelism every [B, T] array is first put in
    the load-balanced token order, all alike, so each token keeps its position, document and weight."""
    out = {}
    cp = context_size(mesh)
    for k, x in batch.items():
        x = load_balance(np.asarray(x), cp) if cp > 1 else x
        sharding = batch_sharding(mesh, x.shape)
        out[k] = jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index])
    return out
