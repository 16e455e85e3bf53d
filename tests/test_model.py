"""Model pieces against slow readable paths and hand-computed cases: gate, grouped experts, RoPE/YaRN, MTP."""
import math

import pytest
import torch

import nanoseek
from nanoseek import hardware
from nanoseek.model import build_model
from nanoseek.model.moe import Experts, Gate
from nanoseek.model.rope import rope_inv_freq


def _cfg(**kw):
    return nanoseek.ModelConfig.from_name("tiny", **kw)


def _experts(cfg, seed):
    """Grouped experts from global seed `seed`, weights redrawn at std 0.2 (visible outputs); the global RNG then
    continues from there, as the tests' inputs expect."""
    torch.manual_seed(seed)
    ex = Experts(cfg)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.2)
    torch.nn.init.normal_(ex.down_proj, std=0.2)
    return ex


def test_grouped_experts_match_per_token_reference():
    cfg = _cfg(n_routed_experts=8, num_experts_per_tok=3)
    ex = _experts(cfg, seed=0)
    x = torch.randn(37, cfg.hidden_size)
    idx = torch.stack([torch.randperm(8)[:3] for _ in range(37)])
    idx[:5] = torch.tensor([0, 1, 2])            # an expert crowd, and (likely) some idle experts
    w = torch.rand(37, 3)
    fast, slow = ex(x, idx, w), ex.forward_reference(x, idx, w)
    assert fast.abs().max() > 0.1
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_skewed_routing_loop_path_matches_reference():
    """One expert in every token's top-2: a skewed load (per-expert matmuls, no padding) still matches."""
    cfg = _cfg(n_routed_experts=8, num_experts_per_tok=2)
    ex = _experts(cfg, seed=2)
    x = torch.randn(20, cfg.hidden_size)
    idx = torch.stack([torch.tensor([0, 1 + n % 7]) for n in range(20)])
    w = torch.rand(20, 2)
    torch.testing.assert_close(ex(x, idx, w), ex.forward_reference(x, idx, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sizes", [
    [30, 25, 3, 4, 0, 5, 2, 3],                  # two overloaded experts, one idle: padded to the busiest
    [600, 0, 90, 80, 100, 95, 85, 70],            # one expert far over the rest: a group of its own
    [0, 0, 0, 12, 0, 0, 0, 0],                    # every slot on one expert
    [40, 3, 35, 2, 38, 4, 36, 5],                 # every expert busy, in two load groups (blocks reordered)
    [6, 7, 5, 8, 6, 7, 5, 8],                     # balanced: one group, the weights used as they are
])
@pytest.mark.parametrize("op_name", ["ExpertBatched", "ExpertLoop", "ExpertGrouped"])
def test_expert_ops_match_per_expert_autograd(sizes, op_name):
    """The expert ops (hand-written backwards) against `_swiglu` run per expert under autograd then summed per
    token, in fp64: outputs and the gradients of the tokens, both weight stacks and the routing weights.
    ExpertGrouped runs in fp32 (grouped_mm takes no fp64), held to fp32 rounding of the fp64 reference."""
    from nanoseek.model import expert_ops
    from nanoseek.model.expert_ops import batch_groups
    from nanoseek.model.moe import _swiglu

    g = torch.Generator().manual_seed(sum(sizes))
    E, H, I, S = len(sizes), 16, 8, sum(sizes)
    N = max(S // 3, 1)
    token = torch.randint(0, N, (S,), generator=g)                           # source token of each slot
    params = [torch.randn(N, H, generator=g, dtype=torch.float64),            # tokens
              torch.randn(E, 2 * I, H, generator=g, dtype=torch.float64),     # gate_up
              torch.randn(E, H, I, generator=g, dtype=torch.float64),         # down
              torch.rand(S, generator=g, dtype=torch.float64)]                # routing weights, slots by expert
    params = [p.requires_grad_() for p in params]
    x, w_gu, w_down, scale = params
    xs = x[token]
    proj = torch.randn(N, H, generator=g, dtype=torch.float64)
    per_slot = torch.cat([_swiglu(c, gu, d, sc) for gu, d, c, sc in zip(w_gu.unbind(0), w_down.unbind(0),
                                                                        xs.split(sizes), scale.split(sizes))
                          if c.shape[0]])
    ref = torch.zeros(N, H, dtype=torch.float64).index_add(0, token, per_slot)
    ref_grads = torch.autograd.grad((ref * proj).sum(), params)
    if S > 1000 and op_name == "ExpertBatched":
        assert len(batch_groups(sizes)) > 1                                  # several padded groups are tested
    tol, relative_atol = 1e-10, False
    if op_name == "ExpertGrouped":
        if not hasattr(torch.nn.functional, "grouped_mm"):
            pytest.skip("this torch has no F.grouped_mm")
        params = [p.detach().float().requires_grad_() for p in params]
        x, w_gu, w_down, scale = params
        sizes = torch.tensor(sizes).cumsum(0).to(torch.int32)                # the op takes offsets
        proj, tol, relative_atol = proj.float(), 1e-5, True             # fp32: atol scales with each tensor
    out = getattr(expert_ops, op_name).apply(x, token, w_gu, w_down, scale, sizes)
    for a, b in zip([out, *torch.autograd.grad((out * proj).sum(), params)], [ref, *ref_grads]):
        atol = tol * b.abs().max().item() if relative_atol else tol
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=tol)


def test_batch_groups_is_the_cheapest_cut():
    """`batch_groups` (dynamic programming, cuts only where the padded load changes) against brute force over
    every way to cut the busiest-first experts into consecutive groups, under the same cost."""
    import itertools
    import random

    from nanoseek.model.expert_ops import _padded, batch_groups

    def cost(groups, copy_rows=24, group_rows=64):
        return sum(len(g) * (max(_padded(sizes[e]) for e in g) + copy_rows) + group_rows for g in groups)

    rng = random.Random(0)
    for _ in range(40):
        sizes = [rng.choice([0, 1, 3, 7, 30, 33, 64, 65, 100, 300]) for _ in range(rng.randint(1, 8))]
        order = sorted((e for e, n in enumerate(sizes) if n), key=lambda e: -sizes[e])
        got = batch_groups(sizes)
        assert sorted(e for g in got for e in g) == sorted(order)                 # every busy expert, once
        best = min((cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))])
                    for r in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), r)),
                   default=0)
        assert cost(got) == best


def test_bf16_experts_match_reference(monkeypatch):
    """bf16 autocast takes the batched schedule (on a CPU with hardware bf16, which this test pretends to have);
    checked against the per-token reference at bf16 tolerance."""
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    cfg = _cfg(n_routed_experts=8, num_experts_per_tok=2)
    ex = _experts(cfg, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.randn(40, cfg.hidden_size)
        idx = torch.stack([torch.tensor([0, 1 + n % 7]) for n in range(40)])
        w = torch.rand(40, 2)
        torch.testing.assert_close(ex(x, idx, w).float(), ex.forward_reference(x, idx, w).float(), atol=0.05, rtol=0.05)


def test_autocast_dtype_of_nanoseeks_own_ops(monkeypatch):
    """Experts and the fused head follow bf16 autocast on a CPU with hardware bf16 and stay fp32 on one without
    (emulated bf16 matmuls run 1-12 GFLOP/s): there the experts' output is bitwise the fp32 one."""
    assert hardware.fast_autocast_dtype("cpu") is None                                 # no autocast
    with torch.autocast("cpu", dtype=torch.float16):
        assert hardware.fast_autocast_dtype("cpu") is None                             # CPU fp16: stays fp32
    cfg = _cfg(n_routed_experts=8, num_experts_per_tok=2)
    ex = _experts(cfg, seed=4)
    x, w = torch.randn(40, cfg.hidden_size), torch.rand(40, 2)
    idx = torch.stack([torch.tensor([n % 8, (n + 3) % 8]) for n in range(40)])
    ref = ex(x, idx, w)
    for fast in (True, False):
        monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: fast)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert hardware.fast_autocast_dtype("cpu") == (torch.bfloat16 if fast else None)
            got = ex(x, idx, w)
        assert got.dtype == (torch.bfloat16 if fast else torch.float32)
        if not fast:
            assert torch.equal(got, ref)


def test_grouped_experts_gradients_match_reference():
    cfg = _cfg(n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1)
    ex = _experts(cfg, seed=1)
    x = torch.randn(9, cfg.hidden_size, requires_grad=True)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(9)])
    w = torch.rand(9, 2, requires_grad=True)                        # routing weights get gradients too
    proj = torch.randn(9, cfg.hidden_size)
    params = [x, ex.gate_up_proj, ex.down_proj, w]
    g_fast = torch.autograd.grad((ex(x, idx, w) * proj).sum(), params)
    g_slow = torch.autograd.grad((ex.forward_reference(x, idx, w) * proj).sum(), params)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)



def test_scaled_swiglu_backward_matches_autograd():
    """The activation between the grouped GEMMs: silu(gate) * up * scale and its hand-written backward (both
    gradients), and the unscaled form the per-expert ops use, against autograd through the composite, fp64."""
    from nanoseek.model.expert_ops import scaled_swiglu, scaled_swiglu_backward

    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(11, 2 * 6, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(11, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(11, 6, generator=g, dtype=torch.float64)
    gate, up = gate_up.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up * scale[:, None]
    h, none = scaled_swiglu(gate_up.detach(), scale.detach())
    assert none is None
    torch.testing.assert_close(h, ref, atol=1e-12, rtol=0)
    expected = torch.autograd.grad(ref, (gate_up, scale), upstream, retain_graph=True)
    got = scaled_swiglu_backward(upstream, gate_up.detach(), scale.detach(), want_scale=True)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert scaled_swiglu_backward(upstream, gate_up.detach(), scale.detach(), want_scale=False)[1] is None
    # with sigmoid(gate) kept by the forward, the backward's products stand in for silu and silu_backward
    h, sigmoid = scaled_swiglu(gate_up.detach(), scale.detach(), keep_sigmoid=True)
    torch.testing.assert_close(h, ref, atol=1e-12, rtol=0)
    got = scaled_swiglu_backward(upstream, gate_up.detach(), scale.detach(), want_scale=True, sigmoid=sigmoid)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    # the unscaled form the per-expert ops call (routing weight folded into the gradient, silu kept), into `out`
    out = torch.empty(11, 12, dtype=torch.float64)
    kept_silu = torch.nn.functional.silu(gate.detach())
    got, none = scaled_swiglu_backward(upstream, gate_up.detach(), silu=kept_silu, out=out)
    assert got is out and none is None
    torch.testing.assert_close(got, torch.autograd.grad(torch.nn.functional.silu(gate) * up, gate_up, upstream)[0],
                               atol=1e-12, rtol=1e-12)


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"), reason="this torch has no F.grouped_mm")
def test_cpu_fp32_experts_take_grouped_mm_and_match_the_loop(monkeypatch):
    """fp32 on CPU runs the experts as two F.grouped_mm calls (an idle expert included); outputs and every gradient
    match ExpertLoop's to fp32 rounding. fp64 keeps the loop (grouped_mm takes no fp64)."""
    import torch.nn.functional as F

    from nanoseek.model import moe

    calls = []
    grouped_mm = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
    cfg = _cfg(n_routed_experts=8, num_experts_per_tok=2)
    ex = _experts(cfg, seed=4)
    x = torch.randn(30, cfg.hidden_size, requires_grad=True)
    idx = torch.stack([torch.tensor([n % 3, 3 + n % 4]) for n in range(30)])      # expert 7 idle
    w = torch.rand(30, 2, requires_grad=True)
    proj = torch.randn(30, cfg.hidden_size)
    params = [x, ex.gate_up_proj, ex.down_proj, w]
    out = ex(x, idx, w)
    assert len(calls) == 2
    grads = torch.autograd.grad((out * proj).sum(), params)
    assert len(calls) == 6                                       # backward: two weight gradients, d_h, d_x
    monkeypatch.setattr(moe, "_use_grouped_mm", lambda *a: False)                # the ExpertLoop path
    ref = ex(x, idx, w)
    ref_grads = torch.autograd.grad((ref * proj).sum(), params)
    assert len(calls) == 6
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert grads[1][7].abs().max() == 0 and grads[2][7].abs().max() == 0        # the idle expert's weights
    monkeypatch.undo()
    assert not moe._use_grouped_mm(x.double(), ex.gate_up_proj.double())


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"), reason="this torch has no F.grouped_mm")
def test_stacked_grouped_experts_reuse_scratch_exactly(monkeypatch):
    """Two MoE layers in one graph: both backwards run the grouped op on CPU, which takes its temporaries from the
    same per-thread scratch buffers (nanoseek.scratch), one layer after the other. The gradients are bitwise the
    ones with fresh buffers, and match the ExpertLoop path to fp32 rounding."""
    from nanoseek.model import expert_ops, moe

    cfg = _cfg(n_routed_experts=8, num_experts_per_tok=2)
    first, second = _experts(cfg, seed=5), _experts(cfg, seed=6)
    x = torch.randn(40, cfg.hidden_size, requires_grad=True)
    idx1 = torch.stack([torch.randperm(8)[:2] for _ in range(40)])
    idx2 = torch.stack([torch.randperm(8)[:2] for _ in range(40)])
    w = torch.rand(40, 2, requires_grad=True)
    proj = torch.randn(40, cfg.hidden_size)
    params = [x, w, first.gate_up_proj, first.down_proj, second.gate_up_proj, second.down_proj]

    def grads():
        return torch.autograd.grad((second(first(x, idx1, w), idx2, w) * proj).sum(), params)

    got = grads()
    monkeypatch.setattr(expert_ops, "scratch", lambda name, shape, dtype: torch.empty(shape, dtype=dtype))
    for a, b in zip(got, grads()):
        assert torch.equal(a, b)
    monkeypatch.setattr(moe, "_use_grouped_mm", lambda *a: False)
    for a, b in zip(got, grads()):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-6 * b.abs().max().item(), rtol=1e-5)


def test_scratch_buffers_are_per_name_and_per_thread():
    """nanoseek.scratch: one reused buffer per (thread, name), grown on demand, a new one for a new dtype; release()
    drops this thread's."""
    import threading

    from nanoseek.scratch import scratch

    a = scratch("test_a", (3, 4), torch.float32).fill_(1.0)
    b = scratch("test_b", (2, 2), torch.float32).fill_(2.0)
    assert a.sum() == 12 and b.sum() == 8                                     # two names never alias
    assert scratch("test_a", (2, 3), torch.float32).data_ptr() == a.data_ptr()          # reused when it fits
    assert scratch("test_a", (2, 3), torch.float32).shape == (2, 3)
    assert scratch("test_a", (5, 5), torch.float32).numel() == 25                       # grown
    assert scratch("test_a", (5, 5), torch.float64).dtype == torch.float64
    other = []
    t = threading.Thread(target=lambda: other.append(scratch("test_b", (2, 2), torch.float32).data_ptr()))
    t.start()
    t.join()
    assert other[0] != b.data_ptr()                                           # each thread has its own
    from nanoseek import scratch as scratch_module

    scratch_module.release()                                                  # the recipes' end of loop
    assert scratch_module._local.buffers == {}
    assert scratch("test_a", (2, 2), torch.float32).shape == (2, 2)           # usable again


def test_v3_gate_hand_computed():
    """4 experts in 2 groups, keep 1 group, top-2. The bias moves selection to group 1, weights use raw scores."""
    cfg = _cfg(n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2, hidden_size=64,
               routed_scaling_factor=2.5, norm_topk_prob=True)
    gate = Gate(cfg)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    # a one-hot input x = e_0 and W[:,0] = logits makes x @ W^T = logits
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, 0] = logits[0]
        gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.9, 0.9]))
    x = torch.zeros(1, 64)
    x[0, 0] = 1.0
    w, idx, scores = gate(x)
    s = torch.sigmoid(logits[0])
    # group sums of top-2 with bias: g0 = s0+s1 = 1.612, g1 = s2+0.9 + s3+0.9 = 2.569 -> keep group 1
    assert sorted(idx[0].tolist()) == [2, 3]
    expected = torch.stack([s[2], s[3]]) / (s[2] + s[3]) * 2.5
    got = w[0][idx[0].argsort()]
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(scores[0], s)


def test_v2_gate_softmax_greedy_hand_computed():
    cfg = _cfg(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy", n_routed_experts=4,
               num_experts_per_tok=2, norm_topk_prob=False, routed_scaling_factor=2.0, n_group=1, topk_group=1)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, 0] = torch.tensor([0.0, 3.0, 1.0, 2.0])
    x = torch.zeros(1, cfg.hidden_size)
    x[0, 0] = 1.0
    w, idx, _ = gate(x)
    p = torch.softmax(torch.tensor([0.0, 3.0, 1.0, 2.0]), -1)
    assert idx[0].tolist() == [1, 3]
    torch.testing.assert_close(w[0], 2.0 * p[[1, 3]])


def test_group_limited_masking_excludes_other_groups():
    """Top-k smaller than the allowed experts, and experts outside kept groups never chosen even if they score
    higher than some inside (the -inf mask)."""
    cfg = _cfg(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, 0] = torch.tensor([5.0, 4.9, 4.95, -9.0, -9.0, -9.0, -9.0, -9.0])
    x = torch.zeros(1, cfg.hidden_size)
    x[0, 0] = 1.0
    _, idx, _ = gate(x)
    # group 0 = {0,1} sums highest (5 + 4.9 vs 4.95 - 9); expert 2 (4.95) beats 1 but is in group 1
    assert sorted(idx[0].tolist()) == [0, 1]


def test_yarn_frequencies_match_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rs = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
          "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    cfg = nanoseek.ModelConfig.from_name("v3")
    hf_cfg = transformers.DeepseekV3Config(qk_rope_head_dim=64, rope_scaling=rs, max_position_embeddings=163840)
    inv_hf, amp_hf = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    inv, amp = rope_inv_freq(cfg)
    torch.testing.assert_close(inv, inv_hf.float(), rtol=1e-6, atol=0)
    assert amp == pytest.approx(amp_hf)
    # V3 softmax scale: 192^-0.5 * (0.1 ln 40 + 1)^2
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)


def test_mtp_logits_compose_and_are_causal():
    cfg = _cfg(num_nextn_predict_layers=2)
    model = build_model(cfg, seed=0).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(ids, return_mtp=True)
    assert len(out.mtp_logits) == 2 and all(t.shape == (2, 12, cfg.vocab_size) for t in out.mtp_logits)
    torch.testing.assert_close(out.logits, model(ids))
    # manual depth-1 composition: eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)]) -> layer -> shared head
    m1 = model.mtp[0]
    pos = torch.arange(12)
    cos, sin = model.model.rotary(pos)
    emb = model.model.embed_tokens(torch.nn.functional.pad(ids[:, 1:], (0, 1)))
    h1 = m1(out.hidden, emb, cos, sin)
    torch.testing.assert_close(out.mtp_logits[0], model.lm_head(m1.shared_head.norm(h1)))
    # depth k at position i sees tokens up to i+k: changing token 8 leaves depth-2 positions < 6 unchanged
    ids2 = ids.clone()
    ids2[:, 8] = (ids2[:, 8] + 1) % cfg.vocab_size
    out2 = model(ids2, return_mtp=True)
    torch.testing.assert_close(out2.mtp_logits[1][:, :6], out.mtp_logits[1][:, :6])
    assert (out2.mtp_logits[1][:, 6:9] - out.mtp_logits[1][:, 6:9]).abs().max() > 0


def test_compute_logits_false_returns_the_head_inputs():
    """Training with a fused head + loss skips the (B,T,V) logits: the output holds what lm_head would take."""
    cfg = _cfg(num_nextn_predict_layers=2)
    model = build_model(cfg, seed=0).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    full, lean = model(ids, return_mtp=True), model(ids, return_mtp=True, compute_logits=False)
    assert lean.logits is None and lean.mtp_logits == []
    torch.testing.assert_close(model.lm_head(lean.hidden), full.logits)
    for h, logits in zip(lean.mtp_hidden, full.mtp_logits, strict=True):
        torch.testing.assert_close(model.lm_head(h), logits)


def test_bf16_model_keeps_router_in_fp32_and_runs():
    model = build_model(_cfg(), seed=0, dtype=torch.bfloat16)
    gates = [m for m in model.modules() if isinstance(m, Gate)]
    assert gates and all(g.weight.dtype == torch.float32 for g in gates)
    assert all(g.e_score_correction_bias.dtype == torch.float32 for g in gates)
    assert model.lm_head.weight.dtype == torch.bfloat16
    logits = model(torch.randint(0, 512, (1, 8)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_autocast_bf16_close_to_fp32():
    model = build_model(_cfg(initializer_range=0.1), seed=0).eval()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(ids)
    assert (got.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_backward_reaches_every_trained_parameter():
    model = build_model(_cfg(num_nextn_predict_layers=1), seed=0)
    ids = torch.randint(0, 512, (2, 10))
    out = model(ids, return_mtp=True)
    (out.logits.sum() + out.mtp_logits[0].sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_complex_path_matches_pairwise_formula(dtype):
    """Eager apply_rope multiplies complex pairs; compiled code runs the pairwise formula. Same values, on
    contiguous inputs and on odd-offset slices (which complex views cannot take), with and without heads."""
    from nanoseek.model.rope import apply_rope

    g = torch.Generator().manual_seed(0)
    angles = torch.randn(7, 8, generator=g)
    cos, sin = angles.cos(), angles.sin()
    for x in (torch.randn(2, 7, 3, 35, generator=g)[..., 19:], torch.randn(2, 7, 3, 16, generator=g),
              torch.randn(2, 7, 21, generator=g)[..., 5:]):
        x = x.to(dtype)
        c, s = (cos.unsqueeze(-2), sin.unsqueeze(-2)) if x.dim() == 4 else (cos, sin)
        x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
        expected = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(dtype)
        got = apply_rope(x, cos, sin)
        assert got.dtype == dtype
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_rotate_pairs_into_keeps_apply_ropes_pairs_interleaved():
    """The fused MLA's rotation: apply_rope's values left in the input's interleaved order, written into even-
    and odd-offset outputs from even- and odd-offset inputs; its backward is autograd's through apply_rope."""
    from nanoseek.model.rope import apply_rope, rope_rotation, rotate_pairs_backward_into, rotate_pairs_into

    g = torch.Generator().manual_seed(0)
    angles = torch.randn(7, 8, generator=g)
    cos, sin = angles.cos(), angles.sin()
    rotation = rope_rotation(cos, sin).unsqueeze(-2)                                  # over 3 heads
    for x_off, out_off in [(0, 0), (19, 0), (0, 5), (19, 5)]:
        x = torch.randn(2, 7, 3, x_off + 16, generator=g)[..., x_off:].requires_grad_()
        out = torch.zeros(2, 7, 3, out_off + 16)[..., out_off:]
        rotate_pairs_into(out, x.detach(), rotation)
        ref = apply_rope(x, cos, sin)                                                  # de-interleaved
        torch.testing.assert_close(out[..., 0::2], ref[..., :8], atol=0, rtol=0)
        torch.testing.assert_close(out[..., 1::2], ref[..., 8:], atol=0, rtol=0)
        grad = torch.randn(2, 7, 3, 16, generator=g)                                  # of out (interleaved)
        (expected,) = torch.autograd.grad(ref, x, torch.cat([grad[..., 0::2], grad[..., 1::2]], dim=-1))
        back = torch.zeros(2, 7, 3, out_off + 16)[..., out_off:]
        torch.testing.assert_close(rotate_pairs_backward_into(back, grad, rotation), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("wants", [(True, True), (True, False), (False, True)])
def test_rmsnorm_training_op_matches_the_composite(wants):
    """With gradients on, full-precision RMSNorm runs one op with a closed-form backward; in fp64 its values and
    both gradients equal autograd through the plain composite to 1e-12, whichever inputs want gradients."""
    from nanoseek.model.norm import RMSNorm

    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(48, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48, generator=g, dtype=torch.float64) + 0.5)
    x = (torch.randn(3, 5, 48, generator=g, dtype=torch.float64) * 3).requires_grad_(wants[0])
    norm.weight.requires_grad_(wants[1])
    upstream = torch.randn(3, 5, 48, generator=g, dtype=torch.float64)
    inputs = [t for t in (x, norm.weight) if t.requires_grad]
    got_y = norm(x)
    got = torch.autograd.grad(got_y, inputs, upstream)
    with torch.no_grad():
        plain = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    with torch.enable_grad():                   # the composite, differentiated by autograd
        xr, wr = x.detach().requires_grad_(), norm.weight.detach().requires_grad_()
        ref_y = wr * (xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-6))
        ref = torch.autograd.grad(ref_y, [t for t, want in zip((xr, wr), wants) if want], upstream)
    torch.testing.assert_close(got_y.detach(), plain, atol=1e-12, rtol=0)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_compiled_cpu_fp32_experts_trace_and_match_eager():
    """Under torch.compile the CPU fp32 experts leave F.grouped_mm (whose meta kernel takes bf16/fp16 only in
    torch 2.14, so tracing it failed) and still match eager, gradients included."""
    cfg = _cfg(n_routed_experts=8, num_experts_per_tok=2)
    ex = _experts(cfg, seed=5)
    x = torch.randn(24, cfg.hidden_size, requires_grad=True)
    idx = torch.stack([torch.randperm(8)[:2] for _ in range(24)])
    w = torch.rand(24, 2)
    eager = ex(x, idx, w)
    (g_eager,) = torch.autograd.grad(eager.square().sum(), [x])
    torch._dynamo.reset()
    compiled = torch.compile(lambda v: ex(v, idx, w))(x)
    (g_compiled,) = torch.autograd.grad(compiled.square().sum(), [x])
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_compiled, g_eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("materialize", [False, True], ids=["flash", "kept-softmax"])
@pytest.mark.parametrize("overrides,batch_positions", [({}, False), ({}, True),
                                                       ({"q_lora_rank": 13, "kv_lora_rank": 12,
                                                         "qk_nope_head_dim": 9}, False),
                                                       ({"v_head_dim": 24}, False)])     # v as wide as q, k
def test_fused_mla_training_matches_the_modules(overrides, batch_positions, materialize, monkeypatch):
    """CPU fp32 training runs MLA as one op with a hand-written backward (model.mla_fused): its output and every
    gradient (the input and all seven weights) equal autograd over the modules (`FUSED_TRAINING` off), to 1e-6
    relative with SDPA's flash kernel inside (the module path's kernel: the same values), to 1e-5 with the kept
    softmax (a different summation order); with positions shared (T,) or per row (B,T), and with odd LoRA ranks
    and nope width (the rope columns at odd offsets). Without gradients, and for inputs it does not take, the
    module path runs."""
    from nanoseek.model import mla, mla_fused

    monkeypatch.setattr(mla_fused, "materialize_scores", lambda *dims: materialize)
    tol = 1e-5 if materialize else 1e-6

    torch.manual_seed(0)
    cfg = _cfg(**overrides)
    attn = mla.MLA(cfg, 0)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3) if p.dim() > 1 else torch.nn.init.uniform_(p, 0.5, 1.5)
    rotary = nanoseek.model.rope.RotaryEmbedding(cfg)
    B, T = 3, 10
    positions = torch.stack([torch.arange(T) + 2 * b for b in range(B)]) if batch_positions else torch.arange(T)
    cos, sin = rotary(positions)
    x = torch.randn(B, T, cfg.hidden_size, requires_grad=True)
    upstream = torch.randn(B, T, cfg.hidden_size)
    params = [x, *attn.parameters()]
    assert mla.fused_mla_supported(attn, x) and not mla.fused_mla_supported(attn.double(), x.double())
    attn.float()

    def run(fused):
        monkeypatch.setattr(mla, "FUSED_TRAINING", fused)
        y = attn(x, cos, sin)
        return y, torch.autograd.grad(y, params, upstream)

    (y_ref, ref), (y, got) = run(False), run(True)
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == "_FusedMLABackward"
    assert type(y_ref.grad_fn).__name__ != "_FusedMLABackward"
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol * y_ref.abs().max().item())
    for name, a, b in zip(["x", *(n for n, _ in attn.named_parameters())], got, ref):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item(), msg=name)
    monkeypatch.setattr(mla, "fused_mla", None)                         # inference: the module path
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin), y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [1, 10, 64, 65, 200, 300])
def test_causal_attention_kept_softmax_matches_float64(T):
    """The fused MLA's causal attention with the softmax kept (query blocks of 64 or 128 rows, each against the
    keys up to its end): output and dq, dk, dv equal autograd over the plain float64 masked softmax to fp32
    rounding, at lengths inside one block, on a block edge, one past it, and across several blocks."""
    from nanoseek.model.mla_fused import causal_attention_backward, causal_attention_forward

    torch.manual_seed(T)
    BH, d, dv, scale = 3, 12, 8, 12 ** -0.5
    q, k, v = torch.randn(BH, T, d), torch.randn(BH, T, d), torch.randn(BH, T, dv)
    do = torch.randn(BH, T, dv)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    s = (q64 @ k64.transpose(1, 2) * scale).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o64 = s.softmax(-1) @ v64
    ref = torch.autograd.grad(o64, (q64, k64, v64), do.double())
    # (B, nh) = (1, 3) heads; o and dq into strided views of (T, heads, width) buffers, as the fused op passes
    o, dq = torch.full((T, BH, dv), float("nan")), torch.full((T, BH, d), float("nan"))
    probs = causal_attention_forward(q[None], k[None], v[None], scale, out=o.transpose(0, 1)[None])
    dk, dv_ = causal_attention_backward(do[None], q[None], k[None], v[None], probs, scale, dq.transpose(0, 1)[None])
    got = dq.transpose(0, 1), dk[0], dv_[0]
    torch.testing.assert_close(o.transpose(0, 1), o64.float(), rtol=1e-5, atol=1e-5)
    for name, a, b in zip("qkv", got, ref):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5, msg=name)
