"""The engine against a plain full-forward argmax loop on the same model: single requests, a batch of 16 mixed-length
requests arriving at different steps (chunked prefill, prefix caching on and off), preemption by recompute, n > 1
forks, aborts; logprobs against log_softmax; the latent cache's bytes per token; bad input."""
import pytest
import torch

import nanoseek
from nanoseek.inference import EngineConfig, LLMEngine, RequestError, SamplingParams
from nanoseek.inference.runner import moe_decode, moe_static
from models import reference, tiny_model

GREEDY = dict(temperature=0.0, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def prompts(count, lo=3, hi=40, seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (count,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def engine(model, **kw):
    kw.setdefault("max_model_len", 128)
    return LLMEngine(model, config=EngineConfig(**kw))


def run(eng, requests, arrivals=None):
    """requests: {id: (prompt, params)}; arrivals: {step: [ids]} (default: all at step 0) -> {id: RequestOutput}."""
    arrivals = arrivals or {0: list(requests)}
    done, step = {}, 0
    while step <= max(arrivals) or eng.has_unfinished_requests():
        for rid in arrivals.get(step, []):
            eng.add_request(rid, *requests[rid])
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
    return done


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_single_request_matches_full_forward(model, prefix_caching):
    p = prompts(1, 20, 21)[0]
    llm = nanoseek.LLM(model, max_model_len=128, block_size=4, enable_prefix_caching=prefix_caching)
    out = llm.generate(p, SamplingParams(max_tokens=12, **GREEDY))[0]
    assert out.outputs[0].token_ids == reference(model, p, 12)
    assert out.outputs[0].finish_reason == "length"
    again = llm.generate(p, SamplingParams(max_tokens=12, **GREEDY))[0]       # second time: prefix cache hit
    assert again.outputs[0].token_ids == out.outputs[0].token_ids
    assert again.num_cached_tokens == (16 if prefix_caching else 0)           # 4 full blocks, last token recomputed


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_batch_of_16_mixed_lengths_arriving_at_different_steps(model, prefix_caching):
    ps = prompts(16, 2, 45, seed=1)
    shared = prompts(1, 24, 25, seed=2)[0]
    for i in (3, 7, 11):                                      # some requests share a long prefix
        ps[i] = shared + ps[i][:5]
    lens = [4 + (i * 5) % 17 for i in range(16)]
    reqs = {f"r{i}": (p, SamplingParams(max_tokens=n, **GREEDY)) for i, (p, n) in enumerate(zip(ps, lens))}
    arrivals = {0: ["r0", "r1", "r2", "r3"], 2: ["r4", "r5", "r6", "r7"], 5: ["r8", "r9"], 6: ["r10", "r11"],
                9: ["r12", "r13", "r14", "r15"]}
    # a 24-token step budget forces chunked prefill next to running decodes
    eng = engine(model, block_size=4, max_num_batched_tokens=24, enable_prefix_caching=prefix_caching)
    done = run(eng, reqs, arrivals)
    for rid, (p, sp) in reqs.items():
        assert done[rid].outputs[0].token_ids == reference(model, p, sp.max_tokens), rid
    assert (eng.block_manager.prefix_hits > 0) == prefix_caching
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_usable_blocks      # all blocks back


def test_logprobs_equal_log_softmax(model):
    p = prompts(1, 9, 10, seed=3)[0]
    out = nanoseek.LLM(model, max_model_len=128).generate(p, SamplingParams(max_tokens=6, logprobs=3, **GREEDY))
    o = out[0].outputs[0]
    full = torch.tensor([p + o.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(model(full)[0].float(), -1)[len(p) - 1:-1]               # (6,V)
    for t, (tok, lp) in enumerate(zip(o.token_ids, o.logprobs)):
        assert abs(lp[tok].logprob - float(ref[t, tok])) <= 1e-4
        assert lp[tok].rank == 1                                                       # greedy: the top token
        top = ref[t].topk(3)
        assert set(lp) == set(top.indices.tolist())
        for v, i in zip(top.values.tolist(), top.indices.tolist()):
            assert abs(lp[i].logprob - v) <= 1e-4
    assert abs(o.cumulative_logprob - sum(lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs))) < 1e-4


def test_preempted_request_finishes_correctly(model):
    ps = prompts(4, 10, 14, seed=4)
    reqs = {f"r{i}": (p, SamplingParams(max_tokens=24, **GREEDY)) for i, p in enumerate(ps)}
    # 16 usable blocks of 4 tokens: four requests growing to ~36 tokens each cannot all fit
    eng = engine(model, block_size=4, num_blocks=17, max_model_len=48)
    done = run(eng, reqs)
    assert eng.scheduler.num_preemptions > 0
    for rid, (p, sp) in reqs.items():
        assert done[rid].outputs[0].token_ids == reference(model, p, 24), rid


def test_n_completions_share_prompt_blocks_and_seed_each(model):
    p = prompts(1, 17, 18, seed=5)[0]
    eng = engine(model, block_size=4)
    sp = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=5, ignore_eos=True)
    eng.add_request("a", p, sp)
    eng.step()                                               # prefill completion 0, fork 1 and 2, first tokens
    seqs = eng.requests["a"].seqs
    assert len(seqs) == 3
    prompt_blocks = set(seqs[0].block_table[:17 // 4])
    assert all(set(s.block_table[:17 // 4]) == prompt_blocks for s in seqs)          # shared, not copied
    assert eng.block_manager.num_usable_blocks - eng.block_manager.num_free_blocks == 5   # ceil(18/4) blocks
    while eng.has_unfinished_requests():
        outs = eng.step()
    many = outs[0].outputs
    assert [o.index for o in many] == [0, 1, 2] and all(len(o.token_ids) == 5 for o in many)
    assert len({tuple(o.token_ids) for o in many}) > 1
    # completion 0 of the n=3 request draws exactly like an n=1 request with the same seed
    single = nanoseek.LLM(model, max_model_len=128).generate(
        p, SamplingParams(temperature=1.0, seed=7, max_tokens=5, ignore_eos=True))
    assert single[0].outputs[0].token_ids == many[0].token_ids
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_usable_blocks


def test_abort_frees_blocks(model):
    eng = engine(model, block_size=4)
    for i, p in enumerate(prompts(3, 10, 30, seed=6)):
        eng.add_request(f"r{i}", p, SamplingParams(max_tokens=50, **GREEDY))
    eng.step()
    eng.step()
    assert eng.block_manager.num_free_blocks < eng.block_manager.num_usable_blocks
    for i in range(3):
        eng.abort(f"r{i}")
    eng.step()
    assert not eng.has_unfinished_requests()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_usable_blocks
    eng.add_request("r0", [5, 6, 7], SamplingParams(max_tokens=2))                   # the id is free again


def test_streaming_deltas_add_up(model):
    llm = nanoseek.LLM(model, max_model_len=128)
    outs = list(llm.stream([prompts(1, 5, 6)[0]] * 2, SamplingParams(max_tokens=7, **GREEDY)))
    final = [o for o in outs if o.finished]
    assert len(final) == 2
    for f in final:
        deltas = [t for o in outs if o.request_id == f.request_id for t in o.outputs[0].delta_token_ids]
        assert deltas == f.outputs[0].token_ids


def test_bf16_llm_on_a_cpu_without_bf16_hardware_warns_once(monkeypatch, recwarn):
    import nanoseek.hardware

    model = tiny_model().to(torch.bfloat16)
    for fast, expected in ((True, 0), (False, 1)):
        monkeypatch.setattr(nanoseek.hardware, "cpu_has_fast_bf16", lambda: fast)
        recwarn.clear()
        nanoseek.LLM(model, max_model_len=32)
        slow = [w for w in recwarn if "no hardware bf16 matmuls" in str(w.message)]
        assert len(slow) == expected and (not slow or "dtype='float32'" in str(slow[0].message))
    recwarn.clear()
    nanoseek.LLM(tiny_model(), max_model_len=32)                          # fp32 weights: nothing to say
    assert not [w for w in recwarn if "bf16" in str(w.message)]


@torch.no_grad()
def test_cache_bytes_per_token_and_v3_ratio():
    model = tiny_model().to(torch.bfloat16)
    cfg = model.config
    eng = engine(model)
    kv = eng.cache.kv                                                   # one tensor per layer
    assert len(kv) == cfg.num_hidden_layers                          # no speculation: no MTP slot
    assert all(t.dtype == torch.bfloat16 for t in kv)
    measured = sum(t.numel() * t.element_size() for t in kv) / (eng.cache.num_blocks * eng.cache.block_size)
    assert measured == eng.kv_cache_bytes_per_token() == 2 * cfg.num_hidden_layers * (
        cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    done = run(eng, {"x": ([4, 5, 6], SamplingParams(max_tokens=3, **GREEDY))})      # and it decodes in bf16
    assert len(done["x"].outputs[0].token_ids) == 3
    # V3: the latent (512 + 64 per token per layer) against full per-head K (128 x 192) and V (128 x 128)
    v3 = nanoseek.ModelConfig.from_name("v3")
    latent = v3.kv_lora_rank + v3.qk_rope_head_dim
    full_kv = v3.num_attention_heads * (v3.qk_head_dim + v3.v_head_dim)
    assert latent == 576 and full_kv == 40960
    assert full_kv / latent == pytest.approx(71.1, abs=0.05)


def test_bad_input_raises_before_any_work(model):
    llm = nanoseek.LLM(model, max_model_len=32)
    good = [1, 2, 3]
    for bad in (lambda: llm.generate([good, list(range(3, 40))], SamplingParams(max_tokens=4)),  # too long
                lambda: llm.generate([good, []], SamplingParams()),
                lambda: llm.generate([good, [1, 9999]], SamplingParams()),
                lambda: llm.generate("text needs a tokenizer", SamplingParams()),
                lambda: SamplingParams(max_tokens=0),
                lambda: SamplingParams(max_tokens=-3),
                lambda: SamplingParams(top_p=0.0),
                lambda: SamplingParams(top_p=1.5),
                lambda: SamplingParams(stop=5),
                lambda: SamplingParams(stop=["ok", 3]),
                lambda: llm.generate(good, SamplingParams(stop="x"))):                  # no tokenizer for stops
        with pytest.raises(ValueError) as e:
            bad()
        assert isinstance(e.value, RequestError)
    assert llm.engine.stats["steps"] == 0 and not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="MTP"):                    # speculation without an MTP module
        LLMEngine(tiny_model(num_nextn_predict_layers=0), config=EngineConfig(num_speculative_tokens=1))


@torch.no_grad()
@pytest.mark.parametrize("n_tokens", [1, 3, 16])
def test_decode_moe_paths_match_model_moe(model, n_tokens):
    moe = model.model.layers[1].mlp
    x = torch.randn(n_tokens, 1, model.config.hidden_size)
    torch.testing.assert_close(moe_static(moe, x), moe(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe_decode(moe, x), moe(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_compiled_decode_matches_eager_with_few_graphs(model):
    """compile=True: the same greedy tokens as the eager engine, batch 1 and mixed batches, and at most three graphs
    (batch 1, and inductor's own split of small from larger batches; on CPU the MoE gathers its experts at every
    batch size), not one per batch size or context length; the new latents land in the engine's own cache tensors."""
    from torch._dynamo.utils import counters

    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported here")
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = engine(model), engine(model, compile=True)
    cfg = model.config
    batches = [prompts(1, seed=1), prompts(2, seed=2), prompts(7, seed=3), prompts(3, lo=20, hi=60, seed=4)]
    for ps in batches:
        reqs = {str(i): (p, SamplingParams(max_tokens=6, logprobs=0, **GREEDY)) for i, p in enumerate(ps)}
        want, got = run(eager, reqs), run(compiled, reqs)
        assert {k: v.outputs[0].token_ids for k, v in got.items()} == \
               {k: v.outputs[0].token_ids for k, v in want.items()}
        # and the numbers, not just the argmax: the compiled step rewrites matmuls (runner._decode_mm)
        for k, v in got.items():
            lp = [[e.logprob for e in d.values()] for d in v.outputs[0].logprobs]
            lp_eager = [[e.logprob for e in d.values()] for d in want[k].outputs[0].logprobs]
            assert len(lp) == 6 and all(len(row) == 1 for row in lp)
            torch.testing.assert_close(torch.tensor(lp), torch.tensor(lp_eager), rtol=0, atol=1e-4)
    assert 7 * cfg.num_experts_per_tok >= cfg.n_routed_experts > 2 * cfg.num_experts_per_tok   # batches on both
    assert counters["stats"]["unique_graphs"] <= 3                                          # sides of E/K ran
    kv0 = compiled.cache.kv[0]
    ptr = kv0.data_ptr()
    run(compiled, {"x": (prompts(1, seed=5)[0], SamplingParams(max_tokens=3, **GREEDY))})
    assert compiled.cache.kv[0].data_ptr() == ptr and kv0.abs().sum() > 0
