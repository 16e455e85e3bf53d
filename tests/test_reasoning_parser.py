"""The <think> parser on its own: hand-written splits, every way of chunking a text gives the one-shot split, the
starting state read off the R1 template's prompt, and the reasoning token count."""
import itertools
from types import SimpleNamespace

import pytest

from nanoseek.chat import render_text
from nanoseek.inference.reasoning import ReasoningParser, count_reasoning_tokens, prompt_opens_reasoning, \
    split_reasoning

# (text, starts in reasoning, expected reasoning or None, expected content)
CASES = [
    ("Let me add.\n2+2=4\n</think>\n\nThe answer is 4.", True, "Let me add.\n2+2=4\n", "\n\nThe answer is 4."),
    ("<think>\nhmm</think>4", True, "\nhmm", "4"),                       # redundant opening tag is dropped
    ("  <think>hmm</think>4", False, "hmm", "4"),                        # the model opens the block itself
    ("<think>hmm</think>4", False, "hmm", "4"),
    ("still thinking, cut by max_tokens", True, "still thinking, cut by max_tokens", ""),
    ("", True, "", ""),
    ("plain answer", False, None, "plain answer"),
    ("a </think> without an opening", False, None, "a </think> without an opening"),
    ("answer then <think>x</think>", False, None, "answer then <think>x</think>"),
    ("x</think>y</think>z", True, "x", "y</think>z"),                   # only the first block is reasoning
    ("ends in a partial </thi", True, "ends in a partial </thi", ""),
    ("<thi", False, None, "<thi"),
    ("a < b and c </ d", True, "a < b and c </ d", ""),
    ("\n\n", False, None, "\n\n"),
    ("r</think>", True, "r", ""),
]


@pytest.mark.parametrize("text, thinking, reasoning, content", CASES)
def test_one_shot_split(text, thinking, reasoning, content):
    assert split_reasoning(text, thinking) == (reasoning, content)


def chunkings(text: str):
    """Every split into 1, 2 or 3 pieces, and one character at a time."""
    yield [text]
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    for i, j in itertools.combinations(range(len(text) + 1), 2):
        yield [text[:i], text[i:j], text[j:]]
    yield list(text)


@pytest.mark.parametrize("text, thinking, reasoning, content", CASES)
def test_any_chunking_gives_the_same_split(text, thinking, reasoning, content):
    for pieces in chunkings(text):
        p = ReasoningParser(thinking)
        r_parts, c_parts, order = [], [], []
        for piece in [*pieces, None]:
            r, c = p.finish() if piece is None else p.feed(piece)
            r_parts.append(r)
            c_parts.append(c)
            order += ["r"] * bool(r) + ["c"] * bool(c)
        assert ("".join(r_parts) if p.saw_reasoning else None, "".join(c_parts)) == (reasoning, content), pieces
        # reasoning is never streamed after answer text
        assert order == sorted(order, key=lambda k: k == "c"), pieces
        assert p.reasoning_text == (reasoning or "")


def test_nothing_is_held_back_longer_than_a_possible_tag():
    p = ReasoningParser(True)
    assert p.feed("abc<") == ("abc", "")          # "<" may start </think>: held
    assert p.feed("b") == ("<b", "")              # it did not
    assert p.feed("x</think") == ("x", "")
    assert p.feed(">ans") == ("", "ans")
    assert p.reasoning_closed and not p.in_reasoning
    q = ReasoningParser(False)
    assert q.feed("\n") == ("", "")               # leading whitespace waits: an opening tag may follow
    assert q.feed("Hi") == ("", "\nHi")


def test_prompt_state_from_the_r1_template():
    tok = SimpleNamespace(chat_template=None, bos_token="<bos>", eos_token="<eos>", pad_token=None)
    first = render_text(tok, [{"role": "user", "content": "2+2?"}], add_generation_prompt=True)
    assert first.endswith("<think>\n") and prompt_opens_reasoning(first)
    later = render_text(tok, [{"role": "user", "content": "2+2?"},
                              {"role": "assistant", "content": "<think>add</think>4"},
                              {"role": "user", "content": "and 3+3?"}], add_generation_prompt=True)
    assert prompt_opens_reasoning(later)
    assert not prompt_opens_reasoning(render_text(tok, [{"role": "user", "content": "hi"}]))
    assert not prompt_opens_reasoning("<think>a</think> answer")


def test_reasoning_token_count():
    close = 9
    assert count_reasoning_tokens([5, 6, 9, 7, 8], True, True, close, "ab") == 3       # up to </think>
    assert count_reasoning_tokens([5, 6, 7], True, False, close, "abc") == 3           # never closed: all
    assert count_reasoning_tokens([5, 6, 7], False, False, close, None) == 0
    # no single </think> id: re-encode the reasoning text (+1 for the tag)
    assert count_reasoning_tokens([5, 6, 7, 8], True, True, None, "ab", encode=list) == 3
