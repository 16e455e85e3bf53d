"""Chat rendering: messages -> the DeepSeek-V3/R1 prompt text, token ids and a loss mask over assistant tokens.

The template is the checkpoint's own Jinja `chat_template` when it has one, else a copy of the published
DeepSeek-R1 template (`R1_CHAT_TEMPLATE`). Templates run in a sandboxed jinja2 environment set up like
transformers' `apply_chat_template` (trim_blocks, lstrip_blocks, `raise_exception`, `tojson`), so the text is the
same as transformers renders.

The loss mask is found without knowing the template: render the conversation up to each assistant message and
through it, and the characters in between are that turn; the part the turn shares with the generation prompt
(`<｜Assistant｜>`) is prompt, the rest (content + `<｜end▁of▁sentence｜>`) is what the model must generate.
Token offsets map those character spans to tokens.
"""
from __future__ import annotations

import json
from bisect import bisect_left
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING

from nanoseek.errors import DataError

if TYPE_CHECKING:
    from nanoseek.tokenizer import Tokenizer

# DeepSeek-R1's tokenizer_config.json chat_template (the revision whose generation prompt opens `<think>\n`).
# Earlier assistant turns keep only the text after `</think>`; the system prompt goes first, after BOS.
R1_CHAT_TEMPLATE = (
    r"{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    r"{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    r"{%- for message in messages %}{%- if message['role'] == 'system' %}"
    r"{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    r"{{bos_token}}{{ns.system_prompt}}"
    r"{%- for message in messages %}"
    r"{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}"
    r"{%- endif %}"
    r"{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    r"{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    r"{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    r"tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + "
    r"'<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}"
    r"{%- else %}{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + "
    r"'\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}"
    r"{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    r"{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    r"{%- set ns.is_tool = false -%}"
    r"{%- else %}{% set content = message['content'] %}"
    r"{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    r"{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    r"{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    r"{%- if ns.is_output_first %}"
    r"{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    r"{%- set ns.is_output_first = false %}"
    r"{%- else %}{{'\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}"
    r"{%- endif %}"
    r"{%- endfor -%}"
    r"{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    r"{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\n'}}{% endif %}"
)

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@lru_cache(maxsize=16)
def compile_template(source: str):
    """Compile a chat template in the sandbox transformers uses (templates from the Hub are untrusted code)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers overrides jinja's tojson, which would HTML-escape; keep the same output.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _check_messages(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError("a conversation must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise DataError(f"message {i} is not an object with a 'role' (got {str(m)[:60]!r})")
        if m.get("content") is not None and not isinstance(m["content"], str):
            raise DataError(f"message {i} ({m['role']}): 'content' must be a string")


def render_text(tokenizer: "Tokenizer", messages: list[dict], add_generation_prompt: bool = False,
                **template_kwargs) -> str:
    """The prompt text exactly as the template writes it (== transformers' apply_chat_template(tokenize=False))."""
    _check_messages(messages)
    return _render(tokenizer, messages, add_generation_prompt, **template_kwargs)


def _render(tokenizer: "Tokenizer", messages: list[dict], add_generation_prompt: bool, **template_kwargs) -> str:
    template = compile_template(tokenizer.chat_template or R1_CHAT_TEMPLATE)
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "",
                           pad_token=tokenizer.pad_token or "", unk_token=None, **template_kwargs)


def render(tokenizer: "Tokenizer", messages: list[dict], add_generation_prompt: bool = False,
           keep_final_reasoning: bool = False) -> tuple[list[int], list[int]]:
    """Render and tokenize a conversation -> (ids, loss_mask), loss_mask 1 exactly on assistant tokens.

    ids equal tokenizer.encode(render_text(...)). With keep_final_reasoning, a final assistant message holding
    `</think>` is written as the model produces it at inference: the prompt with the generation prompt
    (`<｜Assistant｜><think>\\n`), then reasoning + answer + EOS, all trained on. The R1 template alone would drop
    that reasoning, so SFT on R1-style traces (distillation) needs this.
    """
    _check_messages(messages)
    last = messages[-1]
    if (keep_final_reasoning and len(messages) > 1 and last.get("role") == "assistant"
            and isinstance(last.get("content"), str) and THINK_CLOSE in last["content"]):
        if tokenizer.eos_id is None:
            raise DataError("keep_final_reasoning needs a tokenizer with an EOS token")
        prompt_ids, prompt_mask = render(tokenizer, messages[:-1], add_generation_prompt=True)
        prompt_text = _render(tokenizer, messages[:-1], add_generation_prompt=True)
        completion = last["content"]
        if prompt_text.endswith(THINK_OPEN + "\n") and completion.startswith(THINK_OPEN):
            completion = completion[len(THINK_OPEN):].lstrip("\n")   # the prompt already opened the block
        # Tokenized apart from the prompt, as at inference, where generated ids follow the prompt's ids.
        completion_ids = tokenizer.encode(completion) + [tokenizer.eos_id]
        return prompt_ids + completion_ids, prompt_mask + [1] * len(completion_ids)

    text = _render(tokenizer, messages, add_generation_prompt)
    ids, offsets = tokenizer.encode_with_offsets(text)
    starts = [a for a, _ in offsets]   # non-decreasing, so each turn's tokens are one bisected range
    mask = [0] * len(ids)
    for turn_start, header_end, turn_end in _assistant_turns(tokenizer, messages, text):
        for t in range(bisect_left(starts, turn_start), bisect_left(starts, turn_end)):
            # A token is generated if it starts inside the turn and is not wholly inside the shared header.
            if offsets[t][1] > header_end:
                mask[t] = 1
    return ids, mask


def _assistant_turns(tokenizer: "Tokenizer", messages: list[dict], text: str) -> list[tuple[int, int, int]]:
    """(turn start, header end, turn end) character positions in `text` for each assistant message."""
    turns = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = _render(tokenizer, messages[:i], False)
        through = _render(tokenizer, messages[:i + 1], False)
        if not (text.startswith(through) and through.startswith(before)):
            # Templates that rewrite earlier text when a message is added (a system prompt given late, tool
            # outputs closing a block) cannot be split per turn; such data needs its own masking.
            raise DataError(f"chat template output is not prefix-stable at message {i} ({m['role']}); "
                            f"cannot locate the assistant tokens")
        # What the turn shares with the generation prompt (`<｜Assistant｜>`) is given at inference, not learned.
        header = _render(tokenizer, messages[:i], True)
        shared = len(before)
        while shared < len(through) and shared < len(header) and header[shared] == through[shared]:
            shared += 1
        turns.append((len(before), shared, len(through)))
    return turns
