"""MTP speculative decoding: greedy outputs equal the plain argmax loop (drafts mostly rejected, mostly accepted,
and mixed; single and a staggered batch of 16; prefix caching on and off), and at temperature 1 the emitted tokens
follow the target model's distribution (chi-square against exact probabilities, with a negative control showing
the test rejects a sampler that skips the rejection step)."""
import math

import pytest
import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.inference import EngineConfig, LLMEngine, SamplingParams
from nanoseek.inference.sampler import Row, Sampler
from nanoseek.inference.sequence import Request, Sequence
from nanoseek.inference.speculative import accept_drafts
from nanoseek.model import build_model
from models import reference, tiny_model

GREEDY = dict(temperature=0.0, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_thread")


def trained_model(mtp_noise: float):
    """Tiny model trained (~4 s) on t_{i+1} = 5 t_i + 3 mod 64, main head and MTP head, so drafts are good; noise on
    the MTP's input projection then lowers the acceptance rate to a chosen level."""
    V = 64
    model = build_model(nanoseek.ModelConfig.from_name("tiny", vocab_size=V), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        seq = [torch.randint(0, V, (16, 1), generator=g)]
        for _ in range(23):
            seq.append((seq[-1] * 5 + 3) % V)
        ids = torch.cat(seq, 1)
        out = model(ids, return_mtp=True)
        loss = (F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
                + F.cross_entropy(out.mtp_logits[0][:, :-2].flatten(0, 1), ids[:, 2:].flatten()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        w = model.mtp[0].eh_proj.weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) * w.std() * mtp_noise)
    return model.eval()


def prompts(count, lo, hi, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(n),), generator=g).tolist()
            for n in torch.randint(lo, hi, (count,), generator=g)]


@pytest.fixture(scope="module")
def models():
    # random: peaked logits (lm_head x10), so no fp32 near-ties, and MTP drafts rarely agree
    return {"random": tiny_model(vocab_size=512, head_scale=10.0), "good": trained_model(0.0),
            "mixed": trained_model(3.0)}


@pytest.mark.parametrize("kind,k", [("random", 2), ("good", 3), ("mixed", 2), ("mixed", 4)])
def test_greedy_speculation_matches_full_forward(models, kind, k):
    model = models[kind]
    V = model.config.vocab_size
    llm = nanoseek.LLM(model, num_speculative_tokens=k, max_model_len=96, block_size=4)
    ps = prompts(3, 3, 30, V, seed=k)
    outs = llm.generate(ps, SamplingParams(max_tokens=20, **GREEDY))
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == reference(model, p, 20)
    rate = llm.acceptance_rate
    assert {"random": rate < 0.2, "good": rate > 0.95, "mixed": 0.1 < rate < 0.95}[kind], rate


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_speculation_batch_of_16_staggered(models, prefix_caching):
    model = models["mixed"]
    ps = prompts(16, 2, 40, 64, seed=11)
    for i in (2, 9, 13):
        ps[i] = ps[5][:20] + ps[i][:4]                       # shared prefixes for the prefix cache
    lens = [3 + (i * 7) % 19 for i in range(16)]
    eng = LLMEngine(model, config=EngineConfig(num_speculative_tokens=3, max_model_len=96, block_size=4,
                                               max_num_batched_tokens=20, enable_prefix_caching=prefix_caching))
    arrivals = {0: range(0, 5), 3: range(5, 9), 4: range(9, 12), 8: range(12, 16)}
    done, step = {}, 0
    while step <= 8 or eng.has_unfinished_requests():
        for i in arrivals.get(step, []):
            eng.add_request(str(i), ps[i], SamplingParams(max_tokens=lens[i], **GREEDY))
        done.update({o.request_id: o for o in eng.step() if o.finished})
        step += 1
    for i in range(16):
        assert done[str(i)].outputs[0].token_ids == reference(model, ps[i], lens[i]), i
    assert eng.stats["accepted_tokens"] > 0 and eng.stats["draft_tokens"] > eng.stats["accepted_tokens"]
    assert (eng.block_manager.prefix_hits > 0) == prefix_caching
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_usable_blocks


def test_speculation_preemption_and_n_siblings(models):
    model = models["mixed"]
    ps = prompts(3, 8, 12, 64, seed=3)
    eng = LLMEngine(model, config=EngineConfig(num_speculative_tokens=2, max_model_len=40, block_size=4,
                                               num_blocks=13))
    for i, p in enumerate(ps):
        eng.add_request(str(i), p, SamplingParams(max_tokens=24, **GREEDY))
    eng.add_request("n", ps[0], SamplingParams(n=2, max_tokens=10, **GREEDY))
    done = {}
    while eng.has_unfinished_requests():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert eng.scheduler.num_preemptions > 0
    for i, p in enumerate(ps):
        assert done[str(i)].outputs[0].token_ids == reference(model, p, 24)
    assert [o.token_ids for o in done["n"].outputs] == [reference(model, ps[0], 10)] * 2


def chi2_threshold(dof: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square (Wilson-Hilferty approximation; z = 3.09 is the normal 99.9% point)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi2(counts: dict, probs: dict, n: int) -> tuple[float, int]:
    """Pearson statistic over cells with expected count >= 5; the other cells pooled into one."""
    stat, dof, pool_o, pool_e = 0.0, -1, 0.0, 0.0
    for cell, p in probs.items():
        e, o = n * p, counts.get(cell, 0)
        if e >= 5:
            stat, dof = stat + (o - e) ** 2 / e, dof + 1
        else:
            pool_o, pool_e = pool_o + o, pool_e + e
    if pool_e > 0:
        stat, dof = stat + (pool_o - pool_e) ** 2 / pool_e, dof + 1
    return stat, dof


def test_accept_drafts_emits_the_target_distribution():
    """Rejection sampling alone: drafts from q, emitted first token ~ p0, and after an accepted draft the bonus ~ p1."""
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    sampler = Sampler(set(), "cpu", seed=0)
    row = Row(Sequence(0, Request("r", None, [1], SamplingParams(temperature=1.0)), 0, [1]))
    n = 6000
    drafts = torch.multinomial(q[0], n, replacement=True, generator=torch.Generator().manual_seed(0)).tolist()
    first, joint = {}, {}
    for d in drafts:
        out = accept_drafts(sampler, row, [d], p, q)
        first[out[0]] = first.get(out[0], 0) + 1
        if len(out) == 2:
            joint[out[1]] = joint.get(out[1], 0) + 1
    stat, dof = chi2(first, dict(enumerate(p[0].tolist())), n)
    assert stat < chi2_threshold(dof), (stat, dof)
    m = sum(joint.values())
    # P(accept) = sum_x min(p0, q) = 0.1 + 0.2 + 0.15 + 0.05
    assert abs(m / n - 0.5) < 4 * math.sqrt(0.25 / n)
    stat, dof = chi2(joint, dict(enumerate(p[1].tolist())), m)
    assert stat < chi2_threshold(dof), (stat, dof)


@torch.no_grad()
def exact_triples(model, prompt):
    """Exact P(t1, t2, t3 | prompt) for a small vocabulary by enumeration."""
    V = model.config.vocab_size
    p1 = model(torch.tensor([prompt]))[0, -1].softmax(-1)                                     # (V,)
    ctx2 = torch.tensor([prompt + [a] for a in range(V)])
    p2 = model(ctx2)[:, -1].softmax(-1)                                                       # (V,V)
    ctx3 = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
    p3 = model(ctx3)[:, -1].softmax(-1).view(V, V, V)
    joint = p1[:, None, None] * p2[:, :, None] * p3
    return {(a, b, c): float(joint[a, b, c]) for a in range(V) for b in range(V) for c in range(V)}


def sample_triples(model, prompt, n, k):
    llm = nanoseek.LLM(model, num_speculative_tokens=k, max_model_len=32, max_num_seqs=128, seed=0)
    outs = llm.generate([prompt] * n, SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True))
    counts = {}
    for o in outs:
        t = tuple(o.outputs[0].token_ids)
        counts[t] = counts.get(t, 0) + 1
    return counts, llm.acceptance_rate


def test_speculation_at_temperature_1_follows_the_target_distribution(monkeypatch):
    """3 tokens per request: t1 from the prefill, then one MTP draft verified (t2, and t3 when it is accepted).
    With vocab 16 and peaked logits the draft (random MTP) disagrees with the target often, so both the
    accept path and the residual path carry real mass."""
    model = tiny_model(vocab_size=16, head_scale=10.0)
    prompt = [3, 7, 1, 12]
    exact = exact_triples(model, prompt)
    n = 3000
    counts, rate = sample_triples(model, prompt, n, k=2)
    assert 0.2 < rate < 0.9, rate
    stat, dof = chi2(counts, exact, n)
    assert dof >= 20 and stat < chi2_threshold(dof), (stat, dof)
    # Negative control: accepting every draft (no rejection step) must fail the same test.
    import nanoseek.inference.engine as engine_mod

    monkeypatch.setattr(engine_mod, "accept_drafts", lambda s, r, drafts, p, q: [*drafts, 0])
    bad, _ = sample_triples(model, prompt, n, k=2)
    stat_bad, dof_bad = chi2(bad, exact, n)
    assert stat_bad > 10 * chi2_threshold(dof_bad), (stat_bad, dof_bad)
