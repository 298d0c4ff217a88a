"""Helpers shared by the generation tests: a no-cache greedy reference and event collection."""

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import Llama, param_shapes


def random_params(cfg, seed=0):
    """Parameters like init_params' (normal(0.02) weights, unit norm scales), drawn with numpy: no
    init program to compile for every test config."""
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return jnp.ones(shape.shape, shape.dtype)
        return jnp.asarray(rng.normal(0, 0.02, shape.shape), shape.dtype)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(cfg))


@functools.partial(jax.jit, static_argnames="cfg")
def _forward(params, tokens, cfg):
    return Llama(cfg).apply({"params": params}, tokens)


def greedy_reference(cfg, params, prompt, n, stop_ids=()):
    """Greedy continuation recomputed with a full forward pass (no cache) at every step.

    The sequence is right-padded to a power of two so one compiled forward serves every step (and
    most prompts): causal attention keeps the padding from touching the positions that are read."""
    length = len(prompt) + n
    tokens = np.zeros((1, 1 << (length - 1).bit_length()), np.int32)
    tokens[0, :len(prompt)] = prompt
    out = []
    for t in range(len(prompt), length):
        token = int(jnp.argmax(_forward(params, jnp.asarray(tokens), cfg)[0, t - 1]))
        if token in stop_ids:
            break
        out.append(token)
        tokens[0, t] = token
    return out


def collect(events):
    """{prompt index: (tokens, finish_reason)} from engine TokenEvents, checking their order."""
    tokens, reasons = collections.defaultdict(list), {}
    for e in events:
        assert e.index not in reasons, f"event after prompt {e.index} finished"
        if e.finish_reason is None:
            tokens[e.index].append(e.token)
        else:
            reasons[e.index] = e.finish_reason
    return {i: (tokens[i], reasons[i]) for i in reasons}


SUMMARY = re.compile(r"generated (\d+) tokens in [\d.]+ s \([\d.]+ tokens/s\)"
                     r"(?:; speculative: (\d+) of (\d+) proposed tokens accepted \(\d+%\))?\n\Z")


def run_cli(capsys, *argv, summary: list | None = None):
    """(exit status, stdout, stderr) of an in-process `python -m llama_jax.infer` (argparse's exits too).
    A run that succeeds ends stderr with its summary line, checked and left out of the stderr returned
    (appended to `summary` as (generated, accepted, proposed) when given)."""
    from llama_jax.infer import __main__ as cli

    try:
        status = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        status = e.code
    out, err = capsys.readouterr()
    if status == 0:
        last = err[err.rfind("\n", 0, len(err) - 1) + 1:]
        match = SUMMARY.match(last)
        assert match, f"no summary line at the end of stderr: {err!r}"
        err = err[:len(err) - len(last)]
        if summary is not None:
            summary.append(tuple(int(g) if g else None for g in match.groups()))
    return status, out, err
