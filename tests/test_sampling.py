"""Sampling: processed distributions against hand-computed ones (temperature, top-k, top-p, min-p, penalties), the
inverse-CDF draw against its distribution (engine-seeded and per-request-seeded rows), per-request seeds independent of the batch, stop strings and stop
ids with a real tokenizer, streaming deltas, and SamplingParams validation."""
import math

import pytest
import torch

import nanoseek
from nanoseek.inference import EngineConfig, LLMEngine, RequestError, SamplingParams
from nanoseek.inference.sampler import Row, Sampler
from nanoseek.inference.sequence import Request, Sequence
from nanoseek.tokenizer import train_tokenizer
from models import tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model()          # peaked logits: no fp32 near-ties in greedy comparisons


@pytest.fixture(scope="module")
def tokenizer():
    words = ["alpha", "beta", "gamma", "delta", "stop", "here", "the", "cat", "sat", "on", "mat", "42", "7"]
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=g).tolist())
             for _ in range(400)]
    return train_tokenizer(texts=texts, vocab_size=512, show_progress=False)


def row(params, prompt=(1, 2, 3), output=()):
    req = Request("r", None, list(prompt), params)
    return Row(Sequence(0, req, 0, list(prompt) + list(output)))


def test_processed_distribution_matches_hand_computation():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    sampler = Sampler(set(), "cpu")

    def expect(keep, temp):
        z = torch.tensor([math.exp(v / temp) if i in keep else 0.0 for i, v in enumerate(logits[0].tolist())])
        return z / z.sum()

    p = sampler.probs(logits, [row(SamplingParams(temperature=0.5, top_k=3))])[0]
    torch.testing.assert_close(p, expect({0, 1, 2}, 0.5))
    # temperature 1: probs 0.574, 0.211, 0.128, 0.078, ...: the mass before token 2 is 0.785 < 0.8, before 3 0.913
    p = sampler.probs(logits, [row(SamplingParams(temperature=1.0, top_p=0.8))])[0]
    torch.testing.assert_close(p, expect({0, 1, 2}, 1.0))
    # min_p 0.3: keep tokens with p >= 0.3 * p_max, i.e. logit >= 2 + ln 0.3 = 0.796
    p = sampler.probs(logits, [row(SamplingParams(temperature=1.0, min_p=0.3))])[0]
    torch.testing.assert_close(p, expect({0, 1}, 1.0))
    p = sampler.probs(logits, [row(SamplingParams(temperature=0.0))])[0]
    assert p.tolist() == [1, 0, 0, 0, 0, 0]


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    sampler = Sampler(set(), "cpu")
    r = row(SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
            prompt=[0], output=[1, 2, 2])
    got = sampler.adjust_logits(logits.clone(), [r])[0]
    # token 0: prompt only -> 2/2; token 1: output once -> -1*2 - 0.5 - 0.25; token 2: twice -> 0.5/2 - 0.5 - 0.5
    torch.testing.assert_close(got, torch.tensor([1.0, -2.75, -0.75, 1.0]))


def test_min_tokens_masks_eos_and_stop_ids():
    sampler = Sampler({3}, "cpu")
    r = row(SamplingParams(min_tokens=2, stop_token_ids=[1]), output=[5])
    got = sampler.adjust_logits(torch.zeros(1, 4), [r])[0]
    assert got.tolist() == [0.0, float("-inf"), 0.0, float("-inf")]


@pytest.mark.parametrize("seeded", [False, True])
def test_draws_follow_the_distribution(seeded):
    # zeros in the middle and at the end: a zero-probability token must never be drawn
    probs = torch.tensor([0.5, 0.0, 0.25, 0.15, 0.1, 0.0])
    sampler = Sampler(set(), "cpu", seed=0)
    n = 20000
    if seeded:          # each row its own stream, as the engine gives seeded requests: (seed, index) -> generator
        rows = [row(SamplingParams(temperature=1.0)) for _ in range(n)]
        for i, r in enumerate(rows):
            r.seq.generator = torch.Generator().manual_seed(1000 + i)
    else:
        rows = [row(SamplingParams(temperature=1.0))] * n
    counts = torch.bincount(torch.tensor(sampler.sample(probs.expand(n, -1), rows)), minlength=6).float()
    assert counts[1] == 0 and counts[5] == 0
    keep = probs > 0
    chi2 = ((counts[keep] - n * probs[keep]) ** 2 / (n * probs[keep])).sum()
    assert chi2 < 16.3                                        # chi-square, 3 dof, p = 0.001


def test_seed_gives_same_output_whatever_the_batch(model):
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    target = [7, 8, 9, 10, 11]
    alone = nanoseek.LLM(model, max_model_len=128).generate(target, sp)[0].outputs[0].token_ids
    g = torch.Generator().manual_seed(1)
    others = [torch.randint(3, 512, (int(n),), generator=g).tolist() for n in (3, 17, 9, 30)]
    noisy = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    eng = LLMEngine(model, config=EngineConfig(max_model_len=128, block_size=4, max_num_batched_tokens=16))
    eng.add_request("o0", others[0], noisy)
    eng.add_request("o1", others[1], noisy)
    eng.step()
    eng.add_request("t", target, sp)                       # joins a running batch, chunked next to others
    eng.add_request("o2", others[2], noisy)
    eng.add_request("o3", others[3], noisy)
    got = None
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.request_id == "t" and out.finished:
                got = out.outputs[0].token_ids
    assert got == alone
    other_seed = nanoseek.LLM(model, max_model_len=128).generate(
        target, SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=10, ignore_eos=True))
    assert other_seed[0].outputs[0].token_ids != alone


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    llm = nanoseek.LLM(model, max_model_len=128)
    p = [5, 9, 200, 31]
    greedy = llm.generate(p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids
    for sp in (SamplingParams(temperature=1.5, top_k=1, max_tokens=8, ignore_eos=True),
               SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=8, ignore_eos=True)):
        assert llm.generate(p, sp)[0].outputs[0].token_ids == greedy


def test_stop_strings_stop_ids_and_text(model, tokenizer):
    llm = nanoseek.LLM(model, tokenizer=tokenizer, max_model_len=128)
    prompt = "the cat sat on"
    base = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    assert base.text == tokenizer.decode(base.token_ids, skip_special_tokens=True)
    assert len(base.text) > 12, base.text
    stop = base.text[6:9]
    first = base.text.find(stop)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop, "\x00"]))
    o = out[0].outputs[0]
    assert o.text == base.text[:first] and o.finish_reason == "stop" and o.stop_reason == stop
    assert o.token_ids == base.token_ids[:len(o.token_ids)]
    o = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=stop,
                                            include_stop_str_in_output=True))[0].outputs[0]
    assert o.text == base.text[:first + len(stop)]
    # stop token id: ends on that token, kept in token_ids, its text left out
    tid = base.token_ids[4]
    o = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                            stop_token_ids=[tid]))[0].outputs[0]
    k = base.token_ids.index(tid)
    assert o.token_ids == base.token_ids[:k + 1] and o.finish_reason == "stop" and o.stop_reason == tid
    assert o.text == tokenizer.decode(base.token_ids[:k], skip_special_tokens=True)
    # streaming: the deltas add up to the final text, and never show a stop string
    deltas = [out.outputs[0].delta_text for out in llm.stream(prompt, SamplingParams(
        temperature=0, max_tokens=30, ignore_eos=True, stop=stop))]
    assert "".join(deltas) == base.text[:first]


def test_eos_stops_unless_ignored(model):
    p = [4, 5, 6]
    sp = dict(temperature=0, max_tokens=20)
    ref = nanoseek.LLM(model, max_model_len=128).generate(p, SamplingParams(ignore_eos=True, **sp))[0].outputs[0]
    assert ref.finish_reason == "length" and len(ref.token_ids) == 20
    eos = ref.token_ids[5]
    k = ref.token_ids.index(eos)
    model.config.eos_token_id = eos                           # the engine reads EOS from the config
    try:
        out = nanoseek.LLM(model, max_model_len=128).generate(p, SamplingParams(**sp))[0].outputs[0]
    finally:
        model.config.eos_token_id = 1
    assert out.token_ids == ref.token_ids[:k + 1] and out.finish_reason == "stop" and out.stop_reason is None


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0), dict(max_tokens=-1), dict(top_p=0.0), dict(top_p=1.01),
                                    dict(stop=3), dict(stop=[b"x"]), dict(n=0), dict(temperature=-1.0),
                                    dict(top_k=-2), dict(min_p=1.5), dict(presence_penalty=3.0),
                                    dict(repetition_penalty=0.0), dict(logprobs=-1), dict(seed=1.5),
                                    dict(stop_token_ids=["a"]), dict(min_tokens=5, max_tokens=2)])
def test_sampling_params_validation(kwargs):
    with pytest.raises(RequestError) as e:
        SamplingParams(**kwargs)
    assert isinstance(e.value, ValueError)
    assert next(iter(kwargs)) in str(e.value)


def test_think_splitter_handles_split_tags():
    from nanoseek.inference.cli_chat import ThinkSplitter

    s = ThinkSplitter(thinking=True)
    parts = []
    for delta in ["let me ", "think</th", "ink>\n\nThe ans", "wer is <", "7>"]:
        parts += s.feed(delta)
    parts += s.flush()
    think = "".join(t for p, t in parts if p == "think")
    answer = "".join(t for p, t in parts if p == "answer")
    assert think == "let me think" and answer == "\n\nThe answer is <7>"


def test_cli_generate_and_chat(model, tokenizer, tmp_path, capsys, monkeypatch):
    from nanoseek.cli import main

    nanoseek.save_model(model, tmp_path)
    tokenizer.save(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "the cat", "--temperature", "0", "--max-tokens", "6",
                 "--ignore-eos", "--json", "--max-model-len", "64"]) == 0
    rec = __import__("json").loads(capsys.readouterr().out.strip().splitlines()[-1])
    ref = nanoseek.LLM(model, tokenizer=tokenizer, max_model_len=64).generate(
        "the cat", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].outputs[0]
    assert rec["token_ids"] == ref.token_ids and rec["text"] == ref.text and rec["finish_reason"] == "length"
    assert main(["generate", str(tmp_path), "--prompt-ids", "1,2,x"]) == 2                # one-line user error
    assert "comma-separated" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("hello there\n/reset\nagain\n/exit\n"))
    assert main(["chat", str(tmp_path), "--temperature", "0", "--max-tokens", "5", "--ignore-eos",
                 "--max-model-len", "128"]) == 0
    out = capsys.readouterr().out
    assert out.count("[thinking]") == 2                     # R1's generation prompt opens <think>
    assert len(out) > 40                                    # two streamed replies
