"""The OpenAI-compatible server, end to end: a real uvicorn server on a free loopback port, a tiny checkpoint made
here (random model + a BPE tokenizer trained on generated text), driven by the real `openai` client and by raw
HTTP where the wire shape itself is the point (SSE lines, error bodies, status codes).

Reasoning is checked with a scripted model: layers zeroed so the residual stream is the token embedding, one-hot
embeddings and an lm_head that maps each token of a chain to the next, so greedy decoding after R1's
`<think>\\n` prompt emits ` w1 w2</think> w3 w4<EOS>` through the whole real path (engine, detokenizer, server).
"""
import asyncio
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time

import openai
import pytest
import torch

import nanoseek
from models import corpus_tokenizer, tiny_checkpoint, tiny_model
from servers import serve
from nanoseek.chat import render_text
from nanoseek.inference.protocol import TokenText
from nanoseek.inference.server import UI_DIR, create_app

MODEL = "tiny-test"
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})


pytestmark = pytest.mark.usefixtures("one_thread")


def raw(port, method, path, body=None, headers=None):
    """One HTTP request -> (status, headers, body bytes); bytes bodies are sent as they are."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    out = resp.status, dict(resp.getheaders()), resp.read()
    conn.close()
    return out


def client(port, **kw):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=kw.pop("api_key", "none"),
                         max_retries=0, timeout=120, **kw)


def chat_msgs(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # random model with lm_head x10 (sharper logits: fp32 rounding in a batch cannot flip a greedy near-tie)
    # and a BPE tokenizer trained on synthetic_corpus(300)
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), head_scale=10.0)


@pytest.fixture(scope="module")
def srv(ckpt):
    llm = nanoseek.LLM(ckpt, max_model_len=256, max_num_seqs=64)
    app = create_app(llm, MODEL, max_body_bytes=64 * 1024)
    with serve(app) as port:
        yield port, app, llm


def test_chat_non_streaming_shape_and_usage(srv):
    port, _, llm = srv
    r = client(port).chat.completions.create(model=MODEL, messages=chat_msgs("Once upon a time"), max_tokens=10,
                                             **GREEDY)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    (choice,) = r.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.message.role == "assistant"
    prompt = render_text(llm.tokenizer, chat_msgs("Once upon a time"), add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode(prompt))
    assert r.usage.completion_tokens == 10 and r.usage.total_tokens == r.usage.prompt_tokens + 10
    # R1's template opens <think> in the prompt: until the model writes </think>, everything is reasoning
    msg = choice.message.model_dump()
    assert msg["reasoning_content"] == msg["reasoning"] and msg["reasoning_content"]
    if not msg["content"]:                     # the random model never closed the block: all 10 tokens reasoned
        assert r.usage.completion_tokens_details.reasoning_tokens == 10


def test_streaming_chat_matches_non_streaming_and_sse_shape(srv):
    port = srv[0]
    body = {"model": MODEL, "messages": chat_msgs("The dog"), "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    status, _, full = raw(port, "POST", "/v1/chat/completions", body)
    assert status == 200
    want = json.loads(full)["choices"][0]["message"]
    for include_usage in (False, True):
        status, headers, data = raw(port, "POST", "/v1/chat/completions",
                                    {**body, "stream": True, "stream_options": {"include_usage": include_usage}})
        assert status == 200 and headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in data.decode().split("\n") if ln]
        assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
        chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert len({c["id"] for c in chunks}) == 1
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        if include_usage:        # every chunk says usage: null, then a last chunk with no choices carries it
            *chunks, last = chunks
            assert last["choices"] == [] and last["usage"]["completion_tokens"] == 12
            assert all(c["usage"] is None for c in chunks)
        else:
            assert all("usage" not in c for c in chunks)
        deltas = [c["choices"][0]["delta"] for c in chunks]
        assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length" and deltas[-1] == {}
        assert "".join(d.get("reasoning_content", "") for d in deltas) == want["reasoning_content"]
        assert "".join(d.get("content", "") for d in deltas) == want["content"]


def test_completions_n_seed_and_stop(srv):
    c = client(srv[0])
    greedy = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, n=2, **GREEDY)
    assert greedy.object == "text_completion" and [ch.index for ch in greedy.choices] == [0, 1]
    assert greedy.choices[0].text == greedy.choices[1].text and greedy.usage.completion_tokens == 32
    # seeded sampling: same seed -> same n=2 completions; another seed -> different ones
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=16, n=2, temperature=1.0, seed=1234,
              extra_body={"ignore_eos": True})
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    assert a.choices[0].text != a.choices[1].text
    assert [ch.text for ch in c.completions.create(**{**kw, "seed": 99}).choices] != [ch.text for ch in a.choices]
    # a stop string taken from the middle of the greedy text cuts it there
    text = greedy.choices[0].text
    k = next(k for k in range(2, len(text) - 3) if text.find(text[k:k + 3]) == k
             and all(ch.isascii() and ch.isprintable() for ch in text[k:k + 3]))
    stopped = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, stop=[text[k:k + 3]],
                                   **GREEDY).choices[0]
    assert stopped.text == text[:k] and stopped.finish_reason == "stop"
    # a batch of prompts: choices are numbered prompt-major
    batch = c.completions.create(model=MODEL, prompt=["Once upon a time", "The cat"], max_tokens=4, n=2, **GREEDY)
    assert [ch.index for ch in batch.choices] == [0, 1, 2, 3] and batch.choices[0].text == text[:len(
        batch.choices[0].text)]


def test_logprobs_match_the_model(srv, ckpt):
    port, _, llm = srv
    r = client(port).chat.completions.create(model=MODEL, messages=chat_msgs("Hello"), max_tokens=6, logprobs=True,
                                             top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    # bytes are exact: they map back to the token ids and rebuild the text
    token_text = TokenText(llm.tokenizer)
    id_of = {bytes(token_text(i)[1]): i for i in range(llm.tokenizer.vocab_size)}
    out_ids = [id_of[bytes(e.bytes)] for e in content]
    msg = r.choices[0].message.model_dump()
    close = "</think>" if llm.tokenizer.token_to_id("</think>") in out_ids else ""
    joined = b"".join(bytes(e.bytes) for e in content).decode(errors="replace")
    assert joined.rstrip("\ufffd") == ((msg["reasoning_content"] or "") + close + msg["content"]).rstrip("\ufffd")
    # values against an independent full forward pass (no cache, expanded attention)
    prompt = llm.tokenizer.encode(render_text(llm.tokenizer, chat_msgs("Hello"), add_generation_prompt=True))
    model = nanoseek.load_model(ckpt)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt + out_ids]))[0, len(prompt) - 1:-1].float(), -1)
    for t, e in enumerate(content):
        assert e.logprob == pytest.approx(lp[t, out_ids[t]].item(), abs=1e-4)
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-6)
        assert [x.logprob for x in e.top_logprobs] == sorted((x.logprob for x in e.top_logprobs), reverse=True)
    comp = client(port).completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=4, logprobs=2, **GREEDY)
    lps = comp.choices[0].logprobs
    assert len(lps.tokens) == 4 and len(lps.top_logprobs[0]) <= 2 and lps.text_offset[0] == 0


def test_models_endpoint(srv):
    c = client(srv[0])
    assert [m.id for m in c.models.list().data] == [MODEL]
    assert c.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("other")


def test_errors_are_openai_shaped_and_the_server_keeps_serving(srv):
    port = srv[0]
    ok = {"model": MODEL, "messages": chat_msgs("hi"), "max_tokens": 2}
    cases = [
        (404, "/v1/chat/completions", {**ok, "model": "gpt-9"}),
        (400, "/v1/chat/completions", {**ok, "temperature": -1}),
        (400, "/v1/chat/completions", {**ok, "top_p": 0}),
        (400, "/v1/chat/completions", {**ok, "n": 0}),
        (400, "/v1/chat/completions", {**ok, "messages": []}),
        (400, "/v1/chat/completions", {**ok, "messages": [{"role": "wizard", "content": "x"}]}),
        (400, "/v1/chat/completions", {**ok, "max_tokens": 100_000}),                      # over the context
        (400, "/v1/chat/completions", {**ok, "messages": chat_msgs("hello " * 400)}),     # prompt over context
        (400, "/v1/chat/completions", {**ok, "logit_bias": {"5": 10}}),
        (400, "/v1/chat/completions", b"{not json"),
        (400, "/v1/completions", {"model": MODEL, "prompt": [1, "a"]}),
        (400, "/v1/completions", {"model": MODEL, "prompt": [100_000]}),                  # id outside the vocab
        (413, "/v1/completions", {"model": MODEL, "prompt": "x" * 100_000}),             # body over 64 KiB
        (404, "/v1/embeddings", {"model": MODEL, "input": "x"}),
    ]
    for status, path, body in cases:
        got, _, data = raw(port, "POST", path, body)
        err = json.loads(data)["error"]
        assert got == status, (path, body if isinstance(body, bytes) else str(body)[:80], data)
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert err["type"] == "invalid_request_error"
    # a body streamed without Content-Length is counted as it arrives
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", body=iter([b"x" * 40_000] * 3), encode_chunked=True,
                 headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "request_too_large"
    conn.close()
    with pytest.raises(openai.BadRequestError):
        client(port).chat.completions.create(model=MODEL, messages=chat_msgs("x"), top_logprobs=3)
    r = client(port).chat.completions.create(**ok)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert raw(port, "GET", "/health")[0] == 200


def test_ui_page(srv):
    if not (UI_DIR / "index.html").is_file():
        pytest.skip("nanoseek/inference/ui/index.html not present")
    status, headers, data = raw(srv[0], "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"<html" in data.lower()


def test_reasoning_split(tmp_path):
    tok = corpus_tokenizer(n_docs=300)
    prompt_ids = tok.encode(render_text(tok, chat_msgs("What is 2+2?"), add_generation_prompt=True))
    words = [i for i in range(tok.vocab_size) if re.fullmatch(r" [a-z]{3,}", tok.decode([i]))][:4]
    chain = [prompt_ids[-1], words[0], words[1], tok.token_to_id("</think>"), words[2], words[3], tok.eos_id]
    model = tiny_model(head_scale=None)
    with torch.no_grad():
        for layer in model.model.layers:       # every block adds zero: the residual stream is the embedding
            layer.self_attn.o_proj.weight.zero_()
            if hasattr(layer.mlp, "experts"):
                layer.mlp.experts.down_proj.zero_()
                layer.mlp.shared_experts.down_proj.weight.zero_()
            else:
                layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        head.zero_()
        for k, (t, nxt) in enumerate(zip(chain, chain[1:])):
            emb[t].zero_()
            emb[t, k] = 1.0
            head[nxt, k] = 1.0
    reasoning, content = tok.decode(words[:2]), tok.decode(words[2:])
    llm = nanoseek.LLM(model, tok, max_model_len=128)
    with serve(create_app(llm, MODEL)) as port:
        c = client(port)
        r = c.chat.completions.create(model=MODEL, messages=chat_msgs("What is 2+2?"), temperature=0)
        msg = r.choices[0].message.model_dump()
        assert (msg["reasoning_content"], msg["reasoning"], msg["content"]) == (reasoning, reasoning, content)
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 6
        assert r.usage.completion_tokens_details.reasoning_tokens == 3        # w1 w2 </think>
        stream = c.chat.completions.create(model=MODEL, messages=chat_msgs("What is 2+2?"), temperature=0,
                                           stream=True, stream_options={"include_usage": True})
        kinds, r_text, c_text, usage = [], "", "", None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for ch in chunk.choices:
                d = ch.delta.model_dump()
                if d.get("reasoning_content"):
                    kinds.append("r")
                    r_text += d["reasoning_content"]
                    assert d["reasoning"] == d["reasoning_content"]
                if d.get("content"):
                    kinds.append("c")
                    c_text += d["content"]
        assert (r_text, c_text) == (reasoning, content)
        assert "".join(kinds) == "r" * kinds.count("r") + "c" * kinds.count("c") and "r" in kinds and "c" in kinds
        assert usage.completion_tokens_details.reasoning_tokens == 3
        # completions return the raw text, tags included
        comp = c.completions.create(model=MODEL, prompt=tok.decode(prompt_ids), max_tokens=10, temperature=0)
        assert comp.choices[0].text == reasoning + "</think>" + content


def test_64_concurrent_streams_match_sequential_greedy(srv):
    port, app, _ = srv
    prompts = [f"Story {i}: once upon a time the {['cat', 'dog', 'fox', 'owl'][i % 4]} was {i * 7 % 13}"
               for i in range(64)]
    sync = client(port)
    want = []
    for p in prompts:
        m = sync.chat.completions.create(model=MODEL, messages=chat_msgs(p), max_tokens=8, **GREEDY)
        want.append(((m.choices[0].message.model_dump()["reasoning_content"] or ""), m.choices[0].message.content))

    async def one(c, p):
        r_text, c_text, usage = "", "", None
        stream = await c.chat.completions.create(model=MODEL, messages=chat_msgs(p), max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY)
        async for chunk in stream:
            usage = chunk.usage or usage
            for ch in chunk.choices:
                d = ch.delta.model_dump()
                r_text += d.get("reasoning_content") or ""
                c_text += d.get("content") or ""
        return (r_text, c_text), usage.completion_tokens

    async def main():
        c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        return await asyncio.gather(*(one(c, p) for p in prompts))

    steps = app.state.engine.stats["steps"]
    t0 = time.monotonic()
    got = asyncio.run(main())
    assert [g for g, _ in got] == want and all(n == 8 for _, n in got)
    # batched across clients: far fewer engine steps than 64 requests x 8 tokens run one by one
    assert app.state.engine.stats["steps"] - steps < 64 * 8 / 4, time.monotonic() - t0


def test_disconnected_streams_are_aborted_and_freed(srv):
    port, app, _ = srv
    engine = app.state.engine
    generated = engine.stats["generated_tokens"]

    async def read_a_bit(c, i):
        stream = await c.chat.completions.create(model=MODEL, messages=chat_msgs(f"Tell me story number {i}"),
                                                 max_tokens=200, stream=True, **GREEDY)
        n = 0
        async for _ in stream:
            n += 1
            if n == 3:
                break
        await stream.close()

    async def main():
        c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        await asyncio.gather(*(read_a_bit(c, i) for i in range(8)))

    asyncio.run(main())
    deadline = time.monotonic() + 30
    bm = engine.block_manager
    while (engine.has_unfinished_requests() or app.state.bridge.num_active or engine.requests
           or bm.num_free_blocks != bm.num_usable_blocks):
        assert time.monotonic() < deadline, "aborted requests are still in the engine"
        time.sleep(0.05)
    assert engine.stats["generated_tokens"] - generated < 8 * 200 // 2      # stopped early, not run to the end
    # a non-streaming client that hangs up is noticed by polling, and its request aborted too
    generated = engine.stats["generated_tokens"]
    body = json.dumps({"model": MODEL, "prompt": "Once", "max_tokens": 240, "n": 8, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.1)
    deadline = time.monotonic() + 30
    while engine.has_unfinished_requests() or app.state.bridge.num_active:
        assert time.monotonic() < deadline, "the abandoned request is still in the engine"
        time.sleep(0.02)
    assert engine.stats["generated_tokens"] - generated < 8 * 240
    r = client(port).chat.completions.create(model=MODEL, messages=chat_msgs("still there?"), max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_cli_serve_with_api_key_and_no_ui(ckpt):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "nanoseek", "serve", str(ckpt), "--port", str(port), "--api-key", "sekret",
           "--served-model-name", "cli-model", "--no-ui", "--max-model-len", "128", "--max-num-seqs", "4",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "nanoseek serve did not come up"
            try:
                if raw(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            status, _, data = raw(port, "GET", "/v1/models", headers=headers)
            assert status == 401 and json.loads(data)["error"]["code"] == "invalid_api_key"
        status, _, data = raw(port, "GET", "/v1/models", headers={"Authorization": "Bearer sekret"})
        assert status == 200 and json.loads(data)["data"][0]["id"] == "cli-model"
        with pytest.raises(openai.AuthenticationError):
            client(port, api_key="wrong").chat.completions.create(model="cli-model", messages=chat_msgs("x"))
        r = client(port, api_key="sekret").chat.completions.create(model="cli-model", messages=chat_msgs("hi"),
                                                                   max_tokens=4, temperature=0)
        assert r.usage.completion_tokens <= 4
        assert raw(port, "GET", "/")[0] == 404                 # --no-ui
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
