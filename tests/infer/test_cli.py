"""`python -m llama_jax.infer` on a tiny checkpoint with the real Llama 3 tokenizer: every mode, the
flags that change the model, and one-line errors with non-zero exits for bad input."""

import dataclasses
import io
import json
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import psutil
import pytest
from jax.sharding import PartitionSpec as P

from llama_jax import checkpoint, save
from llama_jax.infer.text import Chat, generate
from llama_jax.infer import text
from llama_jax.infer.weights import DecodeParams
from llama_jax.infer.load import load_for_inference
from llama_jax.quantize import quantize_params
from llama_jax.sharding import make_mesh
from llama_jax.tokenizer import default_tokenizer_path
from tests.reference import hf_logits, hf_model
from tests.infer.common import run_cli

GREEDY = ["--temperature", "0", "--max-new-tokens", "6"]


def test_prompt_prints_the_greedy_continuation(capsys, checkpoint_dir, llama3_tiny, tokenizer):
    cfg, params = llama3_tiny
    status, out, err = run_cli(capsys, "--checkpoint", checkpoint_dir, "--prompt", "The sky is", *GREEDY)
    expected = generate(cfg, params, tokenizer, ["The sky is"], max_new_tokens=6, temperature=0).texts[0]
    assert (status, out, err) == (0, expected + "\n", "")


def test_chat_prompt_answers_one_user_turn(capsys, checkpoint_dir, llama3_tiny, tokenizer):
    cfg, params = llama3_tiny
    status, out, _ = run_cli(capsys, "--checkpoint", checkpoint_dir, "--chat", "--system", "Be brief.",
                             "--prompt", "Hi!", *GREEDY)
    ids = Chat(tokenizer, "Be brief.").user_turn("Hi!")
    expected = generate(cfg, params, tokenizer, [ids], max_new_tokens=6, temperature=0).texts[0]
    assert (status, out) == (0, expected + "\n")


def test_interactive_chat_keeps_the_conversation(capsys, monkeypatch, checkpoint_dir, llama3_tiny, tokenizer):
    prompts, offsets = [], []
    real = text.reply

    def spy(conversation, tok, prompt_ids, **kw):
        prompts.append(prompt_ids)
        offsets.append(len(conversation.cached_ids))
        return real(conversation, tok, prompt_ids, **kw)

    monkeypatch.setattr(text, "reply", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi there\n\nHow are you?\n"))
    status, out, _ = run_cli(capsys, "--checkpoint", checkpoint_dir, "--chat", "--system", "Be brief.", *GREEDY)
    assert status == 0 and len(prompts) == 2  # the blank line is skipped
    first_answer, second_answer = out.split("\n")[:2]
    assert out == f"{first_answer}\n{second_answer}\n"
    assert prompts[1] == tokenizer.encode_dialog([
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": first_answer}, {"role": "user", "content": "How are you?"}])
    # The second turn continued the first turn's cache, and answered as a fresh generation does.
    assert offsets[1] > len(prompts[0])
    cfg, params = llama3_tiny
    fresh = generate(cfg, params, tokenizer, [prompts[1]], max_new_tokens=6, temperature=0).texts[0]
    assert second_answer == fresh


def test_prompts_file_gives_seeded_jsonl_in_order(capsys, tmp_path, checkpoint_dir, llama3_tiny, tokenizer):
    cfg, params = llama3_tiny
    texts = ["The sky is", "Paris is the capital of", "1, 2, 3,"]
    plain = tmp_path / "prompts.txt"
    plain.write_text(f"{texts[0]}\n\n{texts[1]}\n{texts[2]}\n")
    argv = ["--checkpoint", checkpoint_dir, "--prompts-file", plain, "--batch-size", 2, "--max-new-tokens", 5]
    status, out, _ = run_cli(capsys, *argv, "--seed", 3)
    records = [json.loads(line) for line in out.splitlines()]
    # Default sampling (temperature 0.6, top-p 0.9): the seed makes it reproducible.
    expected = generate(cfg, params, tokenizer, texts, max_new_tokens=5, batch_size=2, seed=3)
    assert status == 0
    assert [r["index"] for r in records] == [0, 1, 2] and [r["prompt"] for r in records] == texts
    assert [r["completion"] for r in records] == expected.texts
    assert [r["num_tokens"] for r in records] == [len(t) for t in expected.token_ids]
    # JSONL input, results into --output; another seed, other samples.
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    status, out, _ = run_cli(capsys, "--checkpoint", checkpoint_dir, "--prompts-file", jsonl, "--batch-size", 2,
                             "--max-new-tokens", 5, "--seed", 4, "--output", tmp_path / "out.jsonl")
    assert (status, out) == (0, "")
    other = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in other] == texts and [r["completion"] for r in other] != expected.texts


def test_quantize_flag(capsys, checkpoint_dir, llama3_tiny, tokenizer):
    cfg, params = llama3_tiny
    status, out, _ = run_cli(capsys, "--checkpoint", checkpoint_dir, "--prompt", "The sky is", *GREEDY,
                             "--quantize", "int8")
    q = quantize_params(params, "int8")
    expected = generate(cfg, q, tokenizer, ["The sky is"], max_new_tokens=6, temperature=0).texts[0]
    assert (status, out) == (0, expected + "\n")


def test_attention_impl_flag_reaches_the_model(capsys, checkpoint_dir, llama3_tiny, tokenizer):
    assert load_for_inference(checkpoint_dir, attention_impl="auto").cfg.attention_impl == "auto"
    # The engine's paged decoding against another implementation: transformers' LlamaForCausalLM holding the
    # same weights, a full forward pass (no cache) for each greedy token.
    model = hf_model(*llama3_tiny)
    prompt = tokenizer.encode("The sky is", bos=True, eos=False)
    ids = list(prompt)
    for _ in range(6):
        token = int(hf_logits(model, [ids])[0, -1].argmax())
        if token in tokenizer.stop_tokens:
            break
        ids.append(token)
    expected = tokenizer.decode(ids[len(prompt):])
    assert len(ids) > len(prompt) + 1  # a continuation to compare, not an immediate stop
    for impl in ("auto", "xla"):
        status, out, _ = run_cli(capsys, "--checkpoint", checkpoint_dir, "--prompt", "The sky is", "--attention-impl",
                                 impl, *GREEDY)
        assert (status, out) == (0, expected + "\n"), impl


def test_bfloat16_checkpoint_runs_in_float32_on_cpu_unless_asked(tmp_path, llama3_tiny):
    cfg, params = llama3_tiny
    bf16 = save(tmp_path / "bf16", dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16"),
                jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), tokenizer_path=default_tokenizer_path())
    load = lambda **kwargs: load_for_inference(bf16, **kwargs)[:2]  # noqa: E731
    cfg32, params32 = load()
    assert (cfg32.dtype, params32.layers[0]["attention"]["wq"].dtype) == ("float32", jnp.float32)
    cfg16, params16 = load(dtype="bfloat16")
    assert (cfg16.dtype, params16.layers[0]["attention"]["wq"].dtype) == ("bfloat16", jnp.bfloat16)
    # Quantizing reads the stored weights without a float32 copy first; compute stays float32.
    cfg8, params8 = load(quantize="int8")
    assert (cfg8.dtype, params8.layers[0]["attention"]["wq"].values.dtype) == ("float32", jnp.int8)
    assert params8.layers[0]["attention_norm"]["scale"].dtype == jnp.bfloat16


def test_a_training_runs_directory_runs_its_final_model(capsys, tmp_path, checkpoint_dir, llama3_tiny, tokenizer):
    run = tmp_path / "run"  # a training run's --out: config.json, checkpoints/, then model/ when it completes
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint_dir / "config.json", run / "config.json")
    status, out, err = run_cli(capsys, "--checkpoint", run, "--prompt", "The sky is", *GREEDY)
    assert (status, out) == (1, "")
    assert err == f"error: {run} is a training run's directory without its final model: pass {run / 'model'} " \
                  "once the run completes (it is written after the last step)\n"
    shutil.copytree(checkpoint_dir, run / "model")
    status, out, err = run_cli(capsys, "--checkpoint", run, "--prompt", "The sky is", *GREEDY)
    expected = generate(*llama3_tiny, tokenizer, ["The sky is"], max_new_tokens=6, temperature=0).texts[0]
    assert (status, out) == (0, expected + "\n")
    assert err == f"note: {run} is a training run's directory: using its final model, {run / 'model'}\n"


def test_a_model_larger_than_free_memory_is_refused_in_one_line(capsys, monkeypatch, checkpoint_dir):
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=10**6))
    status, out, err = run_cli(capsys, "--checkpoint", checkpoint_dir, "--prompt", "hi")
    assert status == 1 and out == "" and err.count("\n") == 1
    assert "GB for its float32 weights, but 0.001 GB of memory is available: pass --dtype bfloat16" in err


def test_dtype_and_mesh_flags_place_the_weights(checkpoint_dir):
    # Generation on meshes is compared with one device in test_sharded.py; here, what the flags load.
    model = load_for_inference(checkpoint_dir, dtype="bfloat16", mesh=make_mesh("dp2,tp4"), quantize="int8")
    cfg, params, mesh = model.cfg, model.params, model.mesh
    # Quantized: the unquantized norms keep the stored float32; the matmuls run in bfloat16.
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "float32")
    assert dict(mesh.shape) == {"dp": 2, "fsdp": 1, "cp": 1, "tp": 4}
    assert isinstance(params, DecodeParams)  # split for decoding (infer.prepare)
    wq = params.layers[1]["attention"]["wq"]
    assert wq.values.dtype == jnp.int8 and wq.values.sharding.spec == P(None, "tp", None)
    assert params.layers[1]["attention_norm"]["scale"].dtype == jnp.float32
    cfg, params = load_for_inference(checkpoint_dir, dtype="bfloat16")[:2]
    assert (cfg.param_dtype, params.layers[1]["attention_norm"]["scale"].dtype) == ("bfloat16", jnp.bfloat16)


@pytest.fixture(scope="module")
def no_tokenizer_dir(tmp_path_factory, checkpoint_dir):
    path = tmp_path_factory.mktemp("bare") / "ckpt"
    shutil.copytree(checkpoint_dir, path)
    (path / "tokenizer.model").unlink()
    return path


@pytest.mark.parametrize("case, argv, message", [
    ("not a checkpoint", ["--checkpoint", "{tmp}", "--prompt", "hi"], "is not a llama_jax checkpoint"),
    ("missing dir", ["--checkpoint", "{tmp}/nope", "--prompt", "hi"], "is not a llama_jax checkpoint"),
    ("no tokenizer", ["--checkpoint", "{bare}", "--prompt", "hi"],
     "has no tokenizer (tokenizer.model or tokenizer.json): pass --tokenizer PATH"),
    ("bad tokenizer path", ["--checkpoint", "{ckpt}", "--tokenizer", "{tmp}/t.model", "--prompt", "hi"],
     "--tokenizer: no such file"),
    ("too long", ["--checkpoint", "{ckpt}", "--prompt", "word " * 80],
     "prompt 0 has 82 tokens, but the model's context is 64 tokens: a prompt may have at most 63 (pass --truncate"),
    ("nothing to do", ["--checkpoint", "{ckpt}"], "nothing to do: pass --prompt TEXT, --prompts-file F or --chat"),
    ("bad mesh", ["--checkpoint", "{ckpt}", "--prompt", "hi", "--mesh", "tp3"], "mesh 'tp3'"),
    ("cp mesh", ["--checkpoint", "{ckpt}", "--prompt", "hi", "--mesh", "dp2,cp4"],
     "--mesh dp2,cp4: context parallelism (cp) is for training"),
    ("no kernel lowering", ["--checkpoint", "{ckpt}", "--prompt", "hi", "--attention-impl", "pallas"],
     "attention impl 'pallas' has no lowering on backend 'cpu'"),
    ("bad batch", ["--checkpoint", "{ckpt}", "--prompts-file", "{tmp}/p.txt", "--batch-size", "0"],
     "--batch-size must be >= 1"),
    ("bad temperature", ["--checkpoint", "{tmp}", "--prompt", "hi", "--temperature", "-1"],
     "temperature must be >= 0"),
    ("bad top-p", ["--checkpoint", "{tmp}", "--prompt", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
    ("bad token budget", ["--checkpoint", "{tmp}", "--prompt", "hi", "--max-new-tokens", "-2"],
     "--max-new-tokens must be >= 1, got -2"),
    ("missing prompts file", ["--checkpoint", "{ckpt}", "--prompts-file", "{tmp}/none.txt"],
     "--prompts-file: cannot read"),
    ("bad jsonl", ["--checkpoint", "{ckpt}", "--prompts-file", "{tmp}/bad.jsonl"],
     "bad.jsonl line 2 is not a JSON object with a string 'prompt'"),
])
def test_bad_input_is_one_line_and_exit_1(capsys, tmp_path, checkpoint_dir, no_tokenizer_dir, case, argv, message):
    (tmp_path / "p.txt").write_text("hi\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    argv = [a.format(tmp=tmp_path, ckpt=checkpoint_dir, bare=no_tokenizer_dir) for a in argv]
    status, out, err = run_cli(capsys, *argv)
    assert status == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("tokens, message", [
    (0, "--max-new-tokens must be >= 1, got 0"),
    (64, "--max-new-tokens 64 leaves no room for a prompt in the model's context of 64 tokens (at most 63)"),
    (100000, "--max-new-tokens 100000 leaves no room for a prompt in the model's context of 64 tokens"),
])
def test_a_token_budget_that_cannot_work_is_refused_before_the_model_loads(capsys, checkpoint_dir, monkeypatch,
                                                                            tokens, message):
    monkeypatch.setattr(checkpoint, "load", lambda *args, **kwargs: pytest.fail("the model loaded"))
    status, out, err = run_cli(capsys, "--checkpoint", checkpoint_dir, "--prompt", "hi", "--max-new-tokens", tokens)
    assert (status, out) == (1, "") and err == f"error: {message}\n" if tokens != 100000 else message in err


def test_truncate_keeps_the_end_of_a_long_prompt(capsys, checkpoint_dir):
    status, out, err = run_cli(capsys, "--checkpoint", checkpoint_dir, "--prompt", "word " * 80, "--truncate",
                               *GREEDY)
    assert status == 0 and err == "" and out.endswith("\n")


@pytest.mark.parametrize("argv", [["--checkpoint", "x", "--prompt", "hi", "--no-such-flag"], ["--prompt", "hi"],
                                  ["--checkpoint", "x", "--quantize", "int4", "--prompt", "hi"]])
def test_bad_flags_print_usage_and_exit_2(capsys, argv):
    status, _, err = run_cli(capsys, *argv)
    assert status == 2 and "usage: python -m llama_jax.infer" in err


def test_module_entry_point(checkpoint_dir):
    """The real `python -m` in a fresh process."""
    ok = subprocess.run([sys.executable, "-m", "llama_jax.infer", "--checkpoint", str(checkpoint_dir),
                         "--prompt", "The sky is", *GREEDY], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.endswith("\n") and len(ok.stdout) > 1, ok.stderr


def test_a_damaged_checkpoint_is_one_line_in_a_fresh_process(tmp_path, checkpoint_dir):
    """Also nothing after that line at exit (a failed read leaves TensorStore callbacks behind)."""
    damaged = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir, damaged)
    largest = max((f for f in (damaged / "params").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    for _ in range(2):  # the leftover callbacks fired in about half of the runs
        run = subprocess.run([sys.executable, "-m", "llama_jax.infer", "--checkpoint", str(damaged), "--prompt", "hi"],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 1 and run.stdout == ""
        assert run.stderr.startswith("error: ") and "damaged checkpoint" in run.stderr, run.stderr
        assert run.stderr.count("\n") == 1, run.stderr


# A Llama-architecture model with its own tokenizer (SmolLM2-style byte-level BPE, ChatML) ----------

@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, hf_chat_model):
    """(our converted checkpoint, transformers' model, transformers' tokenizer) of the same model."""
    import torch
    import transformers

    from llama_jax.convert.hf import convert_hf

    ours = convert_hf(hf_chat_model, tmp_path_factory.mktemp("chat_model") / "ours")
    model = transformers.LlamaForCausalLM.from_pretrained(hf_chat_model, dtype=torch.float32).eval()
    return ours, model, transformers.AutoTokenizer.from_pretrained(hf_chat_model)


def transformers_greedy(model, hf_tokenizer, prompt_ids, max_new_tokens):
    """transformers' greedy `generate`, decoded as our CLI prints it (the stop token left out)."""
    import torch

    stops = [2]  # <|im_end|>: eos_token, generation_config's eos and the template's end of turn
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=stops, pad_token_id=2)[0, len(prompt_ids):].tolist()
    return hf_tokenizer.decode(out[:-1] if out and out[-1] in stops else out, skip_special_tokens=False)


def test_chat_model_with_its_own_tokenizer_replies_as_transformers(capsys, tmp_path, chat_model):
    ours, model, hf_tokenizer = chat_model
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    prompt_ids = hf_tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    expected = transformers_greedy(model, hf_tokenizer, prompt_ids, 12)
    assert len(set(expected)) > 5  # a varied reply (random weights often repeat one token)
    status, out, err = run_cli(capsys, "--checkpoint", ours, "--chat", "--system", "Be brief.", "--prompt",
                               "Hi there!", "--temperature", "0", "--max-new-tokens", "12")
    assert (status, out, err) == (0, expected + "\n", "")

    prompts = ["Hello, world!", "The quick brown fox"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    status, out, _ = run_cli(capsys, "--checkpoint", ours, "--chat", "--prompts-file", tmp_path / "prompts.txt",
                             "--temperature", "0", "--max-new-tokens", "8")
    chats = [hf_tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                              return_dict=False) for p in prompts]
    assert status == 0
    assert [json.loads(line)["completion"] for line in out.splitlines()] == [
        transformers_greedy(model, hf_tokenizer, ids, 8) for ids in chats]


def test_chat_model_interactive_chat_keeps_the_conversation(capsys, monkeypatch, chat_model):
    """Two turns on stdin: the second prompt is the model's template over the whole conversation,
    prefilled after the first turn's cache, and answered as transformers answers it."""
    ours, model, hf_tokenizer = chat_model
    prompts = []
    real = text.reply

    def spy(conversation, tok, prompt_ids, **kw):
        prompts.append((prompt_ids, len(conversation.cached_ids)))
        return real(conversation, tok, prompt_ids, **kw)

    monkeypatch.setattr(text, "reply", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi there!\nMore, please.\n"))
    status, out, _ = run_cli(capsys, "--checkpoint", ours, "--chat", "--temperature", "0", "--max-new-tokens", "6")
    first, second = out.split("\n")[:2]
    assert status == 0 and out == f"{first}\n{second}\n"
    dialog = [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": first},
              {"role": "user", "content": "More, please."}]
    (_, _), (prompt, cached) = prompts
    assert prompt == hf_tokenizer.apply_chat_template(dialog, add_generation_prompt=True, return_dict=False)
    assert cached > len(prompts[0][0])  # the first turn's cache is continued
    assert second == transformers_greedy(model, hf_tokenizer, prompt, 6)


def test_chat_model_completes_text_as_transformers(capsys, chat_model):
    ours, model, hf_tokenizer = chat_model
    expected = transformers_greedy(model, hf_tokenizer, hf_tokenizer("The quick brown")["input_ids"], 10)
    status, out, _ = run_cli(capsys, "--checkpoint", ours, "--prompt", "The quick brown", "--temperature", "0",
                             "--max-new-tokens", "10")
    assert (status, out) == (0, expected + "\n")


def test_chat_template_that_refuses_the_dialog_is_one_line(capsys, tmp_path, chat_model):
    ours, _, _ = chat_model
    refusing = shutil.copytree(ours, tmp_path / "refusing")
    config = json.loads((refusing / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                               "supported') }}{% endif %}") + config["chat_template"]
    (refusing / "tokenizer_config.json").write_text(json.dumps(config))
    status, out, err = run_cli(capsys, "--checkpoint", refusing, "--chat", "--system", "Be brief.", "--prompt", "Hi",
                               *GREEDY)
    assert (status, out) == (1, "") and err.count("\n") == 1
    assert err.startswith("error: the chat template of") and err.endswith("failed: System role not supported\n")


def test_damaged_tokenizer_json_is_one_line(capsys, tmp_path, chat_model):
    ours, _, _ = chat_model
    damaged = shutil.copytree(ours, tmp_path / "damaged")
    (damaged / "tokenizer.json").write_text((ours / "tokenizer.json").read_text()[:5000])
    status, out, err = run_cli(capsys, "--checkpoint", damaged, "--prompt", "Hi", *GREEDY)
    assert (status, out) == (1, "") and err.count("\n") == 1
    assert err.startswith(f"error: {damaged}/tokenizer.json: the tokenizers library cannot read it")
