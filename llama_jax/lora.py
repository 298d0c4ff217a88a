"""LoRA: low-rank adapters on the frozen weights of a Llama; the model knows only one hook (model.contract).

    spec = LoraConfig(rank=16, alpha=32, targets=("wq", "wv"))
    adapters = init_adapters(cfg, spec, rng, mesh)        # {"layers": {"attention": {"wq": {"a", "b"}}}}
    logits = apply(cfg, base, adapters, spec, tokens)     # Llama(cfg).apply with W + alpha/r * A @ B
    logits = apply(cfg, base, None, spec, tokens)         # the base alone, the same arrays (DPO's reference)
    merged = merge(base, adapters, spec)                  # plain params, for convert / export / --merge-lora
    served = adapt_from(DIR, base, cfg, base_path=BASE, base_config=stored)  # infer/serve --lora, unmerged

A targeted weight W with input dims I and output dims O (a stacked layer axis in front) gets
A [L, *I, r] and B [L, r, *O], their own parameter subtree with logical axes: A is split like W's
input dims, B like its output dims, r is replicated (`axes.LORA_RANK`). B starts at zero, so step 0
computes exactly the base model.

How the model sees them: `adapt` puts a `LoraWeight` where W was, and the model's one hook,
`model.contract(subscripts, x, w, dtype)`, lets it compute x W + alpha/r (x A) B, unmerged. Why
unmerged rather than merging W + s A @ B per layer inside the scan (which needs no hook): the
merged weight is an intermediate that the backward pass needs (dx = dy W'^T), so autodiff keeps
it for every layer, a second copy of the model, unless the whole block is rematerialised; and
the backward pass would form each layer's full weight gradient only to project it onto A and B.
Unmerged, the backward pass keeps x and the small x A, reads the stored W again (under
jax.checkpoint, so a converted or dequantized W is never kept), and never forms dW. Measured by
bench/train.py's memory_analysis: the step holds the base once, the adapters and their Adam
moments, and activations. The base gets no gradient: callers differentiate with respect to the
adapters only. `LoraWeight.astype` is the merge, for anything that reads a weight whole.

Serving: the decode engine (infer/weights.py) splits the adapted tree per layer like any other
(a LoraWeight is a pytree: each layer gets its slice of W, A and B) and runs the same hook, so an
adapter is served unmerged, on the base as loaded or int8 (as a --quantize-base int8 run trained it).

QLoRA: the base may hold `QuantizedArray`s (quantize.py, int8 with per-channel scales): each
layer's W is dequantized as it is read, in the forward pass and again in the backward pass, so the
base stays int8 in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from llama_jax.config import LlamaConfig
from llama_jax.quantize import CONTRACTED_AXES
from llama_jax.sharding import axes

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
# How many leading (per-layer) dims of each weight are its inputs: wo [H, E, D] contracts H and E.
INPUT_DIMS = {name: len(CONTRACTED_AXES[name]) for name in TARGETS}

ADAPTER_CONFIG = "adapter_config.json"
PARAMS_DIR = "params"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float | None = None  # default 2 * rank: the update is scaled by alpha / rank = 2
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(t.strip() for t in self.targets.split(",") if t.strip()))
        if not isinstance(self.rank, (int, np.integer)) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"--lora-rank must be a positive integer, got {self.rank!r}")
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(2 * self.rank))
        if not self.alpha > 0:
            raise ValueError(f"--lora-alpha must be > 0, got {self.alpha!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"--lora-targets: unknown weight {unknown[0]!r}; choose from {','.join(TARGETS)}"
                             if unknown else f"--lora-targets is empty; choose from {','.join(TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"--lora-targets names a weight twice: {','.join(self.targets)}")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))  # canonical order

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


def config_sha256(cfg: LlamaConfig) -> str:
    """The hash that ties adapters to their base: of the base checkpoint's config.json as stored."""
    return hashlib.sha256(cfg.to_json().encode()).hexdigest()


# The adapted weight -------------------------------------------------------------------------

def _delta(a, b, n_in: int):
    """A @ B reshaped to the weight's shape: a [..., *I, r], b [..., r, *O] -> [..., *I, *O] float32."""
    r = a.shape[-1]
    lead = a.shape[:a.ndim - n_in - 1]
    in_dims, out_dims = a.shape[len(lead):-1], b.shape[len(lead) + 1:]
    a2 = a.astype(jnp.float32).reshape(*lead, math.prod(in_dims), r)
    b2 = b.astype(jnp.float32).reshape(*lead, r, math.prod(out_dims))
    return jnp.matmul(a2, b2).reshape(*lead, *in_dims, *out_dims)


def _merge(base, a, b, *, scale: float, n_in: int, dtype):
    # In float32 whatever the compute dtype: a bf16 W + a small delta would round the delta away.
    return (base.astype(jnp.float32) + scale * _delta(a, b, n_in)).astype(dtype)


@jax.tree_util.register_pytree_node_class
class LoraWeight:
    """A frozen weight (array or QuantizedArray) and its adapter, standing in for the weight in the
    parameter tree. The children are scanned over with the layers; `astype` is the merge."""

    def __init__(self, base, a, b, scale: float, n_in: int):
        self.base, self.a, self.b, self.scale, self.n_in = base, a, b, scale, n_in

    def tree_flatten(self):
        # base first: flax checks a parameter's shape against its first leaf.
        return (self.base, self.a, self.b), (self.scale, self.n_in)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def shape(self):
        return self.base.shape

    @property
    def ndim(self):
        return len(self.base.shape)

    @property
    def dtype(self):
        return self.base.dtype

    def contract(self, subscripts: str, x, dtype):
        """einsum(subscripts, x, W') for W' = W + s A @ B, as x W + s (x A) B (model.contract calls it).

        The base matmul runs under jax.checkpoint, so the backward pass keeps x and the stored W
        (int8 with QLoRA; a slice of the scanned stack, not a copy), never W converted to the
        compute dtype: kept for every layer, that would be a second, wider copy of the model."""
        x_subs, rest = subscripts.split(",")
        w_subs, out_subs = rest.split("->")
        ins, outs = w_subs[:self.n_in], w_subs[self.n_in:]
        r = next(c for c in "rRzZ" if c not in subscripts)
        xa_subs = "".join(c for c in x_subs if c not in ins) + r
        base_out = jax.checkpoint(lambda x, w: jnp.einsum(subscripts, x, w.astype(dtype)))(x, self.base)
        xa = jnp.einsum(f"{x_subs},{ins}{r}->{xa_subs}", x, self.a.astype(dtype))
        delta = jnp.einsum(f"{xa_subs},{r}{outs}->{out_subs}", xa, self.b.astype(dtype))
        return base_out + (self.scale * delta).astype(dtype)

    def map_with_axes(self, fn, logical) -> "LoraWeight":
        """A LoraWeight of fn(logical axes, array) for its base, A and B, given the weight's logical
        axes (A's and B's follow from them: `adapter_axes`); e.g. their shardings."""
        a_axes, b_axes = adapter_axes(logical, self.n_in, n_lead=len(self.a.shape) - self.n_in - 1)
        return LoraWeight(fn(logical, self.base), fn(a_axes, self.a), fn(b_axes, self.b), self.scale, self.n_in)

    def astype(self, dtype):
        """The merged weight (anything that reads the weight whole rather than through contract)."""
        return _merge(self.base, self.a, self.b, scale=self.scale, n_in=self.n_in, dtype=dtype)

    def __jax_array__(self):
        return self.astype(self.base.dtype)


# Trees ----------------------------------------------------------------------------------------

def _targets(cfg: LlamaConfig, spec: LoraConfig):
    """[(path of dict keys, shape, logical axes)] of every targeted weight of the stacked layout."""
    from llama_jax.params import param_logical_axes, param_shapes

    shapes = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(param_shapes(cfg))}
    logical = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(
        param_logical_axes(cfg), is_leaf=lambda x: isinstance(x, PartitionSpec))}
    return [(path, tuple(shapes[path].shape), tuple(logical[path])) for path in sorted(shapes)
            if path[-1] in spec.targets and path[0] == "layers"]


def _nest(items) -> dict:
    tree: dict = {}
    for path, value in items:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def adapter_shapes(cfg: LlamaConfig, spec: LoraConfig, dtype=jnp.float32):
    """Tree of jax.ShapeDtypeStruct of the adapters (float32, like master weights)."""
    items = []
    for path, shape, _ in _targets(cfg, spec):
        n_in = INPUT_DIMS[path[-1]]
        L, ins, outs = shape[0], shape[1:1 + n_in], shape[1 + n_in:]
        items.append((path + ("a",), jax.ShapeDtypeStruct((L, *ins, spec.rank), dtype)))
        items.append((path + ("b",), jax.ShapeDtypeStruct((L, spec.rank, *outs), dtype)))
    return _nest(items)


def adapter_axes(logical, n_in: int, n_lead: int = 1) -> tuple[PartitionSpec, PartitionSpec]:
    """(A's, B's) logical axes, for a weight whose axes are `logical` = (*lead, *inputs, *outputs) with
    n_lead leading (stacked layer) dims and n_in input dims: A split like W's inputs, B like its
    outputs, r replicated."""
    lead, ins, outs = tuple(logical[:n_lead]), tuple(logical[n_lead:n_lead + n_in]), tuple(logical[n_lead + n_in:])
    return PartitionSpec(*lead, *ins, axes.LORA_RANK), PartitionSpec(*lead, axes.LORA_RANK, *outs)


def adapter_logical_axes(cfg: LlamaConfig, spec: LoraConfig):
    """Tree of logical PartitionSpecs: A split like its weight's input dims, B like its output dims."""
    items = []
    for path, _, logical in _targets(cfg, spec):
        a_axes, b_axes = adapter_axes(logical, INPUT_DIMS[path[-1]])
        items.append((path + ("a",), a_axes))
        items.append((path + ("b",), b_axes))
    return _nest(items)


def adapter_shardings(cfg: LlamaConfig, spec: LoraConfig, mesh: Mesh):
    from llama_jax.sharding import tree_shardings

    return tree_shardings(adapter_logical_axes(cfg, spec), adapter_shapes(cfg, spec), mesh)


def sharded_adapter_shapes(cfg: LlamaConfig, spec: LoraConfig, mesh: Mesh):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        adapter_shapes(cfg, spec), adapter_shardings(cfg, spec, mesh))


def init_adapters(cfg: LlamaConfig, spec: LoraConfig, rng: jax.Array | int = 0, mesh: Mesh | None = None):
    """A ~ N(0, 1/fan_in) (the base's activations pass through it at unit scale), B = 0; created shard
    by shard on `mesh` when given."""
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    shapes = adapter_shapes(cfg, spec)

    def init(key):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
        keys = jax.random.split(key, len(leaves))
        out = []
        for (path, s), k in zip(leaves, keys):
            if path[-1].key == "b":
                out.append(jnp.zeros(s.shape, s.dtype))
            else:
                fan_in = math.prod(s.shape[1:-1])
                out.append(jax.random.normal(k, s.shape, s.dtype) / math.sqrt(fan_in))
        return jax.tree_util.tree_unflatten(treedef, out)

    out_shardings = adapter_shardings(cfg, spec, mesh) if mesh is not None else None
    return jax.jit(init, out_shardings=out_shardings)(rng)


def _walk(params, adapters, leaf_fn):
    """A copy of `params` where every weight named in `adapters` is leaf_fn(name, weight, a, b)."""
    out = dict(params)
    for key, sub in adapters.items():
        if key not in params:
            raise ValueError(f"adapter for {key!r}, which the base params do not have")
        out[key] = leaf_fn(key, params[key], sub["a"], sub["b"]) if set(sub) == {"a", "b"} else _walk(
            params[key], sub, leaf_fn)
    return out


def adapt(params, adapters, spec: LoraConfig):
    """The base params with each targeted weight replaced by a LoraWeight, for Llama(cfg).apply; with
    adapters=None the base params themselves (the same frozen arrays either way: no copy)."""
    if adapters is None:
        return params
    return _walk(params, adapters, lambda name, w, a, b: LoraWeight(w, a, b, spec.scale, INPUT_DIMS[name]))


def apply(cfg: LlamaConfig, base, adapters, spec: LoraConfig, tokens, **kwargs):
    """Llama(cfg).apply of the frozen base with the adapters, or without them (adapters=None: e.g.
    DPO's reference model, from the same arrays); kwargs as Llama.__call__'s."""
    from llama_jax.model import Llama

    return Llama(cfg).apply({"params": adapt(base, adapters, spec)}, tokens, **kwargs)


def merge(params, adapters, spec: LoraConfig, dtype=None, *, donate: bool = False):
    """Plain params W + alpha/r * A @ B (a QuantizedArray base dequantized), each in `dtype` (default:
    the base weight's own dtype), one weight at a time. donate: delete each base weight once merged
    (the tree passed in is unusable afterwards), so the peak is the model plus one weight."""
    def merged(name, w, a, b):
        target = jnp.dtype(dtype if dtype is not None else w.dtype)
        out = _merge_jit(w, a, b, scale=spec.scale, n_in=INPUT_DIMS[name], dtype=target)
        if donate:
            jax.tree.map(lambda x: x.delete(), w)
        return out

    from llama_jax.quantize import dequantize_params

    merged_params = _walk(params, adapters, merged)
    rest_dtype = dtype if dtype is not None else jnp.float32
    return dequantize_params(merged_params, rest_dtype)  # untargeted int8 weights (embeddings) too


_merge_jit = jax.jit(_merge, static_argnames=("scale", "n_in", "dtype"))


def num_adapter_params(cfg: LlamaConfig, spec: LoraConfig) -> int:
    return sum(math.prod(s.shape) for s in jax.tree.leaves(adapter_shapes(cfg, spec)))


# The adapter directory --------------------------------------------------------------------------

def save_adapters(path: str | os.PathLike, spec: LoraConfig, adapters, *, base: str | os.PathLike,
                  base_config: LlamaConfig) -> Path:
    """DIR/adapter_config.json (rank, alpha, targets, the base's path and config hash) + DIR/params/."""
    import orbax.checkpoint as ocp

    from llama_jax.checkpoint import staged_directory

    path = Path(path).absolute()
    with staged_directory(path, overwrite=True) as staging:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging / PARAMS_DIR, adapters)
        checkpointer.wait_until_finished()
        if jax.process_index() == 0:
            meta = {**spec.to_dict(), "base": str(Path(base).absolute()),
                    "base_config_sha256": config_sha256(base_config)}
            (staging / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_adapter_config(path: str | os.PathLike) -> tuple[LoraConfig, dict]:
    """(spec, the whole adapter_config.json); ValueError with one line if DIR is not an adapter directory."""
    file = Path(path) / ADAPTER_CONFIG
    if not Path(path).is_dir():
        raise ValueError(f"{path}: no such directory (a LoRA run writes its adapters to OUT/adapters)")
    if (Path(path) / "adapters" / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{path} is a LoRA run's directory: pass its adapters, {Path(path) / 'adapters'}")
    if not file.is_file() or not (Path(path) / PARAMS_DIR).is_dir():
        raise ValueError(f"{path} is not a LoRA adapter directory (expected {ADAPTER_CONFIG} and {PARAMS_DIR}/ "
                         f"inside, as a LoRA run writes to OUT/adapters)")
    meta = json.loads(file.read_text())
    return LoraConfig(meta["rank"], meta["alpha"], tuple(meta["targets"])), meta


def check_base(meta: dict, base_config: LlamaConfig, base_path: str | os.PathLike, what: str) -> None:
    if meta.get("base_config_sha256") != config_sha256(base_config):
        raise ValueError(f"{what} was trained on the base {meta.get('base')} (config hash "
                         f"{str(meta.get('base_config_sha256'))[:12]}), but {base_path} has config hash "
                         f"{config_sha256(base_config)[:12]}: not the same model")


def check_adapters(path: str | os.PathLike, *, base_config: LlamaConfig, base_path: str | os.PathLike) -> LoraConfig:
    """The spec of adapter directory `path`, checked against the base it is to be applied to (its
    config as stored: the hash the adapters recorded); reads no arrays, so a CLI fails before loading."""
    spec, meta = read_adapter_config(path)
    check_base(meta, base_config, base_path, f"--lora {path}")
    return spec


def load_adapters(path: str | os.PathLike, cfg: LlamaConfig, *, base_config: LlamaConfig,
                  base_path: str | os.PathLike, mesh: Mesh | None = None):
    """(spec, adapters) of an adapter directory, checked against the base it is to be applied to."""
    import orbax.checkpoint as ocp

    spec = check_adapters(path, base_config=base_config, base_path=base_path)
    if mesh is not None:
        target = sharded_adapter_shapes(cfg, spec, mesh)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                              adapter_shapes(cfg, spec))
    return spec, ocp.StandardCheckpointer().restore(Path(path).absolute() / PARAMS_DIR, target)


def adapt_from(path: str | os.PathLike, params, cfg: LlamaConfig, *, base_path: str | os.PathLike,
               base_config: LlamaConfig, mesh: Mesh | None = None):
    """The base `params` (as loaded, or int8 from quantize_params) with the adapters of directory
    `path` applied unmerged (`adapt`): what the inference engine serves with `--lora`."""
    spec, adapters = load_adapters(path, cfg, base_config=base_config, base_path=base_path, mesh=mesh)
    return adapt(params, adapters, spec)


def merge_from(path: str | os.PathLike, params, cfg: LlamaConfig, *, base_path: str | os.PathLike,
               base_config: LlamaConfig, mesh: Mesh | None = None, donate: bool = False):
    """The base `params` with the adapters of directory `path` merged in, in the params' own dtypes."""
    spec, adapters = load_adapters(path, cfg, base_config=base_config, base_path=base_path, mesh=mesh)
    return merge(params, adapters, spec, donate=donate)
