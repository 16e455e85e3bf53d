"""`nanoseek chat PATH`: an interactive terminal chat that streams tokens as they are generated.

R1-style models think first: the chat template's generation prompt opens `<think>`, so the reply starts inside the
reasoning. `ThinkSplitter` routes the stream into the reasoning part (shown dimmed, under its own header) and the
answer, handling a `</think>` tag that arrives split across deltas. Commands: /reset (clear history), /exit.
"""
from __future__ import annotations

import argparse
import sys

from nanoseek.inference.cli_generate import add_engine_arguments, add_sampling_arguments, build_llm, sampling_params

HELP = "chat with a checkpoint in the terminal (streaming, the <think> part shown dimmed)"
OPEN, CLOSE = "<think>", "</think>"
DIM, RESET = "\033[2m", "\033[0m"


class ThinkSplitter:
    """feed(delta) -> [(part, text)], part "think" or "answer"; text that may be the start of a tag is held back."""

    def __init__(self, thinking: bool):
        self.part = "think" if thinking else "answer"
        self.buf = ""

    def feed(self, delta: str) -> list[tuple[str, str]]:
        self.buf += delta
        out = []
        while True:
            tag = CLOSE if self.part == "think" else OPEN
            i = self.buf.find(tag)
            if i == -1:
                break
            if self.buf[:i]:
                out.append((self.part, self.buf[:i]))
            self.buf = self.buf[i + len(tag):]
            self.part = "answer" if self.part == "think" else "think"
        tag = CLOSE if self.part == "think" else OPEN
        keep = next((n for n in range(min(len(tag) - 1, len(self.buf)), 0, -1) if tag.startswith(self.buf[-n:])), 0)
        text, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        if text:
            out.append((self.part, text))
        return out

    def flush(self) -> list[tuple[str, str]]:
        text, self.buf = self.buf, ""
        return [(self.part, text)] if text else []


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint directory with tokenizer.json")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--no-color", action="store_true", help="no ANSI styling (the default when not a terminal)")
    add_sampling_arguments(p, max_tokens=1024)
    add_engine_arguments(p)


def run(args: argparse.Namespace) -> int:
    from nanoseek.inference import RequestError

    llm = build_llm(args)
    if llm.tokenizer is None:
        raise RequestError(f"{args.path} has no tokenizer.json; chat needs one (see `nanoseek tokenizer train`)")
    params = sampling_params(args)
    color = sys.stdout.isatty() and not args.no_color
    dim, reset = (DIM, RESET) if color else ("", "")
    history = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(history)
    print("nanoseek chat: type a message; /reset clears the conversation, /exit quits.", file=sys.stderr)
    while True:
        try:
            user = input("\n>>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if user.strip() in ("/exit", "/quit"):
            return 0
        if user.strip() == "/reset":
            messages = list(history)
            continue
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        ids = llm.render_chat(messages)
        prompt_text = llm.tokenizer.decode(ids[-4:])
        splitter = ThinkSplitter(thinking=prompt_text.rstrip().endswith(OPEN))
        reply, shown = "", None

        def show(parts):
            nonlocal shown
            for part, text in parts:
                if part != shown:
                    print(f"{dim}[thinking]\n" if part == "think" else f"{reset}\n[answer]\n", end="")
                    shown = part
                print(text, end="", flush=True)

        if splitter.part == "think":
            show([("think", "")])                       # the header at once: the model is thinking
        for out in llm.stream(ids, params):
            delta = out.outputs[0].delta_text
            reply += delta
            show(splitter.feed(delta))
        show(splitter.flush())
        print(reset, flush=True)
        messages.append({"role": "assistant", "content": reply})
