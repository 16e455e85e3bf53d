"""The chat page `nanoseek serve` ships (nanoseek/inference/ui), driven in a real headless Chromium.

The server is the real one (`create_app` over an `LLM` on a checkpoint written to disk); the model is a tiny
DeepSeek-V3 whose weights are set by hand so that it writes a fixed R1-style reply: the R1 template's generation
prompt ends in `<think>\\n`, the model continues with a sentence of reasoning, `</think>`, then a markdown answer
that contains `<img onerror>` and `<script>` (which the page must show as text), then repeats the answer forever
(so a large max_tokens gives a long generation to stop). How: attention and MLP outputs are zeroed, so the last
hidden state is the current token's embedding; each scripted token embeds as its own one-hot direction and the LM
head maps that direction to the next token (a bigram chain, argmax at any temperature).

Needs Chromium and pip's playwright (`apt-get install chromium`, `pip install playwright`; playwright's own
browser download is not used); without them these tests are skipped. The screenshots are kept in
artifacts/ui/ (git-ignored), their paths printed.
"""
from __future__ import annotations

import json
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install -e '.[serve]')")
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:                                     # pragma: no cover - depends on the machine
    sync_playwright = None

ROOT = Path(__file__).resolve().parents[1]
APP_JS = ROOT / "nanoseek" / "inference" / "ui" / "app.js"
ARTIFACTS = ROOT / "artifacts" / "ui"
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed (pip install playwright)"),
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (apt-get install chromium)"),
]

MODEL = "tiny-r1"
REASONING = "Okay, so the user greets me. A friendly reply with some markdown would fit well here"
ANSWER = ("Hello! I am **nanoseek**, a tiny model; escaping test: <img src=x onerror=alert(1)> and `<script>` "
          "stay text")
REASONING_TOKENS = 19                   # the 18 tokens of REASONING and </think>
ONE_REPLY = REASONING_TOKENS + 1 + 30    # + "\n\n" + the 30 tokens of the answer


# ----------------------------------------------------------------------------- the scripted model
def make_checkpoint(path: Path) -> Path:
    import torch

    import nanoseek
    from nanoseek.tokenizer import train_tokenizer

    # a corpus that makes every piece of the script one token (no token repeats, so a bigram chain can say it)
    script = REASONING + "</think>\n\n" + ANSWER + " "
    tok = train_tokenizer(texts=[script] * 50 + ["one\n\ntwo"] * 50, vocab_size=1024,
                          show_progress=False)
    chain = tok.encode("<think>\n" + REASONING + "</think>\n\n")[1:]     # starts at "\n", the prompt's last token
    answer = tok.encode(ANSWER + " ")
    chain += answer
    assert len(set(chain)) == len(chain) == ONE_REPLY + 1, [tok.decode([i]) for i in chain]

    cfg = nanoseek.ModelConfig.from_name("tiny", vocab_size=tok.vocab_size)
    assert len(chain) <= cfg.hidden_size
    model = nanoseek.build_model(cfg, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                p.zero_()                               # every sublayer adds nothing: hidden = embedding
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        successor = dict(zip(chain, chain[1:] + [answer[0]]))   # after the answer, the answer again
        for slot, (tok_id, nxt) in enumerate(successor.items()):
            model.model.embed_tokens.weight[tok_id, slot] = 1.0
            model.lm_head.weight[nxt, slot] = 10.0      # logit 80 after the final norm: argmax at any temperature
    nanoseek.save_model(model, path)                    # (replaces the directory: the tokenizer goes after)
    tok.save(path)
    return path


class Server:
    """create_app over a fresh LLM, served by uvicorn in a thread; `delay` slows each engine step."""

    def __init__(self, checkpoint: Path, api_key: str | None = None):
        import uvicorn

        from nanoseek.inference import LLM
        from nanoseek.inference.server import create_app

        self.llm = LLM(str(checkpoint), dtype="float32", device="cpu")
        self.delay = 0.0
        self.llm.model.model.norm.register_forward_pre_hook(lambda m, a: time.sleep(self.delay) if self.delay else None)
        app = create_app(self.llm, MODEL, api_key=api_key)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "the server did not start"
            time.sleep(0.05)

    def idle(self, timeout: float = 5.0) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.llm.engine.has_unfinished_requests():
                return True
            time.sleep(0.05)
        return False

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny-r1"))


@pytest.fixture(scope="module")
def server(checkpoint):
    s = Server(checkpoint)
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1000, "height": 820})
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors = []
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" and
            not m.text.startswith("Failed to load resource") else None)
    page.errors = errors
    yield page
    context.close()
    assert not errors, errors                           # no script errors, no CSP violations


def open_chat(page, server, max_tokens: int | None = None):
    page.goto(server.url)
    expect(page.locator("#model-name")).to_have_text(MODEL)
    expect(page.locator("#max-tokens")).to_have_value("256")       # the default 1024 > the 512 context: halved
    if max_tokens is not None:
        page.click("#settings-toggle")
        page.fill("#max-tokens", str(max_tokens))
        page.press("#max-tokens", "Tab")
        page.click("#settings-toggle")


def send(page, text: str):
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.wait_for_timeout(150)                          # the last animation frame
    page.screenshot(path=str(path))
    print(f"screenshot: {path}")
    return path


def last_reply(page):
    return page.locator(".msg.assistant").last


# ----------------------------------------------------------------------------- the page against the server
def test_chat_streams_thinking_then_answer(page, server):
    open_chat(page, server, max_tokens=ONE_REPLY)
    server.delay = 0.05                                 # ~2.5 s per reply: slow enough to watch it stream
    try:
        with page.expect_request("**/v1/chat/completions") as first:
            send(page, "Hi there! Who are you?")
        body = first.value.post_data_json
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["model"] == MODEL and body["max_tokens"] == ONE_REPLY
        assert body["temperature"] == pytest.approx(0.6) and body["top_p"] == pytest.approx(0.95)
        assert body["messages"] == [{"role": "user", "content": "Hi there! Who are you?"}]

        reply = last_reply(page)
        expect(page.locator(".msg.user .bubble")).to_have_text("Hi there! Who are you?")
        # streamed: reasoning shows while the model is still thinking
        page.wait_for_function("() => { const r = document.querySelector('.msg.streaming .thinking.live .think-body');"
                               " return r && r.textContent.length > 0; }")
        expect(page.locator("#stop")).to_be_visible()
        thinking = reply.locator("details.thinking")
        expect(thinking).not_to_have_attribute("open", "")          # collapsed until asked
        thinking.locator("summary").click()                           # expand it while it streams
        expect(thinking.locator(".think-body")).to_be_visible()
        expect(reply.locator(".answer")).to_contain_text("stay text")    # the answer arrives after </think>
        expect(page.locator("#send")).to_be_visible()
        expect(page.locator("#stop")).to_be_hidden()
    finally:
        server.delay = 0.0

    expect(thinking.locator(".think-body")).to_have_text(REASONING)
    assert thinking.evaluate("d => d.open")
    meta = thinking.locator(".think-meta").inner_text()
    assert re.fullmatch(rf"\d+\.\d s · {REASONING_TOKENS} tokens", meta), meta   # usage's reasoning_tokens
    answer = reply.locator(".answer")
    expect(answer.locator("strong")).to_have_text("nanoseek")       # markdown
    expect(answer.locator("code")).to_have_text("<script>")
    assert "<img src=x onerror=alert(1)>" in answer.inner_text()    # escaped: shown as text
    assert answer.locator("img, script").count() == 0
    assert "Okay" not in answer.inner_text()                       # the reasoning stays out of the answer
    expect(reply.locator(".stats")).to_contain_text(f"hit max tokens · {ONE_REPLY} tokens")
    shot(page, "chat-light.png")

    # second turn: the earlier answer goes back without its reasoning
    with page.expect_request("**/v1/chat/completions") as second:
        send(page, "Tell me more")
    messages = second.value.post_data_json["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"].strip() == ANSWER.strip()
    assert "Okay" not in messages[1]["content"] and "think>" not in messages[1]["content"]
    expect(page.locator(".msg.assistant")).to_have_count(2)
    expect(last_reply(page).locator(".stats")).to_contain_text("tokens")
    page.emulate_media(color_scheme="dark")
    shot(page, "chat-dark.png")

    # new chat clears the conversation
    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    expect(page.locator("#prompt")).to_be_focused()


def test_stop_aborts_a_long_generation(page, server):
    open_chat(page, server, max_tokens=400)
    server.delay = 0.03                                 # 400 tokens would take > 12 s
    try:
        send(page, "Write a long story")
        reply = last_reply(page)
        expect(reply.locator(".answer")).to_contain_text("Hello")
        reply.locator("summary").click()
        shot(page, "chat-streaming.png")
        t0 = time.time()
        page.click("#stop")
        expect(page.locator("#send")).to_be_visible()
        expect(reply.locator(".stats")).to_contain_text("stopped")
        n = len(reply.locator(".answer").inner_text())
        assert server.idle(), "the server kept generating after the page stopped the stream"
        stopped_in = time.time() - t0
        page.wait_for_timeout(300)
        assert len(reply.locator(".answer").inner_text()) == n      # nothing arrives after stop
        assert n < 6 * len(ANSWER), n                   # far from the 400 tokens asked for
        expect(reply).not_to_have_class(re.compile(r"\bstreaming\b"))
    finally:
        server.delay = 0.0
    print(f"stopped and the server idle after {stopped_in:.2f} s")
    # the page works on, and Escape stops too
    server.delay = 0.03
    try:
        send(page, "Another one")
        expect(last_reply(page).locator(".answer")).to_contain_text("Hello")
        page.keyboard.press("Escape")
        expect(last_reply(page).locator(".stats")).to_contain_text("stopped")
        assert server.idle()
    finally:
        server.delay = 0.0
    expect(page.locator(".msg.assistant")).to_have_count(2)


def test_errors_are_shown(page, server):
    open_chat(page, server, max_tokens=ONE_REPLY)
    page.fill("#prompt", "line one")                    # Shift+Enter is a new line, not a send
    page.press("#prompt", "Shift+Enter")
    page.keyboard.type("line two")
    expect(page.locator("#prompt")).to_have_value("line one\nline two")
    expect(page.locator(".msg")).to_have_count(0)
    send(page, "word " * 700)                           # longer than the tiny model's 512-token context
    err = last_reply(page).locator(".error")
    expect(err).to_contain_text("context holds 512")    # the server's OpenAI-shaped error message
    page.route("**/v1/chat/completions", lambda route: route.abort())
    send(page, "hello?")
    expect(last_reply(page).locator(".error")).to_contain_text("Network error")
    page.unroute("**/v1/chat/completions")
    send(page, "hello again")                           # failed turns are not sent back as history
    expect(last_reply(page).locator(".answer")).to_contain_text("stay text")
    assert page.locator(".msg.assistant .error").count() == 2


def test_api_key(page, checkpoint):
    s = Server(checkpoint, api_key="sekrit")
    try:
        page.goto(s.url)
        expect(page.locator("#banner")).to_contain_text("API key")    # /v1/models said 401
        expect(page.locator("#api-key")).to_be_visible()
        expect(page.locator("#api-key")).to_be_focused()
        page.fill("#max-tokens", str(ONE_REPLY))
        send(page, "hi")
        expect(last_reply(page).locator(".error")).to_contain_text("API key")
        shot(page, "api-key.png")
        page.fill("#api-key", "sekrit")
        page.press("#api-key", "Enter")
        expect(page.locator("#model-name")).to_have_text(MODEL)
        with page.expect_request("**/v1/chat/completions") as req:
            send(page, "hi")
        assert req.value.headers["authorization"] == "Bearer sekrit"
        expect(last_reply(page).locator(".answer")).to_contain_text("stay text")
        expect(page.locator("#banner")).to_be_hidden()
    finally:
        s.close()


# ----------------------------------------------------------------------------- the renderer alone
def test_model_output_is_escaped(page, server):
    """A completion holding HTML renders as text, in the answer and in the reasoning (the page's render hook)."""
    page.goto(server.url)
    evil = ('<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> '
            '[click](javascript:window.pwned=3) <a href="javascript:1">a</a> **<b>bold</b>**\n\n'
            '```html\n<script>window.pwned = 4</script>\n```\n- <iframe src="javascript:1"></iframe>')
    li = page.evaluate_handle("([c, r]) => window.nanoseek.appendMessage({role: 'assistant', content: c, "
                              "reasoning: r})", [evil, evil])
    li = li.as_element()
    page.wait_for_timeout(200)
    assert page.evaluate("window.pwned") is None
    assert li.query_selector_all("script, img, iframe, b") == []
    assert [a.get_attribute("href") for a in li.query_selector_all("a")] == []
    text = li.inner_text()
    for piece in ("<script>window.pwned = 1</script>", '<img src=x onerror="window.pwned = 2">',
                  "[click](javascript:window.pwned=3)", "<b>bold</b>", '<iframe src="javascript:1"></iframe>'):
        assert piece in text, piece
    assert li.query_selector(".answer strong").inner_text() == "<b>bold</b>"
    assert li.query_selector(".answer pre code").inner_text() == "<script>window.pwned = 4</script>"
    page.evaluate("md => { window.nanoseek.appendMessage({role: 'user', content: 'Show me some markdown'});"
                  " window.nanoseek.appendMessage({role: 'assistant', content: md,"
                  " reasoning: 'The user wants a sample of every construct.'}); }", GALLERY)
    page.set_viewport_size({"width": 1000, "height": 1400})
    page.locator("#chat").evaluate("c => c.scrollTop = c.scrollHeight")
    shot(page, "markdown.png")


GALLERY = """## Markdown, rendered safely

Text with **bold**, *italic*, ~~struck~~, `inline code` and [a link](https://github.com/deepseek-ai/DeepSeek-V3).

1. Escape everything first
2. Then add the few tags markdown needs:
   - headings, emphasis, code
   - lists, quotes, tables

```python
def softmax(x):
    e = (x - x.max()).exp()   # <stable>
    return e / e.sum()
```

> R1 thinks first, then answers.

| model | total | activated |
|---|--:|--:|
| V3 | 671B | 37B |
| tiny | 0.2M | 0.1M |
"""

MARKDOWN_CASES = [
    ("# Title", "<h1>Title</h1>"),
    ("### Three ###", "<h3>Three</h3>"),
    ("**bold** and *it* and _it_ and __b__ and ~~gone~~",
     "<p><strong>bold</strong> and <em>it</em> and <em>it</em> and <strong>b</strong> and <del>gone</del></p>"),
    ("snake_case_name stays", "<p>snake_case_name stays</p>"),
    ("2 * 3 * 4", "<p>2 * 3 * 4</p>"),
    ("use `a < b && **c**`", "<p>use <code>a &lt; b &amp;&amp; **c**</code></p>"),
    ("```python\nx = 1 < 2\n\n**no**\n```",
     '<div class="code-block"><div class="code-lang">python</div><pre><code class="language-python">x = 1 &lt; 2\n\n'
     '**no**</code></pre></div>'),
    ("```\nunclosed <b>", '<div class="code-block"><pre><code>unclosed &lt;b&gt;</code></pre></div>'),
    ("- one\n- two\n  - nested\n- three",
     "<ul><li>one</li><li>two<ul><li>nested</li></ul></li><li>three</li></ul>"),
    ("3. c\n4. d", '<ol start="3"><li>c</li><li>d</li></ol>'),
    ("line one\nline two\n\npara", "<p>line one<br>line two</p><p>para</p>"),
    ("> quoted *x*", "<blockquote><p>quoted <em>x</em></p></blockquote>"),
    ("---", "<hr>"),
    ("[site](https://example.com/a?b=1&c=2)",
     '<p><a href="https://example.com/a?b=1&amp;c=2" target="_blank" rel="noopener noreferrer">site</a></p>'),
    ("see https://example.com.", '<p>see <a href="https://example.com" target="_blank" rel="noopener noreferrer">'
                                 'https://example.com</a>.</p>'),
    ("[x](javascript:alert(1))", "<p>[x](javascript:alert(1))</p>"),
    ("[x](data:text/html,hi)", "<p>[x](data:text/html,hi)</p>"),
    ('[x](https://a.com" onclick="alert(1))', '<p>[x](<a href="https://a.com" target="_blank" rel="noopener '
                                              'noreferrer">https://a.com</a>&quot; onclick=&quot;alert(1))</p>'),
    ('https://a.com"><b>x', '<p><a href="https://a.com" target="_blank" rel="noopener noreferrer">https://a.com</a>'
                            '&quot;&gt;&lt;b&gt;x</p>'),
    ("| a | b |\n|---|:-:|\n| 1 | **2** |",
     '<div class="table-wrap"><table><thead><tr><th>a</th><th class="align-center">b</th></tr></thead><tbody>'
     '<tr><td>1</td><td class="align-center"><strong>2</strong></td></tr></tbody></table></div>'),
    ("<script>alert(1)</script>", "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>"),
    ("\u0000" + "0\u0000", "<p>\ufffd0\ufffd</p>"),                  # placeholders cannot be forged
]


def test_markdown_renderer(browser):
    page = browser.new_page()
    try:
        page.goto("about:blank")
        page.add_script_tag(path=str(APP_JS))
        got = page.evaluate("cases => cases.map(c => window.nanoseek.renderMarkdown(c))",
                            [md for md, _ in MARKDOWN_CASES])
        bad = [(md, want, have) for (md, want), have in zip(MARKDOWN_CASES, got) if have != want]
        assert not bad, json.dumps(bad, indent=1, ensure_ascii=False)
        sse = page.evaluate("""() => { const feed = window.nanoseek.makeSSEParser();
            return [feed('data: {"a":1}\\n\\nda'), feed('ta: [DONE]\\n'),
                    feed(': comment\\nevent: x\\ndata:{}', true)]; }""")
        assert sse == [['{"a":1}'], ["[DONE]"], ["{}"]]
    finally:
        page.close()
