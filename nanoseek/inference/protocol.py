"""The OpenAI wire format: request bodies (validated) and the response, chunk, usage and error shapes.

Field names and meanings follow the OpenAI API reference; the extras every open-source server accepts (top_k,
min_p, repetition_penalty, stop_token_ids, ignore_eos, min_tokens, ...) keep vLLM's names. Unknown fields are
ignored, as OpenAI-compatible servers do, but fields whose meaning this server cannot honour (logit_bias,
tools, JSON response formats, suffix) are refused with a 400 rather than silently dropped.

Responses are pydantic models serialized as they are, nulls included, as OpenAI sends them; a streamed `delta`
carries only the keys it sets, and `usage` appears in chunks only when stream_options.include_usage asks for it.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer
from starlette.exceptions import HTTPException

from nanoseek.inference.params import RequestError, SamplingParams

MAX_TOP_LOGPROBS = 20      # OpenAI's limit for chat top_logprobs


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# ----------------------------------------------------------------------------- requests
class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """What chat and completion requests share: the model name and the sampling fields."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extras (vLLM names)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None

    def check_supported(self) -> None:
        if self.logit_bias:
            raise RequestError("logit_bias is not supported by this server; remove it")
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed when stream is true")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """SamplingParams (validated there: RequestError names the bad field); None means the OpenAI default."""
        given = {k: v for k, v in dict(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, seed=self.seed, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens).items() if v is not None}
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **given)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def for_template(self) -> dict:
        """The plain {role, content} dict chat templates expect (text parts joined; developer = system)."""
        content = self.content
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise RequestError("only text content parts are supported (type 'text')")
            content = "".join(p.text for p in content)
        if content is None and not self.tool_calls:
            content = ""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise RequestError("tools are not supported by this server; remove them")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise RequestError("response_format other than {'type': 'text'} is not supported by this server")
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
                raise RequestError(f"top_logprobs = {self.top_logprobs}: must be in [0, {MAX_TOP_LOGPROBS}]")
            if not self.logprobs:
                raise RequestError("top_logprobs needs logprobs: true")

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[Any]             # checked by prompts(): union errors from pydantic read badly
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise RequestError("suffix (fill-in-the-middle) is not supported by this server; remove it")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise RequestError("best_of other than n is not supported by this server")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"logprobs = {self.logprobs}: must be in [0, {MAX_TOP_LOGPROBS}]")
        if self.echo and self.logprobs is not None:
            raise RequestError("echo with logprobs needs prompt logprobs, which this server does not compute")

    def prompts(self) -> list[str | list[int]]:
        """A batch of prompts: a string, a list of strings, a token id list, or a list of token id lists."""
        def ids(x) -> bool:
            return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        p = self.prompt
        if isinstance(p, str) or ids(p):
            return [p]
        if p and (all(isinstance(x, str) for x in p) or all(ids(x) for x in p)):
            return list(p)
        raise RequestError("prompt must be a string, a list of strings, a list of token ids, or a list of token "
                           "id lists (non-empty)")


# ----------------------------------------------------------------------------- responses
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


def usage(finals: list, n_prompt: int, reasoning_tokens: int | None = None) -> Usage:
    """Usage of finished RequestOutputs: completion tokens over every choice; cached = prefix-cache hits."""
    n_out = sum(len(c.token_ids) for out in finals for c in out.outputs)
    return Usage(prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(o.num_cached_tokens for o in finals)),
                 completion_tokens_details=None if reasoning_tokens is None else
                 CompletionTokensDetails(reasoning_tokens=reasoning_tokens))


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    # DeepSeek's API calls it reasoning_content, newer vLLM and OpenRouter `reasoning`: clients read either
    reasoning_content: str | None = None
    reasoning: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None
    stop_reason: int | str | None = None       # vLLM extra: the stop string or token id that ended the choice


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None

    @model_serializer(mode="wrap")
    def _only_set(self, handler):
        # a delta lists only what changed: {"content": "x"}, never "role": null
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    stop_reason: int | str | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None          # None only in stream chunks (the final usage chunk sets it)
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanoseek"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def sse(model: BaseModel, include_usage: bool = True) -> str:
    """One server-sent event; chunks leave out `usage` unless the client asked for it."""
    body = model.model_dump_json(exclude=None if include_usage else {"usage"})
    return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"


# ----------------------------------------------------------------------------- token text for logprobs
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class TokenText:
    """Token id -> (text, exact UTF-8 bytes), as logprobs report them; a token may hold half a character."""

    def __init__(self, tokenizer):
        from tokenizers import decoders

        self.tok = tokenizer
        self.byte_level = isinstance(tokenizer.tok.decoder, decoders.ByteLevel)
        self.byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        self.added = {i: t.content for i, t in tokenizer.tok.get_added_tokens_decoder().items()}
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self.cache:
            piece = self.tok.id_to_token(token_id)
            if token_id in self.added:
                raw = self.added[token_id].encode()
            elif self.byte_level and piece is not None and all(c in self.byte_of for c in piece):
                raw = bytes(self.byte_of[c] for c in piece)
            else:
                raw = self.tok.decode([token_id]).encode()
            self.cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return self.cache[token_id]


def _finite(lp: float) -> float:
    return max(lp, -9999.0)              # JSON has no -inf; an underflowed probability reads as -9999


def _top(cands: dict, n: int, text_of) -> list:
    """The n most likely candidates (the engine's dict also holds the sampled token, whatever its rank)."""
    return [(text_of(i), _finite(lp.logprob)) for i, lp in sorted(cands.items(), key=lambda kv: kv[1].rank)
            if lp.rank <= n]


def chat_logprobs(token_ids: list[int], logprobs: list[dict], n: int, text_of) -> ChoiceLogprobs:
    """Chat logprobs: one entry per generated token with its top-n alternatives."""
    content = []
    for tid, cands in zip(token_ids, logprobs):
        (tok, raw), lp = text_of(tid), cands[tid].logprob
        top = [TopLogprob(token=t, logprob=v, bytes=b) for (t, b), v in _top(cands, n, text_of)]
        content.append(TokenLogprob(token=tok, logprob=_finite(lp), bytes=raw, top_logprobs=top))
    return ChoiceLogprobs(content=content)


def completion_logprobs(token_ids: list[int], logprobs: list[dict], n: int, text_of, offset: int
                        ) -> CompletionLogprobs:
    """Legacy completions logprobs: parallel lists; text_offset counts characters from the choice's start."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for tid, cands in zip(token_ids, logprobs):
        tok = text_of(tid)[0]
        out.tokens.append(tok)
        out.token_logprobs.append(_finite(cands[tid].logprob))
        out.top_logprobs.append({t: v for (t, _), v in _top(cands, n, text_of)})
        out.text_offset.append(offset)
        offset += len(tok)
    return out


# ----------------------------------------------------------------------------- errors
class ApiError(HTTPException):
    """An error response: HTTP status plus the OpenAI error fields (an HTTPException, so FastAPI passes it on
    even when raised while reading the body)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(status_code=status, detail=message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """{"error": {"message", "type", "param", "code"}} as the OpenAI API writes it."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
