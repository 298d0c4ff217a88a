"""The CLI's flag checks (in process) and SIGTERM draining (one subprocess, a fake engine behind the
real `serve`)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import httpx
import jax
import pytest

from llama_jax import LlamaConfig
from llama_jax.checkpoint import load_config
from llama_jax.quantize import QuantizedArray
from llama_jax.serve.__main__ import build_parser, kv_cache_summary, load_engine, main
from tests.infer.test_load import config_reads  # noqa: F401 (a fixture)

ROOT = pathlib.Path(__file__).resolve().parents[2]

# The real serve() over a slow fake engine: 50 ms a token. Prints its port, then at exit what the
# engine was left with.
SERVER = """
import json, sys
from llama_jax.serve.__main__ import listen, serve
from llama_jax.serve.app import create_app
from llama_jax.tokenizer import Llama3Tokenizer, default_tokenizer_path
from tests.serve.common import FakeEngine

tokenizer = Llama3Tokenizer(default_tokenizer_path())
engine = FakeEngine(tokenizer, list(range(1000, 2000)), max_seq_len=4096, step_seconds=0.05)
sock = listen("127.0.0.1", 0)
print(sock.getsockname()[1], flush=True)
serve(create_app(engine, tokenizer, "fake"), sock, grace_period=1.5, log_level="warning")
print(json.dumps({"aborted": len(engine.aborted), "left": len(engine.requests)}), flush=True)
"""


def fake_checkpoint(tmp_path):
    """A directory that passes for a checkpoint until its params are read (the CLI must fail before)."""
    (tmp_path / "params").mkdir()
    (tmp_path / "config.json").write_text(LlamaConfig.preset("tiny").to_json())
    return tmp_path


@pytest.mark.parametrize("flags, words", [
    (["--checkpoint", "/no/such/dir"], ["not a llama_jax checkpoint"]),
    (["--port", "70000"], ["--port", "70000"]),
    (["--max-batch", "0"], ["--max-batch must be >= 1"]),
    (["--page-size", "-1"], ["--page-size must be >= 1"]),
    (["--mesh", "tp3"], ["mesh 'tp3'", "8 devices"]),
    (["--mesh", "dp8", "--max-batch", "12"], ["--max-batch 12", "batch split of 8"]),
    (["--max-seq-len", "100000"], ["--max-seq-len 100000", "context of 256"]),
    (["--grace-period", "-1"], ["--grace-period"]),
    (["--max-request-bytes", "0"], ["--max-request-bytes must be >= 1"]),
    (["--api-key", " "], ["--api-key is empty"]),
    (["--lora", "/no/such/adapters"], ["/no/such/adapters: no such directory"]),
    (["--merge-lora"], ["--merge-lora needs --lora DIR"]),
])
def test_bad_flags_are_one_line_before_loading(flags, words, tmp_path, capsys):
    checkpoint = fake_checkpoint(tmp_path)
    assert main(["--checkpoint", str(checkpoint), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err


def test_busy_port_is_one_line(tmp_path, capsys):
    import socket

    checkpoint = fake_checkpoint(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--checkpoint", str(checkpoint), "--port", str(port)]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def wait_until_up(url, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.1)


def test_sigterm_answers_503_while_it_finishes_short_requests_aborts_long_ones_and_exits_0():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{int(proc.stdout.readline())}"
        wait_until_up(url)
        results, started = {}, {"short": threading.Event(), "long": threading.Event()}

        def stream(name, max_tokens):
            body = {"model": "fake", "prompt": "x", "stream": True, "max_tokens": max_tokens}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
                lines = results[name] = []
                for line in response.iter_lines():
                    started[name].set()
                    lines.extend([line] if line else [])

        threads = [threading.Thread(target=stream, args=a) for a in (("short", 20), ("long", 1000))]
        for t in threads:
            t.start()
        assert all(event.wait(30) for event in started.values())  # both are generating
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        # Draining: the socket still answers, new requests and /health with 503 (a load balancer
        # takes the server out of rotation; a client is told, not refused a connection).
        health = httpx.get(f"{url}/health", timeout=5)
        turned_away = httpx.post(f"{url}/v1/completions", json={"model": "fake", "prompt": "x"}, timeout=5)
        assert threads[1].is_alive()  # the long request is still running
        for t in threads:
            t.join(30)
        assert proc.wait(30) == 0
        with pytest.raises(httpx.ConnectError):  # once the drain ended, the socket closed
            httpx.get(f"{url}/health", timeout=5)
        assert json.loads(proc.stdout.readline()) == {"aborted": 1, "left": 0}
    finally:
        proc.kill()
    for response in (health, turned_away):
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "service_unavailable", response.text
        assert "shutting down" in response.json()["error"]["message"]
    assert results["short"][-1] == "data: [DONE]" and len(results["short"]) == 21  # 20 tokens, then DONE
    long = results["long"]  # ended after the grace period with an error event the client can read
    assert 20 < len(long) < 100 and "grace period" in json.loads(long[-2].removeprefix("data: "))["error"]["message"]
    assert long[-1] == "data: [DONE]"


@pytest.mark.parametrize("flags", [
    ["--max-batch", "4", "--max-seq-len", "48", "--page-size", "8", "--kv-pages", "20"],
    ["--max-batch", "4", "--mesh", "dp4,tp2", "--quantize", "int8"],
])
def test_load_engine_follows_the_flags(checkpoint_dir, flags):
    args = build_parser().parse_args(["--checkpoint", str(checkpoint_dir), *flags])
    engine, tokenizer = load_engine(args)
    option = dict(zip(flags[::2], flags[1::2]))
    assert engine.max_batch == 4 and tokenizer.vocab_size == 128256
    assert engine.max_seq_len == int(option.get("--max-seq-len", 64))
    assert engine.page_size == int(option.get("--page-size", 16))
    assert engine.stats()["pages_total"] == int(option.get("--kv-pages", 4 * -(-engine.max_seq_len // engine.page_size)))
    assert (engine.mesh is None) == ("--mesh" not in option)
    # serving_shapes: decode batches from the mesh's batch split (dp4: 4 rows at least) up to
    # --max-batch, a factor of 4 apart, each step with a prefill chunk of 4 rows per batch split.
    assert engine.decode_batches == ([1, 4] if engine.mesh is None else [4])
    assert engine.chunk_shapes == ([(4, 16)] if engine.mesh is None else [(16, 16)])
    if engine.mesh is not None:
        assert dict(engine.mesh.shape) == {"dp": 4, "fsdp": 1, "cp": 1, "tp": 2}
    cfg = load_config(checkpoint_dir)
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4  # keys and values, float32
    pages = engine.stats()["pages_total"]
    gib = f"{pages * engine.page_size * per_token / 2**30:.3g} GiB"
    assert kv_cache_summary(engine).startswith(f"KV cache: {gib}, {pages} pages of {engine.page_size} tokens")
    quantized = [leaf for leaf in jax.tree.leaves(engine.params, is_leaf=lambda x: isinstance(x, QuantizedArray))
                 if isinstance(leaf, QuantizedArray)]
    assert bool(quantized) == ("--quantize" in option)


def test_a_server_start_reads_config_json_once(checkpoint_dir, config_reads):  # noqa: F811
    bound = []
    args = build_parser().parse_args(["--checkpoint", str(checkpoint_dir), "--max-batch", "1", "--max-seq-len", "16"])
    engine, _ = load_engine(args, before_weights=lambda: bound.append(len(config_reads)))
    assert engine.max_seq_len == 16 and bound == [1] and len(config_reads) == 1


def test_help_says_what_the_kv_cache_costs():
    cfg = LlamaConfig.preset("llama3.2-1b")
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4  # float32
    assert per_token == 64 * 2**10 and 64 * cfg.max_seq_len * per_token == 512 * 2**30
    help_text = " ".join(build_parser().format_help().split())
    for words in ("KV cache is allocated at start for B sequences of --max-seq-len tokens", "64 KiB", "131072",
                  "512 GiB", "prints the size"):
        assert words in help_text


def test_load_engine_serves_a_lora_adapter_unmerged(checkpoint_dir, tmp_path):
    """--lora: each layer's A and B beside its (here int8, tp-split) weight, placed like it; the tokens
    this decodes are tests/infer/test_lora.py's."""
    from jax.sharding import NamedSharding, PartitionSpec

    from llama_jax import checkpoint, lora
    from tests.infer.test_lora import SPEC, random_adapters

    cfg = checkpoint.load_config(checkpoint_dir)
    adapters = lora.save_adapters(tmp_path / "adapters", SPEC, random_adapters(cfg), base=checkpoint_dir,
                                  base_config=cfg)
    args = build_parser().parse_args(["--checkpoint", str(checkpoint_dir), "--max-batch", "4", "--mesh", "dp4,tp2",
                                      "--quantize", "int8", "--lora", str(adapters)])
    engine, _ = load_engine(args)
    wq = engine.params.layers[1]["attention"]["wq"]
    assert isinstance(wq, lora.LoraWeight) and isinstance(wq.base, QuantizedArray)
    assert wq.b.sharding.is_equivalent_to(NamedSharding(engine.mesh, PartitionSpec(None, "tp")), 3)
