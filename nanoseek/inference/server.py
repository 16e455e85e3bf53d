"""`nanoseek serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one shared LLMEngine.

    nanoseek serve runs/demo/final --port 8000 [--api-key KEY] [--served-model-name NAME] [--no-ui]
    curl localhost:8000/v1/chat/completions -d '{"model": "...", "messages": [{"role": "user", "content": "hi"}]}'

One background thread runs the engine's step loop; every HTTP request adds its requests to that one engine, so
clients are batched together (continuous batching), and each step's outputs are handed to the waiting
requests' asyncio queues on the event loop. The engine knows token ids; this module knows HTTP: the chat
template, the OpenAI shapes (nanoseek.inference.protocol), the reasoning split (nanoseek.inference.reasoning),
auth, errors. A client that disconnects has its requests aborted, which frees their cache blocks.
"""

import argparse
import asyncio
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from nanoseek.inference.async_engine import AsyncEngine, Pending
from nanoseek.train.config import add_config_arguments, config_from_args, option

HELP = "serve a checkpoint over the OpenAI API (chat with reasoning, completions, models) plus a chat web page"
UI_DIR = Path(__file__).parent / "ui"
log = logging.getLogger("nanoseek.serve")


@dataclass
class ServeConfig:
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface; set --api-key then)")
    port: int = option(8000, "TCP port")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1/*; None: $NANOSEEK_API_KEY "
                                       "if set, else no auth")
    served_model_name: str | None = option(None, "model id clients send and /v1/models lists; None: PATH")
    max_num_seqs: int = option(64, "sequences decoded at once across all clients")
    max_model_len: int | None = option(None, "context length (prompt + completion); None: the model's")
    max_num_batched_tokens: int = option(1024, "token budget of one engine step (prefill chunks + decodes)")
    kv_cache_memory_gb: float = option(1.0, "memory for the paged latent cache")
    num_speculative_tokens: int = option(0, "MTP draft tokens per step (checkpoints with MTP modules); 0: off")
    dtype: str = option("auto", "weights dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    device: str | None = option(None, "cpu or cuda; None: cuda when available")
    compile: bool = option(False, "torch.compile the decode step, compiled at startup (~20 s per graph on CPU; "
                                  "then ~2x faster decoding at small batches)")
    ui: bool = option(True, "serve the chat web page at / (--no-ui: API only)")
    max_body_mb: float = option(8.0, "largest request body accepted (413 above it)")
    log_level: str = option("info", "uvicorn log level", ("critical", "error", "warning", "info", "debug"))


class Guard:
    """ASGI middleware: API key on /v1/* and a request-body size limit, checked before any route runs."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        from starlette.responses import JSONResponse

        from nanoseek.inference.protocol import ApiError, error_body

        if scope["type"] != "http":          # lifespan events pass straight through
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        error = None
        if self.api_key and scope["path"].startswith("/v1") and \
                not check_api_key(headers.get("authorization"), self.api_key):
            error = ApiError(401, "incorrect or missing API key: send the header 'Authorization: Bearer KEY'",
                             code="invalid_api_key")
        length = headers.get("content-length", "")
        if error is None and length.isdigit() and int(length) > self.max_body_bytes:
            error = ApiError(413, f"request body of {int(length)} bytes exceeds the limit of {self.max_body_bytes}",
                             code="request_too_large")
        if error is not None:
            body = error_body(error.status, error.message, code=error.code)
            return await JSONResponse(body, status_code=error.status)(scope, receive, send)
        seen = 0

        async def limited_receive():           # bodies sent without a Content-Length (chunked)
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise ApiError(413, f"request body exceeds the limit of {self.max_body_bytes} bytes",
                               code="request_too_large")
            return message

        await self.app(scope, limited_receive, send)


def create_app(engine_or_llm, served_model_name: str, api_key: str | None = None, ui: bool = True,
               max_body_bytes: int = 8 * 2 ** 20, root: str | None = None):
    """The FastAPI app over an LLM or LLMEngine (its engine loop starts and stops with the app's lifespan)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from jinja2 import TemplateError
    from starlette.exceptions import HTTPException

    from nanoseek.chat import render_text
    from nanoseek.errors import NanoseekError
    from nanoseek.inference import protocol as P
    from nanoseek.inference.reasoning import THINK_CLOSE, ReasoningParser, count_reasoning_tokens, \
        prompt_opens_reasoning

    engine = getattr(engine_or_llm, "engine", engine_or_llm)
    tokenizer = engine.tokenizer
    text_of = P.TokenText(tokenizer) if tokenizer is not None else (lambda i: (str(i), None))
    close_id = tokenizer.token_to_id(THINK_CLOSE) if tokenizer is not None else None
    bridge = AsyncEngine(engine)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        bridge.start()
        try:
            yield
        finally:
            bridge.stop()

    app = FastAPI(title="nanoseek", lifespan=lifespan)
    app.state.bridge, app.state.engine = bridge, engine
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)

    def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
        return JSONResponse(P.error_body(status, message, param, code), status_code=status)

    @app.exception_handler(HTTPException)          # ApiError and the framework's own (404, 405)
    async def _http_error(request, e: HTTPException):
        return error(e.status_code, str(e.detail), getattr(e, "param", None), getattr(e, "code", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return error(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})")
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error(400, f"{loc}: {first.get('msg')}" if loc else str(first.get("msg")), param=loc or None)

    @app.exception_handler(NanoseekError)         # RequestError from SamplingParams / the engine, DataError
    async def _bad_request(request, e: Exception):
        return error(400, str(e))

    @app.exception_handler(TemplateError)
    async def _template_error(request, e: TemplateError):
        return error(400, f"chat template: {e}")

    def check_model(name: str | None) -> None:
        if bridge.error is not None:
            raise P.ApiError(503, f"the engine failed ({bridge.error!r}); restart the server")
        if name is not None and name != served_model_name:
            raise P.ApiError(404, f"the model {name!r} does not exist; this server serves {served_model_name!r}",
                             param="model", code="model_not_found")

    def room(ids: list[int], requested: int | None, param: str) -> int | None:
        """max_tokens for the engine: a request that cannot fit the context is a 400 (as OpenAI and vLLM)."""
        left = engine.max_model_len - len(ids)
        if left <= 0:
            raise P.ApiError(400, f"the prompt has {len(ids)} tokens but the context holds {engine.max_model_len};"
                                  f" shorten the prompt", param=param, code="context_length_exceeded")
        if requested is not None and requested > left:
            raise P.ApiError(400, f"max_tokens = {requested} does not fit: the context holds {engine.max_model_len}"
                                  f" tokens and the prompt uses {len(ids)}; ask for at most {left}",
                             param="max_tokens", code="context_length_exceeded")
        return requested

    def submit(prompts: list[list[int]], params, prefix: str) -> tuple[list[str], Pending]:
        for ids in prompts:                          # validate all before queueing any
            engine.validate(ids, params)
        queue: asyncio.Queue = asyncio.Queue()
        rids = [f"{prefix}-{i}" for i in range(len(prompts))]
        pending = Pending(bridge, [], queue)
        try:
            for rid, ids in zip(rids, prompts):
                bridge.add(rid, ids, params, queue)
                pending.pending.add(rid)
        except BaseException:
            pending.close()
            raise
        return rids, pending

    def stream_response(events):
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def delta_logprobs(c):
        """Logprobs of the tokens new in this output (c.logprobs grows with the sequence)."""
        end = len(c.token_ids)
        return c.delta_token_ids, c.logprobs[end - len(c.delta_token_ids):end]

    # ----- routes -----
    @app.get("/health")
    async def health():
        if bridge.error is not None:
            return error(503, f"the engine failed ({bridge.error!r})")
        return {"status": "ok", "active_requests": bridge.num_active}

    def card() -> P.ModelCard:
        return P.ModelCard(id=served_model_name, created=created, root=root, max_model_len=engine.max_model_len)

    @app.get("/v1/models")
    async def models():
        return P.ModelList(data=[card()]).model_dump(mode="json")

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(model_id)
        return card().model_dump(mode="json")

    @app.post("/v1/chat/completions")
    async def chat(body: P.ChatCompletionRequest, request: Request):
        check_model(body.model)
        body.check_supported()
        if tokenizer is None:
            raise P.ApiError(400, "chat needs a tokenizer: serve a checkpoint that has tokenizer.json")
        text = render_text(tokenizer, [m.for_template() for m in body.messages], add_generation_prompt=True)
        ids = tokenizer.encode(text)
        params = body.sampling_params(room(ids, body.requested_max_tokens, "messages"), body.num_logprobs)
        thinking = prompt_opens_reasoning(text)
        rid = P.new_id("chatcmpl")
        (sub,), pending = submit([ids], params, rid)
        n_top, ts = body.top_logprobs or 0, P.now()

        def reasoning_tokens(c, parser) -> int:
            return count_reasoning_tokens(c.token_ids, parser.saw_reasoning, parser.reasoning_closed, close_id,
                                          parser.reasoning_text, tokenizer.encode)

        if not body.stream:
            try:
                finals = await pending.collect(request)
            finally:
                pending.close()
            if finals is None:                      # the client is gone; nobody reads this
                return error(499, "client closed the request")
            choices, n_reasoning = [], 0
            for c in finals[sub].outputs:
                parser = ReasoningParser(thinking)
                r, t = (a + b for a, b in zip(parser.feed(c.text), parser.finish()))
                n_reasoning += reasoning_tokens(c, parser)
                said = r if parser.saw_reasoning else None
                lp = P.chat_logprobs(c.token_ids, c.logprobs, n_top, text_of) if body.logprobs else None
                choices.append(P.ChatChoice(index=c.index, message=P.ChatMessage(
                    content=t, reasoning_content=said, reasoning=said), logprobs=lp, finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason))
            out = finals[sub]
            return P.ChatCompletion(id=rid, created=ts, model=served_model_name, choices=choices,
                                    usage=P.usage([out], len(ids), n_reasoning)
                                    ).model_dump(mode="json")

        def chunk(index, delta, logprobs=None, finish=None, stop_reason=None) -> str:
            choice = P.ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish,
                                       stop_reason=stop_reason)
            return P.sse(P.ChatCompletionChunk(id=rid, created=ts, model=served_model_name, choices=[choice]),
                         body.include_usage)

        async def events():
            parsers = [ReasoningParser(thinking) for _ in range(params.n)]
            last = None
            try:
                for i in range(params.n):
                    yield chunk(i, P.Delta(role="assistant", content=""))
                while (out := await pending.next()) is not None:
                    last = out
                    for c in out.outputs:
                        parser = parsers[c.index]
                        r, t = parser.feed(c.delta_text)
                        if c.finish_reason is not None:
                            r, t = (a + b for a, b in zip((r, t), parser.finish()))
                        lp = None
                        if body.logprobs and c.delta_token_ids:
                            lp = P.chat_logprobs(*delta_logprobs(c), n_top, text_of)
                        if r:                                    # reasoning first: it precedes the answer
                            yield chunk(c.index, P.Delta(reasoning_content=r, reasoning=r), lp)
                            lp = None
                        if t or lp is not None:
                            yield chunk(c.index, P.Delta(content=t), lp)
                        if c.finish_reason is not None:
                            yield chunk(c.index, P.Delta(), finish=c.finish_reason, stop_reason=c.stop_reason)
                if body.include_usage:
                    n_reasoning = sum(reasoning_tokens(c, parsers[c.index]) for c in last.outputs)
                    final = P.ChatCompletionChunk(id=rid, created=ts, model=served_model_name, choices=[],
                                                  usage=P.usage([last], len(ids), n_reasoning))
                    yield P.sse(final)
                yield P.SSE_DONE
            except P.ApiError as e:             # the engine died mid-stream: say so, then end the stream
                yield f"data: {json.dumps(P.error_body(e.status, e.message))}\n\n{P.SSE_DONE}"
            finally:
                pending.close()                 # a client that went away: abort, which frees its cache blocks

        return stream_response(events())

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request):
        check_model(body.model)
        body.check_supported()
        prompts = []
        for p in body.prompts():
            if isinstance(p, str) and tokenizer is None:
                raise P.ApiError(400, "text prompts need a tokenizer: send token ids, or serve a checkpoint "
                                      "that has tokenizer.json", param="prompt")
            # a text prompt gets BOS when the tokenizer says so (DeepSeek: add_bos_token), as transformers does
            prompts.append(tokenizer.encode(p, add_bos=tokenizer.add_bos_token) if isinstance(p, str) else list(p))
        max_tokens = body.max_tokens if body.max_tokens is not None else 16     # OpenAI's default
        for ids in prompts:
            room(ids, max_tokens, "prompt")
        params = body.sampling_params(max_tokens, body.logprobs)
        cid = P.new_id("cmpl")
        rids, pending = submit(prompts, params, cid)
        where = {rid: i for i, rid in enumerate(rids)}
        n, ts, n_top = params.n, P.now(), body.logprobs or 0
        echo = [(p if isinstance(p, str) else tokenizer.decode(p) if tokenizer is not None else "")
                if body.echo else "" for p in body.prompts()]
        n_prompt = sum(len(ids) for ids in prompts)

        if not body.stream:
            try:
                finals = await pending.collect(request)
            finally:
                pending.close()
            if finals is None:
                return error(499, "client closed the request")
            choices = []
            for rid in rids:
                i = where[rid]
                for c in finals[rid].outputs:
                    lp = None
                    if body.logprobs is not None:
                        lp = P.completion_logprobs(c.token_ids, c.logprobs, n_top, text_of, len(echo[i]))
                    choices.append(P.CompletionChoice(index=i * n + c.index, text=echo[i] + c.text, logprobs=lp,
                                                      finish_reason=c.finish_reason, stop_reason=c.stop_reason))
            return P.Completion(id=cid, created=ts, model=served_model_name, choices=choices,
                                usage=P.usage([finals[r] for r in rids], n_prompt)).model_dump(mode="json")

        def chunk(index, text, logprobs=None, finish=None, stop_reason=None) -> str:
            choice = P.CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish,
                                        stop_reason=stop_reason)
            return P.sse(P.Completion(id=cid, created=ts, model=served_model_name, choices=[choice]),
                         body.include_usage)

        async def events():
            finals, offsets = {}, {}
            try:
                for i, prefix in enumerate(echo):
                    for j in range(n):
                        offsets[i * n + j] = len(prefix)
                        if prefix:
                            yield chunk(i * n + j, prefix)
                while (out := await pending.next()) is not None:
                    i = where[out.request_id]
                    if out.finished:
                        finals[out.request_id] = out
                    for c in out.outputs:
                        index, lp = i * n + c.index, None
                        if body.logprobs is not None and c.delta_token_ids:
                            lp = P.completion_logprobs(*delta_logprobs(c), n_top, text_of, offsets[index])
                        offsets[index] += len(c.delta_text)
                        if c.delta_text or lp is not None or c.finish_reason is not None:
                            yield chunk(index, c.delta_text, lp, c.finish_reason, c.stop_reason)
                if body.include_usage:
                    yield P.sse(P.Completion(id=cid, created=ts, model=served_model_name, choices=[],
                                             usage=P.usage([finals[r] for r in rids], n_prompt)))
                yield P.SSE_DONE
            except P.ApiError as e:             # the engine died mid-stream: say so, then end the stream
                yield f"data: {json.dumps(P.error_body(e.status, e.message))}\n\n{P.SSE_DONE}"
            finally:
                pending.close()

        return stream_response(events())

    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def unknown(path: str):             # before the page's catch-all mount: a JSON 404, not a 405
        raise P.ApiError(404, f"no endpoint /v1/{path}; this server has /v1/chat/completions, /v1/completions, "
                              f"/v1/models")

    if ui and (UI_DIR / "index.html").is_file():
        from fastapi.staticfiles import StaticFiles

        # mounted last, so /health and /v1/* match first; html=True serves index.html at /
        app.mount("/", StaticFiles(directory=UI_DIR, html=True), name="ui")
    return app


# ----------------------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="HF-format checkpoint dir (config.json, *.safetensors, "
                                                     "tokenizer.json)")
    add_config_arguments(parser, ServeConfig)


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from nanoseek.inference.llm import LLM

    cfg = config_from_args(ServeConfig, args)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    llm = LLM(args.path, dtype=dtype, device=device, max_num_seqs=cfg.max_num_seqs,
              max_model_len=cfg.max_model_len, max_num_batched_tokens=cfg.max_num_batched_tokens,
              kv_cache_memory_gb=cfg.kv_cache_memory_gb, num_speculative_tokens=cfg.num_speculative_tokens,
              compile=cfg.compile)
    if cfg.compile:
        print("nanoseek serve: compiling the decode step ...", flush=True)
        llm.warmup()
    api_key = cfg.api_key or os.environ.get("NANOSEEK_API_KEY") or None
    if not api_key and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can use it", cfg.host)
    app = create_app(llm, cfg.served_model_name or args.path, api_key=api_key, ui=cfg.ui,
                     max_body_bytes=int(cfg.max_body_mb * 2 ** 20), root=args.path)
    print(f"nanoseek serve: {args.path} as {cfg.served_model_name or args.path!r} on http://{cfg.host}:{cfg.port}"
          f"{' (API key required)' if api_key else ''}", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    return 0


def check_api_key(header: str | None, api_key: str) -> bool:
    """Constant-time compare of 'Bearer KEY' (hmac.compare_digest: no timing hint of how much matched)."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())
