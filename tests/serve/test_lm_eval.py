"""lm-eval-harness against the server: its `local-completions` model (echo with logprobs, the prompt
scored by infer/score.py) gives the same accuracy and per-choice loglikelihoods on a local
multiple-choice task as its `hf` model (transformers, torch) on the same weights.

The weights are the tiny SmolLM2-style HF model (tests/hf_chat_model.py), converted to our
checkpoint and served as `python -m llama_jax.serve` loads it. The task is a YAML and a jsonl
written here; nothing is downloaded (HF_DATASETS_OFFLINE, HF_HUB_OFFLINE)."""

import json

import pytest

from llama_jax.convert.hf import convert_hf
from llama_jax.serve.__main__ import build_parser, load_engine
from llama_jax.serve.app import create_app
from tests.serve.common import live_server

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the test extra")

PAIRS = [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3), (9, 9), (3, 7)]


def write_task(directory):
    """A 10-question, 3-choice task `tiny_sums` (acc) in `directory`."""
    questions = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a * b + 10), str(a - b)],
                  "answer": i % 3} for i, (a, b) in enumerate(PAIRS)]
    (directory / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (directory / "tiny_sums.yaml").write_text(f"""\
task: tiny_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {directory / "questions.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network: the datasets and hub libraries read these when imported, so their config too."""
    import datasets
    import huggingface_hub

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def evaluate(task_dir, model, model_args):
    from lm_eval.tasks import TaskManager

    # Only our task: lm-eval's own thousands of task YAMLs took ~12 s to index on each call.
    tasks = TaskManager(include_path=str(task_dir), include_defaults=False)
    result = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["tiny_sums"], task_manager=tasks,
                                     log_samples=True)
    samples = sorted(result["samples"]["tiny_sums"], key=lambda s: s["doc_id"])
    return result["results"]["tiny_sums"]["acc,none"], [[ll for ll, _ in s["filtered_resps"]] for s in samples]


def test_local_completions_equal_hf_on_the_same_weights(tmp_path, hf_chat_model, offline):
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    write_task(task_dir)
    checkpoint = convert_hf(hf_chat_model, tmp_path / "ckpt")
    # lm-eval sends one request at a time: a batch of one compiles the fewest programs.
    engine, tokenizer = load_engine(build_parser().parse_args(["--checkpoint", str(checkpoint), "--max-batch", "1"]))

    hf_acc, hf_lls = evaluate(task_dir, "hf", f"pretrained={hf_chat_model},dtype=float32,device=cpu")
    with live_server(create_app(engine, tokenizer, "tiny-smol")) as url:
        # lm-eval tokenizes the context and each choice with the model's HF tokenizer and sends ids
        # (tokenized_requests): the same ids its hf model scores.
        our_acc, our_lls = evaluate(task_dir, "local-completions", dict(
            model="tiny-smol", base_url=f"{url}/v1/completions", tokenizer_backend="huggingface",
            tokenizer=str(hf_chat_model), tokenized_requests=True, max_length=engine.max_seq_len))
    assert our_acc == hf_acc
    assert len(our_lls) == len(PAIRS) and all(len(choices) == 3 for choices in our_lls)
    assert our_lls == [pytest.approx(choices, abs=1e-4) for choices in hf_lls]
