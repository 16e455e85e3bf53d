"""Chat rendering against independent references: the DeepSeek-R1 template text as tokenizer_config.json holds
it (JSON-escaped, rendered with plain jinja2), transformers' apply_chat_template, and a hand-written expected
string; loss masks against ids built segment by segment."""
import json

import jinja2
import pytest

from nanoseek.chat import R1_CHAT_TEMPLATE, render, render_text
from nanoseek.data.pretrain import synthetic_corpus
from nanoseek.errors import DataError
from nanoseek.tokenizer import ASSISTANT, BOS, EOS, USER, Tokenizer, train_tokenizer

# "chat_template" from DeepSeek-R1's tokenizer_config.json, copied as the JSON string literal it is there.
R1_CONFIG_JSON = r'''{"chat_template": "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"}'''
R1_TEMPLATE = json.loads(R1_CONFIG_JSON)["chat_template"]

CONV = [
    {"role": "system", "content": "You are a careful assistant. Réponds brièvement."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "<think>\n12 + 30 = 42, check: 42 - 30 = 12.\n</think>\n\nIt is 42. 😀"},
    {"role": "user", "content": "And 你好 means?"},
    {"role": "assistant", "content": "<think>\nChinese greeting.\n</think>\n\nIt means hello."},
]
EXPECTED_TEXT = (f"{BOS}You are a careful assistant. Réponds brièvement.{USER}What is 12 + 30?{ASSISTANT}\n\n"
                 f"It is 42. 😀{EOS}{USER}And 你好 means?{ASSISTANT}\n\nIt means hello.{EOS}")
TOOL_CONV = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "21 degrees."},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    extra = [m["content"] for m in CONV] * 5
    t = train_tokenizer(texts=synthetic_corpus(800, seed=0) + extra, vocab_size=600, show_progress=False)
    out = t.save(tmp_path_factory.mktemp("tok"))
    return Tokenizer.from_dir(out)


def _plain_jinja(template, messages, add_generation_prompt):
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=BOS, eos_token=EOS)


def test_builtin_template_is_r1s():
    assert R1_CHAT_TEMPLATE == R1_TEMPLATE


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("conv", [CONV, CONV[:4], CONV[1:3], TOOL_CONV], ids=["full", "open", "nosys", "tool"])
def test_text_matches_jinja_reference(tok, conv, gen):
    assert render_text(tok, conv, add_generation_prompt=gen) == _plain_jinja(R1_TEMPLATE, conv, gen)


def test_text_matches_hand_written_r1_format(tok):
    assert render_text(tok, CONV) == EXPECTED_TEXT
    assert render_text(tok, CONV[:4], add_generation_prompt=True).endswith(f"{USER}And 你好 means?{ASSISTANT}<think>\n")


def test_ids_match_transformers_apply_chat_template(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(tok.save(tmp_path))
    # (Not TOOL_CONV: transformers drops `content: None` keys, which R1's template then fails on.)
    for conv, gen in [(CONV, False), (CONV[:4], True), (CONV[1:3], False)]:
        ref = hf.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True, return_dict=False)
        assert render(tok, conv, add_generation_prompt=gen)[0] == list(ref)


def test_loss_mask_is_exactly_the_assistant_tokens(tok):
    # Reference built by hand: segments split at special tokens (where tokenization restarts), each with a flag.
    segments = [(BOS, 0), ("You are a careful assistant. Réponds brièvement.", 0), (USER, 0),
                ("What is 12 + 30?", 0), (ASSISTANT, 0), ("\n\nIt is 42. 😀", 1), (EOS, 1), (USER, 0),
                ("And 你好 means?", 0), (ASSISTANT, 0), ("\n\nIt means hello.", 1), (EOS, 1)]
    want_ids, want_mask = [], []
    for text, flag in segments:
        ids = tok.encode(text)
        want_ids += ids
        want_mask += [flag] * len(ids)
    ids, mask = render(tok, CONV)
    assert ids == want_ids
    assert mask == want_mask
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == f"\n\nIt is 42. 😀{EOS}\n\nIt means hello.{EOS}"


def test_loss_mask_with_tools_and_generation_prompt(tok):
    ids, mask = render(tok, TOOL_CONV)
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    # The tool-call turn is generated; the tool output is not; the last turn follows `<｜tool▁outputs▁end｜>`.
    assert learned.startswith("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather")
    assert '{"temp": 21}' not in learned and learned.endswith(f"21 degrees.{EOS}")
    ids, mask = render(tok, CONV[:4], add_generation_prompt=True)
    assert ids[-3:] == tok.encode(f"{ASSISTANT}<think>\n") and mask[-3:] == [0, 0, 0]


def test_keep_final_reasoning_trains_on_the_trace(tok):
    ids, mask = render(tok, CONV, keep_final_reasoning=True)
    prompt_ids, prompt_mask = render(tok, CONV[:4], add_generation_prompt=True)
    completion = tok.encode("Chinese greeting.\n</think>\n\nIt means hello.") + [tok.eos_id]
    assert ids == prompt_ids + completion
    assert mask == prompt_mask + [1] * len(completion)
    assert render(tok, CONV[:3], keep_final_reasoning=True) != render(tok, CONV[:3])


def test_checkpoint_template_is_used_and_masked_generically(tok):
    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    other = Tokenizer(tok.tok, chat_template=chatml)
    conv = CONV[1:3]
    text = render_text(other, conv)
    assert text == _plain_jinja(chatml, conv, False)
    ids, mask = render(other, conv)
    learned = other.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "<think>\n12 + 30 = 42, check: 42 - 30 = 12.\n</think>\n\nIt is 42. 😀<|im_end|>\n"


def test_template_errors_and_sandbox(tok):
    strict = Tokenizer(tok.tok, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        render_text(strict, CONV)
    escape = Tokenizer(tok.tok, chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_text(escape, CONV)
    unstable = Tokenizer(tok.tok, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}"
                                                "{{ messages | length }}")
    with pytest.raises(DataError, match="not prefix-stable"):
        render(unstable, CONV)
    with pytest.raises(DataError):
        render(tok, [])
