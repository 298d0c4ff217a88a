"""The OpenAI-compatible HTTP API over a BatchingEngine: `create_app(engine, tokenizer, model_name)`.

Each request is validated here (protocol.py, engine.check) before it reaches the engine, so a bad
one is a 400 that touches no other request, and every error is OpenAI's JSON shape, a 500 too.
Nothing slow runs on the event loop, which every stream's tokens pass through: a body over the
limit is refused before it is read (limits.py), and prompts are tokenized in a worker thread.
Generation streams through the runner's engine thread; text goes out in whole UTF-8 characters,
cut before a stop string (output.py). The routes' work is in completions.py and chat.py (what they
share: generation.py); /tokenize and /detokenize are vLLM's routes and shapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from llama_jax.infer.engine import BatchingEngine
from llama_jax.infer.score import Scorer
from llama_jax.serve import protocol as p
from llama_jax.serve.chat import chat, chat_messages
from llama_jax.serve.completions import complete
from llama_jax.serve.errors import APIError, error_response, install_error_handlers
from llama_jax.serve.generation import Generation
from llama_jax.serve.limits import DEFAULT_MAX_REQUEST_BYTES, BodyLimit
from llama_jax.serve.metrics import ServerMetrics
from llama_jax.serve.runner import EngineRunner


def uvicorn_config(app, **kwargs) -> uvicorn.Config:
    """uvicorn for `app` on uvloop's event loop and httptools' HTTP parser, both C (uvicorn's own
    defaults fall back to pure-Python asyncio and h11): every streamed token is an event through
    them, on the cores the engine's step runs on, where the server's Python competes with it for the
    GIL (bench/RESULTS.md, "Numbers moved from docstrings")."""
    return uvicorn.Config(app, loop="uvloop", http="httptools", **kwargs)


def create_app(engine, tokenizer, model_name: str, *, api_key: str | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, scorer=None) -> FastAPI:
    """The app; its lifespan starts the engine thread and stops it (aborting what is left).
    scorer: what scores echoed prompts (infer/score.Scorer); None: a BatchingEngine's own weights,
    and no prompt scoring for any other engine."""
    metrics = ServerMetrics()
    runner = EngineRunner(engine, metrics, scorer if scorer is not None else _engine_scorer(engine))
    generation = Generation(engine, tokenizer, model_name, runner, metrics)
    tokens = Tokens(generation)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        runner.start()
        yield
        await asyncio.to_thread(runner.stop)

    app = FastAPI(title="llama_jax", lifespan=lifespan)
    app.state.runner = runner
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    install_error_handlers(app)

    def check_key(request: Request) -> None:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    keyed = [Depends(check_key)] if api_key else []
    v1 = APIRouter(prefix="/v1", dependencies=keyed)

    @v1.get("/models")
    async def models() -> p.ModelList:
        features = ["stream", "logprobs", "n", "tools", "tool_choice", "parallel_tool_calls", "response_format",
                    "json_schema", "penalties", "logit_bias"] + (["echo_logprobs"] if runner.scorer is not None else []) \
            + ([f"speculative_decoding:{engine.speculative.method}"] if getattr(engine, "speculative", None) else [])
        return p.ModelList(data=[p.ModelCard(id=model_name, root=model_name, created=generation.created,
                                             max_model_len=engine.max_seq_len, features=features)])

    @v1.post("/completions")
    async def completions(body: p.CompletionRequest, http: Request):
        return await complete(generation, body, http)

    @v1.post("/chat/completions")
    async def chat_completions(body: p.ChatCompletionRequest, http: Request):
        return await chat(generation, body, http)

    app.include_router(v1)

    @app.post("/tokenize", dependencies=keyed)
    async def tokenize(body: p.TokenizeRequest) -> p.TokenizeResponse:
        return await tokens.tokenize(body)

    @app.post("/detokenize", dependencies=keyed)
    async def detokenize(body: p.DetokenizeRequest) -> p.DetokenizeResponse:
        return await tokens.detokenize(body)

    @app.get("/health")
    async def health():
        if not runner.alive():
            return error_response(503, "the engine thread is not running", "service_unavailable")
        if not runner.accepting:
            return error_response(503, "the server is shutting down", "service_unavailable")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _engine_scorer(engine) -> Scorer | None:
    """A scorer on a BatchingEngine's own weights; None for another engine (the tests' fakes)."""
    return Scorer.for_engine(engine) if isinstance(engine, BatchingEngine) else None


class Tokens:
    """vLLM's /tokenize and /detokenize."""

    def __init__(self, gen: Generation):
        self.gen = gen

    async def tokenize(self, body: p.TokenizeRequest) -> p.TokenizeResponse:
        """vLLM's /tokenize: a prompt's ids (with the BOS token unless add_special_tokens is false),
        or the ids the chat format gives messages (what /v1/chat/completions feeds the model). No
        context limit: a client asks to learn whether its prompt fits."""
        if body.model is not None:
            self.gen.check_model(body.model)
        if body.messages is not None:
            messages, param = chat_messages(body.messages), "messages"
            encode = lambda: self.gen.tokenizer.encode_dialog(messages)  # noqa: E731
        else:
            bos, param = body.add_special_tokens is not False, "prompt"
            encode = lambda: self.gen.tokenizer.encode(body.prompt, bos=bos, eos=False)  # noqa: E731
        try:
            ids = await asyncio.to_thread(encode)
        except (ValueError, TypeError) as e:  # e.g. a chat template that refuses the messages
            raise APIError(400, str(e), param=param) from None
        return p.TokenizeResponse(count=len(ids), max_model_len=self.gen.engine.max_seq_len, tokens=ids)

    async def detokenize(self, body: p.DetokenizeRequest) -> p.DetokenizeResponse:
        if body.model is not None:
            self.gen.check_model(body.model)
        self.gen.check_token_ids(body.tokens, "tokens", "tokens: token id")
        return p.DetokenizeResponse(prompt=await asyncio.to_thread(self.gen.tokenizer.decode, body.tokens))


