"""Split R1-style output into reasoning and answer, incrementally: `<think> reasoning </think> answer`.

DeepSeek-R1's chat template ends the prompt with `<｜Assistant｜><think>\\n`, so the model's own output usually
has no opening tag: it starts inside the reasoning and only writes `</think>`. Older templates leave `<think>`
to the model. The prompt therefore decides the starting state (`prompt_opens_reasoning`), and the parser
accepts an opening tag at the very start of the output in either state.

The parser is a small state machine fed text deltas as the engine emits them. A tag may arrive split across
deltas (`</thi` + `nk>`), so text that could be the start of a tag is held back until the next delta decides
it. Feeding the whole text at once gives exactly the same split as feeding it piece by piece, so streaming and
non-streaming responses agree. Only the first reasoning block is recognized: tags after `</think>` (or a
`</think>` that was never opened) are ordinary answer text.
"""
from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# states
_PRE = "pre"              # answer mode, nothing but whitespace seen yet: an opening tag may still come
_LEAD = "lead"            # reasoning mode, nothing but whitespace seen yet: a redundant opening tag is dropped
_REASONING = "reasoning"
_CONTENT = "content"


def prompt_opens_reasoning(prompt_text: str) -> bool:
    """True when the prompt ends inside an open `<think>` block (R1's template writes it for the model)."""
    return prompt_text.rfind(THINK_OPEN) > prompt_text.rfind(THINK_CLOSE)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag (held back: the tag may follow)."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningParser:
    """feed(delta) -> (reasoning_delta, content_delta); finish() flushes what was held back."""

    def __init__(self, in_reasoning: bool):
        self.state = _LEAD if in_reasoning else _PRE
        self.buf = ""                 # text held back: leading whitespace or a possible partial tag
        self.saw_reasoning = in_reasoning
        self.reasoning_closed = False
        self.reasoning_text = ""      # all reasoning emitted so far (for token counts without a </think> id)

    def feed(self, delta: str) -> tuple[str, str]:
        self.buf += delta
        reasoning, content = [], []
        while self.buf:
            if self.state in (_PRE, _LEAD):
                head = self.buf.lstrip()
                if head.startswith(THINK_OPEN):            # the opening tag (and whitespace before it) is markup
                    self.buf = head[len(THINK_OPEN):]
                    self.state, self.saw_reasoning = _REASONING, True
                    continue
                if THINK_OPEN.startswith(head):            # only whitespace or a partial "<thi": wait
                    break
                self.state = _REASONING if self.state == _LEAD else _CONTENT
                continue
            if self.state == _REASONING:
                i = self.buf.find(THINK_CLOSE)
                if i >= 0:
                    reasoning.append(self.buf[:i])
                    self.buf = self.buf[i + len(THINK_CLOSE):]
                    self.state, self.reasoning_closed = _CONTENT, True
                    continue
                keep = _partial_suffix(self.buf, THINK_CLOSE)
                reasoning.append(self.buf[:len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                break
            content.append(self.buf)                       # _CONTENT: everything is answer text
            self.buf = ""
        self.reasoning_text += "".join(reasoning)
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """End of output: held-back text belongs to the section it was in."""
        held, self.buf = self.buf, ""
        if self.state in (_LEAD, _REASONING):
            self.reasoning_text += held
            return held, ""
        return "", held

    @property
    def in_reasoning(self) -> bool:
        return self.state in (_LEAD, _REASONING)


def split_reasoning(text: str, in_reasoning: bool) -> tuple[str | None, str]:
    """Whole-text split -> (reasoning or None when the output had no reasoning section, content)."""
    p = ReasoningParser(in_reasoning)
    r1, c1 = p.feed(text)
    r2, c2 = p.finish()
    return (r1 + r2 if p.saw_reasoning else None), c1 + c2


def count_reasoning_tokens(token_ids: list[int], saw_reasoning: bool, closed: bool, close_id: int | None,
                           reasoning_text: str | None, encode=None) -> int:
    """Completion tokens spent reasoning (usage.completion_tokens_details.reasoning_tokens), `</think>` included.

    R1's vocabulary has `</think>` as one token, so the count is exact: the tokens up to it (all of them when
    the block never closed). Without such a token, re-encode the reasoning text (an estimate).
    """
    if not saw_reasoning:
        return 0
    if not closed:
        return len(token_ids)
    if close_id is not None and close_id in token_ids:
        return token_ids.index(close_id) + 1
    return len(encode(reasoning_text or "")) + 1 if encode is not None else 0
