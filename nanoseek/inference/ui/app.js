/* nanoseek chat: a single-page client for this server's OpenAI-compatible /v1/chat/completions.
 *
 * Plain JavaScript, no dependencies. Sections:
 *   1. escapeHtml + renderMarkdown: a small, safe markdown renderer (escape everything first, then add the few
 *      tags markdown needs; link hrefs limited to http(s) and mailto).
 *   2. parseSSE: the `data:` lines of a server-sent-event stream.
 *   3. the chat: conversation state, streaming with AbortController, the Thinking block, settings, API key.
 * The functions of 1-2 and a render hook are exposed as `window.nanoseek` for tests and tinkering.
 */
"use strict";

(function () {
  // ------------------------------------------------------------------ 1. markdown

  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

  function escapeHtml(text) {
    return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
  }

  // Placeholders for finished HTML fragments (code spans, links) so later inline rules cannot touch them.
  // \u0000 never survives into the escaped text (renderMarkdown strips it), so they cannot be forged.
  const PH = "\u0000";

  function isSafeHref(escapedUrl) {
    // The URL is already HTML-escaped (no quotes or angle brackets left); only these schemes are linked.
    return /^(https?:\/\/|mailto:)[^\s]+$/i.test(escapedUrl);
  }

  function renderInline(escaped) {
    const store = [];
    const keep = (html) => PH + (store.push(html) - 1) + PH;
    let s = escaped;
    // inline code first: nothing inside is formatted
    s = s.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, (m, ticks, code) =>
      keep("<code>" + code.replace(/^ (.*) $/, "$1") + "</code>"));
    // [text](url): safe schemes become links, anything else stays as text
    s = s.replace(/\[([^\[\]]+)\]\(\s*([^()\s]+)\s*\)/g, (m, label, url) =>
      isSafeHref(url)
        ? keep('<a href="' + url + '" target="_blank" rel="noopener noreferrer">' + emphasis(label) + "</a>")
        : m);
    // bare URLs
    s = s.replace(/\bhttps?:\/\/(?:(?!&quot;|&lt;|&gt;|&#39;)[^\s\u0000])+/g, (url) => {
      let tail = "";
      const m = url.match(/[.,;:!?)\]]+$/);
      if (m) { tail = m[0]; url = url.slice(0, -tail.length); }
      return keep('<a href="' + url + '" target="_blank" rel="noopener noreferrer">' + url + "</a>") + tail;
    });
    s = emphasis(s);
    // restore fragments (a link label may hold code spans, so repeat until none is left)
    for (let i = 0; i < 4 && s.indexOf(PH) >= 0; i++) {
      s = s.replace(/\u0000(\d+)\u0000/g, (m, n) => store[+n]);
    }
    return s;
  }

  function emphasis(s) {
    return s
      .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
      .replace(/(^|[^*\w])\*(?=[^\s*])([^*]*?[^\s*])\*(?!\*)/g, "$1<em>$2</em>")
      .replace(/(^|[^\w])_(?=[^\s_])([^_]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>")
      .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>");
  }

  const RE = {
    fence: /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)[^`]*$/,
    heading: /^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/,
    hr: /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/,
    quote: /^ {0,3}&gt;\s?(.*)$/,
    item: /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/,
    tableSep: /^\s*\|?\s*:?-{1,}:?\s*(\|\s*:?-{1,}:?\s*)*\|?\s*$/,
  };

  function indentOf(line) {
    return line.match(/^\s*/)[0].replace(/\t/g, "    ").length;
  }

  function splitRow(line) {
    let s = line.trim();
    if (s.startsWith("|")) s = s.slice(1);
    if (s.endsWith("|")) s = s.slice(0, -1);
    return s.split("|").map((c) => c.trim());
  }

  function startsBlock(line, next) {
    return RE.fence.test(line) || RE.heading.test(line) || RE.hr.test(line) || RE.quote.test(line) ||
      RE.item.test(line) || (line.includes("|") && next !== undefined && RE.tableSep.test(next) && next.includes("-"));
  }

  // Blocks over already-escaped lines; returns HTML.
  function renderBlocks(lines) {
    const out = [];
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (!line.trim()) { i++; continue; }

      if ((m = line.match(RE.fence))) {                     // fenced code (an unclosed fence runs to the end)
        const fence = m[1], lang = m[2];
        const body = [];
        i++;
        while (i < lines.length && !(lines[i].trim().startsWith(fence[0].repeat(fence.length)) &&
                                     /^\s*[`~]+\s*$/.test(lines[i]))) {
          body.push(lines[i]); i++;
        }
        i++;                                                // the closing fence
        const head = lang ? '<div class="code-lang">' + lang + "</div>" : "";
        out.push('<div class="code-block">' + head + "<pre><code" +
                 (lang ? ' class="language-' + lang + '"' : "") + ">" + body.join("\n") + "</code></pre></div>");
        continue;
      }
      if ((m = line.match(RE.heading))) {
        const level = m[1].length;
        out.push("<h" + level + ">" + renderInline(m[2]) + "</h" + level + ">");
        i++; continue;
      }
      if (RE.hr.test(line)) { out.push("<hr>"); i++; continue; }
      if (RE.quote.test(line)) {
        const inner = [];
        while (i < lines.length && (m = lines[i].match(RE.quote))) { inner.push(m[1]); i++; }
        out.push("<blockquote>" + renderBlocks(inner) + "</blockquote>");
        continue;
      }
      if (line.includes("|") && i + 1 < lines.length && RE.tableSep.test(lines[i + 1]) && lines[i + 1].includes("-")) {
        const head = splitRow(line);
        const aligns = splitRow(lines[i + 1]).map((c) => {
          const left = c.startsWith(":"), right = c.endsWith(":");
          return left && right ? "center" : right ? "right" : left ? "left" : "";
        });
        const cell = (tag, text, k) => "<" + tag + (aligns[k] ? ' class="align-' + aligns[k] + '"' : "") + ">" +
          renderInline(text) + "</" + tag + ">";
        let html = "<div class=\"table-wrap\"><table><thead><tr>" + head.map((c, k) => cell("th", c, k)).join("") +
          "</tr></thead><tbody>";
        i += 2;
        while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
          const cells = splitRow(lines[i]);
          html += "<tr>" + head.map((_, k) => cell("td", cells[k] || "", k)).join("") + "</tr>";
          i++;
        }
        out.push(html + "</tbody></table></div>");
        continue;
      }
      if ((m = line.match(RE.item))) {
        const base = indentOf(line);
        const ordered = /\d/.test(m[2]);
        const items = [];
        while (i < lines.length) {
          const l = lines[i];
          const im = l.match(RE.item);
          if (im && indentOf(l) === base && /\d/.test(im[2]) === ordered) {
            items.push({ first: im[3], rest: [], start: parseInt(im[2], 10) });
            i++; continue;
          }
          if (!l.trim()) {                                   // a blank line ends the list unless it continues
            const nxt = lines[i + 1];
            if (nxt !== undefined && nxt.trim() &&
                (indentOf(nxt) > base || (RE.item.test(nxt) && indentOf(nxt) === base))) {
              items[items.length - 1].rest.push("");
              i++;
              continue;
            }
            break;
          }
          if (indentOf(l) > base) { items[items.length - 1].rest.push(l); i++; continue; }
          if (im) break;                                     // a list of the other kind, or shallower
          if (startsBlock(l, lines[i + 1])) break;
          items[items.length - 1].rest.push(l);              // lazy continuation of the item's paragraph
          i++;
        }
        const tag = ordered ? "ol" : "ul";
        const start = ordered && items[0].start !== 1 ? ' start="' + items[0].start + '"' : "";
        out.push("<" + tag + start + ">" + items.map((it) => {
          const rest = it.rest;
          const cut = rest.findIndex((l) => !l.trim() || RE.item.test(l) || RE.fence.test(l));
          const para = [it.first].concat(cut < 0 ? rest : rest.slice(0, cut)).map((l) => l.trim());
          const sub = cut < 0 ? [] : rest.slice(cut);
          const pad = Math.min(...sub.filter((l) => l.trim()).map(indentOf), Infinity);
          const dedent = new RegExp("^\\s{0," + pad + "}");
          const subHtml = sub.length ? renderBlocks(sub.map((l) => l.replace(dedent, ""))) : "";
          return "<li>" + renderInline(para.join("\n")).replace(/\n/g, "<br>") + subHtml + "</li>";
        }).join("") + "</" + tag + ">");
        continue;
      }
      const para = [];                                      // a paragraph: up to a blank line or another block
      while (i < lines.length && lines[i].trim() && !(para.length && startsBlock(lines[i], lines[i + 1]))) {
        para.push(lines[i].trim()); i++;
      }
      out.push("<p>" + renderInline(para.join("\n")).replace(/\n/g, "<br>") + "</p>");
    }
    return out.join("");
  }

  function renderMarkdown(text) {
    const safe = escapeHtml(String(text == null ? "" : text).replace(/\u0000/g, "\uFFFD").replace(/\r\n?/g, "\n"));
    return renderBlocks(safe.split("\n"));
  }

  // ------------------------------------------------------------------ 2. server-sent events

  /** Feed decoded text; returns the payloads of complete `data:` lines ([DONE] included) and keeps the rest. */
  function makeSSEParser() {
    let buf = "";
    return function feed(text, final) {
      buf += text;
      const lines = buf.split(/\r\n|\r|\n/);
      buf = final ? "" : lines.pop();
      const out = [];
      for (const line of lines) {
        if (line.startsWith("data:")) out.push(line.slice(5).replace(/^ /, ""));
      }
      return out;
    };
  }

  // ------------------------------------------------------------------ 3. the chat

  const $ = (id) => document.getElementById(id);
  const el = {
    chat: $("chat"), messages: $("messages"), empty: $("empty"), banner: $("banner"),
    composer: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
    newChat: $("new-chat"), settingsToggle: $("settings-toggle"), settings: $("settings"),
    temperature: $("temperature"), temperatureValue: $("temperature-value"),
    topP: $("top-p"), topPValue: $("top-p-value"), maxTokens: $("max-tokens"),
    status: $("sr-status"), apiKey: $("api-key"), apiKeyField: $("api-key-field"), modelName: $("model-name"),
  };

  const state = {
    turns: [],           // {role: "user"|"assistant", content, reasoning?, node?}
    model: null,
    controller: null,    // AbortController of the stream in flight
  };

  const store = {
    get(key, fallback) {
      try { const v = window.localStorage.getItem("nanoseek." + key); return v === null ? fallback : v; }
      catch (e) { return fallback; }
    },
    set(key, value) { try { window.localStorage.setItem("nanoseek." + key, value); } catch (e) { /* private mode */ } },
    getKey() { try { return window.sessionStorage.getItem("nanoseek.api_key") || ""; } catch (e) { return ""; } },
    setKey(v) { try { window.sessionStorage.setItem("nanoseek.api_key", v); } catch (e) { /* ignore */ } },
  };

  function settings() {
    const num = (v, d) => (Number.isFinite(parseFloat(v)) ? parseFloat(v) : d);
    const out = { temperature: num(el.temperature.value, 0.6), top_p: num(el.topP.value, 0.95) };
    const max = parseInt(el.maxTokens.value, 10);
    if (max > 0) out.max_tokens = max;                    // empty: the server allows up to the context length
    return out;
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = el.apiKey.value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  function showBanner(message, kind) {
    el.banner.textContent = message;
    el.banner.className = "banner " + (kind || "error");
    el.banner.hidden = !message;
  }

  function openSettings(open) {
    el.settings.hidden = !open;
    el.settingsToggle.setAttribute("aria-expanded", String(open));
  }

  function needKey(message) {
    openSettings(true);
    el.apiKeyField.classList.add("attention");
    el.apiKey.focus();
    showBanner(message || "This server needs an API key: enter it under Settings, then send again.");
  }

  // Error text from a failed response: OpenAI's {"error": {"message"}}, FastAPI's {"detail"}, or the status.
  async function errorMessage(res) {
    let text = "";
    try { text = await res.text(); } catch (e) { /* ignore */ }
    try {
      const body = JSON.parse(text);
      if (body && body.error) return errorText(body.error);
      if (body && body.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch (e) { /* not JSON */ }
    return "HTTP " + res.status + (res.statusText ? " " + res.statusText : "") +
      (text ? ": " + text.slice(0, 300) : "");
  }

  function errorText(error) {
    return typeof error === "string" ? error : error.message || JSON.stringify(error);
  }

  async function loadModel() {
    try {
      const res = await fetch("v1/models", { headers: headers() });
      if (res.status === 401) { el.modelName.textContent = "API key needed"; needKey(); return; }
      if (!res.ok) {
        el.modelName.textContent = "no model";
        showBanner("Could not list models: " + (await errorMessage(res)));
        return;
      }
      const body = await res.json();
      const card = body && body.data && body.data[0];
      state.model = card ? card.id : null;
      el.modelName.textContent = state.model || "no model";
      el.modelName.title = card && card.max_model_len ? "context: " + card.max_model_len + " tokens" : "";
      if (card && card.max_model_len > 1) {
        el.maxTokens.max = String(card.max_model_len - 1);
        // a small model's context may be shorter than the default: start at half of it (the prompt needs room)
        if (store.get("max_tokens", null) === null && parseInt(el.maxTokens.value, 10) >= card.max_model_len) {
          el.maxTokens.value = String(Math.floor(card.max_model_len / 2));
        }
      }
      if (el.banner.className.includes("error") && /API key/.test(el.banner.textContent)) showBanner("");
    } catch (e) {
      el.modelName.textContent = "offline";
      showBanner("Cannot reach the server: " + e.message);
    }
  }

  // ----- rendering

  // Follow the stream only while the reader is at the bottom; scrolling up to read stops the follow.
  function scrollPinned() {
    const c = el.chat;
    return c.scrollHeight - c.scrollTop - c.clientHeight < 120;
  }
  function scrollToEnd() { el.chat.scrollTop = el.chat.scrollHeight; }

  function node(tag, cls, text) {
    const n = document.createElement(tag);
    if (cls) n.className = cls;
    if (text !== undefined) n.textContent = text;
    return n;
  }

  function updateEmpty() { el.empty.hidden = state.turns.length > 0; }

  function renderUser(turn) {
    const li = node("li", "msg user");
    li.appendChild(node("div", "who visually-hidden", "You"));
    li.appendChild(node("div", "bubble", turn.content));    // textContent: user text is never HTML
    el.messages.appendChild(li);
    turn.node = li;
    return li;
  }

  /** The DOM for one assistant turn; update() re-renders from turn.{reasoning, content, ...}. */
  function renderAssistant(turn) {
    const li = node("li", "msg assistant");
    li.appendChild(node("div", "who visually-hidden", "nanoseek"));
    const think = node("details", "thinking");
    think.hidden = true;
    const summary = node("summary");
    const title = node("span", "think-title", "Thinking");
    const meta = node("span", "think-meta");
    summary.append(node("span", "think-dot"), title, meta);
    const thinkBody = node("div", "think-body");
    think.append(summary, thinkBody);
    const answer = node("div", "answer markdown");
    const foot = node("div", "msg-foot");
    li.append(think, answer, foot);
    el.messages.appendChild(li);
    turn.node = li;
    turn.update = function () {
      const reasoning = turn.reasoning || "";
      if (reasoning || turn.thinking) {
        think.hidden = false;
        thinkBody.textContent = reasoning;                    // reasoning is shown as plain text
        const secs = ((turn.thinkEnd || performance.now()) - turn.started) / 1000;
        const tokens = turn.reasoningTokens || turn.reasoningChunks || 0;
        title.textContent = turn.thinking ? "Thinking\u2026" : "Thinking";
        meta.textContent = (turn.started ? secs.toFixed(1) + " s" : "") +
          (tokens ? " \u00b7 " + tokens + " token" + (tokens === 1 ? "" : "s") : "");
        think.classList.toggle("live", !!turn.thinking);
      }
      answer.innerHTML = renderMarkdown(turn.content || "");
      li.classList.toggle("streaming", !!turn.streaming);
      li.setAttribute("aria-busy", String(!!turn.streaming));
      foot.textContent = "";
      if (turn.error) {
        const err = node("div", "error", turn.error);
        err.setAttribute("role", "alert");
        foot.appendChild(err);
      }
      if (turn.stats) foot.appendChild(node("span", "stats", turn.stats));
    };
    turn.update();
    return li;
  }

  function render(turn) {
    updateEmpty();
    return turn.role === "user" ? renderUser(turn) : renderAssistant(turn);
  }

  // ----- sending

  function announce(text) { el.status.textContent = text; }

  function setBusy(busy) {
    el.send.hidden = busy;
    el.stop.hidden = !busy;
    if (busy && document.activeElement === el.send) el.stop.focus({ preventScroll: true });
    if (!busy && document.activeElement === el.stop) el.prompt.focus({ preventScroll: true });
  }

  function history() {
    // R1 expects earlier answers without their reasoning: only `content` goes back, and an answer that came
    // back empty (stopped while thinking) is left out with its question.
    const msgs = [];
    for (let k = 0; k < state.turns.length; k++) {
      const t = state.turns[k];
      if (t.role === "user") {
        const reply = state.turns[k + 1];
        if (reply && reply.role === "assistant" && !reply.content && !reply.streaming) { k++; continue; }
        msgs.push({ role: "user", content: t.content });
      } else if (!t.streaming) {
        msgs.push({ role: "assistant", content: t.content || "" });
      }
    }
    return msgs;
  }

  async function send(text) {
    if (state.controller) return;
    showBanner("");
    el.apiKeyField.classList.remove("attention");
    const user = { role: "user", content: text };
    state.turns.push(user);
    render(user);
    const messages = history();
    const turn = { role: "assistant", content: "", reasoning: "", streaming: true, thinking: false,
                   reasoningChunks: 0, started: performance.now() };
    state.turns.push(turn);
    render(turn);
    scrollToEnd();

    announce("nanoseek is thinking");
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    const tick = setInterval(() => { if (turn.thinking) turn.update(); }, 100);
    let frame = 0;
    const redraw = () => {
      if (frame) return;
      frame = requestAnimationFrame(() => {
        frame = 0;
        const pinned = scrollPinned();
        turn.update();
        if (pinned) scrollToEnd();
      });
    };
    let finish = null, usage = null, firstToken = 0, sawReasoningField = false, raw = "";
    const body = Object.assign({ messages, stream: true, stream_options: { include_usage: true } }, settings());
    if (state.model) body.model = state.model;
    try {
      const res = await fetch("v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
      });
      if (!res.ok) {
        const msg = await errorMessage(res);
        if (res.status === 401) needKey();
        throw new Error(msg);
      }
      if (!res.body) throw new Error("this browser cannot read streamed responses");
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      const parse = makeSSEParser();
      let done = false;
      while (!done) {
        const chunk = await reader.read();
        const text = chunk.done ? decoder.decode() : decoder.decode(chunk.value, { stream: true });
        const payloads = parse(text, chunk.done);
        for (const data of payloads) {
          if (data === "[DONE]") { done = true; break; }
          let obj;
          try { obj = JSON.parse(data); } catch (e) { continue; }
          if (obj.error) throw new Error(errorText(obj.error));   // an error event in the stream
          if (obj.usage) usage = obj.usage;
          const choice = obj.choices && obj.choices[0];
          if (!choice) continue;
          const delta = choice.delta || {};
          const r = delta.reasoning_content != null ? delta.reasoning_content : delta.reasoning;
          if (r) {
            sawReasoningField = true;
            if (!turn.reasoning) turn.thinking = true;
            turn.reasoning += r;
            turn.reasoningChunks += 1;
          }
          if (delta.content) {
            if (!firstToken) firstToken = performance.now();
            if (sawReasoningField) {
              turn.content += delta.content;
            } else {
              // a server that does not split reasoning: split `<think>...</think>` here
              raw += delta.content;
              splitThink(turn, raw);
            }
            if (turn.thinking && turn.content.trim()) { turn.thinking = false; turn.thinkEnd = performance.now(); }
          }
          if (r && !firstToken) firstToken = performance.now();
          if (choice.finish_reason) finish = choice.finish_reason;
          redraw();
        }
        if (chunk.done) break;
      }
      reader.cancel().catch(() => {});                      // after [DONE]: nothing more is read
    } catch (e) {
      if (e.name === "AbortError") turn.stopped = true;
      else if (e instanceof TypeError) turn.error = "Network error: cannot reach the server (" + e.message + ")";
      else turn.error = e.message || String(e);
    } finally {
      clearInterval(tick);
      if (frame) cancelAnimationFrame(frame);
      state.controller = null;
      turn.streaming = false;
      if (turn.thinking || !turn.thinkEnd) turn.thinkEnd = performance.now();
      turn.thinking = false;
      if (usage && usage.completion_tokens_details && usage.completion_tokens_details.reasoning_tokens) {
        turn.reasoningTokens = usage.completion_tokens_details.reasoning_tokens;
      }
      turn.stats = stats(turn, usage, finish, firstToken);
      turn.update();
      setBusy(false);
      if (scrollPinned()) scrollToEnd();
      announce(turn.error ? "Error: " + turn.error : turn.stopped ? "Stopped." : "Answer ready.");
    }
  }

  function splitThink(turn, raw) {
    const s = raw.replace(/^\s+/, "");
    if (!s.startsWith("<think>")) {
      if ("<think>".startsWith(s)) return;                   // maybe the start of the tag: wait
      turn.content = raw;
      return;
    }
    const end = s.indexOf("</think>");
    const before = turn.reasoning.length;
    turn.reasoning = (end < 0 ? s.slice(7) : s.slice(7, end)).replace(/^\n/, "");
    turn.content = end < 0 ? "" : s.slice(end + 8).replace(/^\s+/, "");
    if (turn.reasoning.length > before) turn.reasoningChunks += 1;
    turn.thinking = end < 0;
    if (end >= 0 && !turn.thinkEnd) turn.thinkEnd = performance.now();
  }

  function stats(turn, usage, finish, firstToken) {
    const parts = [];
    if (turn.stopped) parts.push("stopped");
    else if (finish === "length") parts.push("hit max tokens");
    if (usage && usage.completion_tokens) {
      parts.push(usage.completion_tokens + " tokens");
      const secs = (performance.now() - (firstToken || turn.started)) / 1000;
      if (secs > 0.05 && usage.completion_tokens > 1) {
        parts.push((usage.completion_tokens / secs).toFixed(1) + " tok/s");
      }
    }
    return parts.join(" \u00b7 ");
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  function newChat() {
    stop();
    state.turns = [];
    el.messages.textContent = "";
    showBanner("");
    updateEmpty();
    el.prompt.value = "";
    autosize();
    el.prompt.focus();
  }

  // ----- wiring

  function autosize() {
    el.prompt.style.height = "auto";
    el.prompt.style.height = Math.min(el.prompt.scrollHeight, 240) + "px";
  }

  function submit() {
    const text = el.prompt.value;
    if (!text.trim() || state.controller) return;
    el.prompt.value = "";
    autosize();
    send(text);
  }

  function syncOutputs() {
    el.temperatureValue.textContent = parseFloat(el.temperature.value).toFixed(2);
    el.topPValue.textContent = parseFloat(el.topP.value).toFixed(2);
  }

  function init() {
    el.temperature.value = store.get("temperature", el.temperature.value);
    el.topP.value = store.get("top_p", el.topP.value);
    el.maxTokens.value = store.get("max_tokens", el.maxTokens.value);
    el.apiKey.value = store.getKey();
    syncOutputs();
    el.temperature.addEventListener("input", () => { syncOutputs(); store.set("temperature", el.temperature.value); });
    el.topP.addEventListener("input", () => { syncOutputs(); store.set("top_p", el.topP.value); });
    el.maxTokens.addEventListener("change", () => store.set("max_tokens", el.maxTokens.value));
    el.apiKey.addEventListener("change", () => {
      store.setKey(el.apiKey.value.trim());
      el.apiKeyField.classList.remove("attention");
      loadModel();
    });
    document.getElementById("settings-form").addEventListener("submit", (e) => e.preventDefault());
    el.settingsToggle.addEventListener("click", () => openSettings(el.settings.hidden));
    el.newChat.addEventListener("click", newChat);
    el.stop.addEventListener("click", stop);
    el.composer.addEventListener("submit", (e) => { e.preventDefault(); submit(); });
    el.prompt.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) { e.preventDefault(); submit(); }
    });
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape" && state.controller) { e.preventDefault(); stop(); }
    });
    el.prompt.addEventListener("input", autosize);
    updateEmpty();
    loadModel();
    el.prompt.focus();
  }

  window.nanoseek = {
    escapeHtml, renderMarkdown, makeSSEParser,
    /** Show a message without the server (tests, demos): {role, content, reasoning}. Returns its element. */
    appendMessage(msg) {
      const turn = Object.assign({ role: "assistant", content: "", reasoning: "" }, msg);
      state.turns.push(turn);
      const li = render(turn);
      return li;
    },
    state,
  };

  // Loaded without the page (the markdown tests): only the functions above are wanted.
  if (el.composer) {
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
    else init();
  }
})();
