"""Logit parity against transformers' DeepseekV3/DeepseekV2 on random tiny configs, through the real checkpoint
path (transformers save_pretrained -> nanoseek.load_model). Tolerance: fp32 max abs diff <= 1e-4 on logits of
magnitude O(1) (weights are re-drawn with unit-scale std so routing and attention are far from uniform).
Both attention paths and incremental decoding through the latent cache are checked against the same reference.
"""
import math

import pytest
import torch

import nanoseek
from nanoseek.model import LatentCache

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
VOCAB = 96
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16,
            n_shared_experts=1, num_experts_per_tok=2, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16, max_position_embeddings=512)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1}

CASES = {
    # q_lora, YaRN with distinct mscale/mscale_all_dim, group-limited noaux_tc (top-2 of 8 allowed experts),
    # random partly negative balancing bias.
    "v3_qlora_yarn_grouped": ("v3", dict(q_lora_rank=24, n_group=4, topk_group=2,
                                         rope_scaling={**YARN, "mscale": 0.9, "mscale_all_dim": 0.8})),
    # no q_lora, plain RoPE, two dense-first layers, single group.
    "v3_noqlora_dense2": ("v3", dict(q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=2,
                                     num_experts_per_tok=4)),
    # V3's own YaRN (mscale = mscale_all_dim = 1), no renormalization, 3 dense-first of 4 layers, 2 shared.
    "v3_nonorm_dense3": ("v3", dict(q_lora_rank=16, n_group=8, topk_group=3, num_experts_per_tok=3,
                                    norm_topk_prob=False, routed_scaling_factor=1.0, num_hidden_layers=4,
                                    first_k_dense_replace=3, n_shared_experts=2,
                                    rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0})),
    # V2-Lite shape: softmax scores, greedy top-k, no q_lora, YaRN 0.707.
    "v2_greedy": ("v2", dict(q_lora_rank=None, topk_method="greedy", num_experts_per_tok=6, n_shared_experts=2,
                             norm_topk_prob=False, routed_scaling_factor=1.0,
                             rope_scaling={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707})),
    # V2 (236B shape): group-limited greedy (group score = max), q_lora, scaled weights.
    "v2_group_limited": ("v2", dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                    num_experts_per_tok=3, norm_topk_prob=False, routed_scaling_factor=16.0)),
    # V3 with a high bias spread, so the bias changes the selection but not the weights; no YaRN; 1 expert/token.
    "v3_bias_dominant": ("v3", dict(q_lora_rank=32, n_group=2, topk_group=1, num_experts_per_tok=1,
                                    first_k_dense_replace=0)),
}


def _randomize(model, seed, bias_scale):
    """Unit-scale random weights (1/sqrt(fan_in)), norms near 1, a random partly negative balancing bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(bias_scale * torch.randn(b.shape, generator=g))


def _hf_model(family, overrides, seed=0):
    kw = {**BASE, **overrides}
    if family == "v3":
        cfg = transformers.DeepseekV3Config(**kw, num_nextn_predict_layers=0)   # transformers drops MTP weights
        model = transformers.DeepseekV3ForCausalLM(cfg)
    else:
        cfg = transformers.DeepseekV2Config(**kw)
        model = transformers.DeepseekV2ForCausalLM(cfg)
    _randomize(model, seed, bias_scale=0.5 if overrides.get("num_experts_per_tok") == 1 else 0.1)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    hf = _hf_model(family, overrides)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ours = nanoseek.load_model(path, dtype=torch.float32)
    return request.param, hf, ours


def _ids(B=2, T=48, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_match_transformers_both_paths(pair):
    name, hf, ours = pair
    ids = _ids()
    ref = hf(ids).logits
    assert ref.abs().max() > 1.0, "reference logits should be O(1), or the tolerance means little"
    expanded, absorbed = ours(ids), ours(ids, absorb=True)
    assert expanded.shape == ref.shape == (2, 48, VOCAB)
    assert (expanded - ref).abs().max() <= ATOL, name
    assert (absorbed - ref).abs().max() <= ATOL, name


def test_training_gradients_match_transformers(pair):
    """The training path (gradients on: fused down-projections, ExpertLoop, the RMSNorm op, the fused head + CE)
    against transformers' autograd on the same next-token loss: every parameter's gradient, fp32, to 1e-4 of its
    largest entry, with an absolute floor of 1e-7."""
    from nanoseek.train.losses import cross_entropy

    name, hf, ours = pair
    ids = _ids(seed=3)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    ref_loss = cross_entropy(hf(inputs).logits, targets)
    got_loss = cross_entropy(ours(inputs, compute_logits=False).hidden, targets, head_weight=ours.lm_head.weight)
    torch.testing.assert_close(got_loss, ref_loss, atol=1e-5, rtol=1e-5)
    ref_grads = dict(zip([n for n, _ in hf.named_parameters()], torch.autograd.grad(ref_loss, list(hf.parameters()))))
    got = dict(ours.named_parameters())
    for n, g in zip(got, torch.autograd.grad(got_loss, list(got.values()), allow_unused=True)):
        ref = ref_grads[n]
        g = torch.zeros_like(ref) if g is None else g
        # floor: a top-1 renormalized router's gradient is exactly zero in exact arithmetic; what both sides
        # compute is rounding noise (seen up to ~1e-8), whose size depends only on the order of the float ops
        assert (g - ref).abs().max() <= 1e-4 * max(ref.abs().max().item(), 1e-3), (name, n)


@torch.no_grad()
def test_incremental_decoding_through_latent_cache_matches_full_forward(pair):
    name, hf, ours = pair
    ids = _ids(T=40, seed=2)
    ref = hf(ids).logits
    cfg = ours.config
    cache = LatentCache(cfg, batch_size=2, max_len=64, num_layers=cfg.num_hidden_layers)
    chunks = [ours(ids[:, :16], cache=cache)]                       # prefill, expanded path
    chunks.append(ours(ids[:, 16:24], cache=cache))                 # chunked prefill over a cached prefix
    for t in range(24, 40):                                         # decode, absorbed path, one token at a time
        chunks.append(ours(ids[:, t:t + 1], cache=cache, absorb=True))
    got = torch.cat(chunks, dim=1)
    assert cache.length == 40
    assert (got - ref).abs().max() <= ATOL, name
    # the cache holds only the latent: kv_lora_rank + qk_rope_head_dim values per token per layer
    assert cache.data.shape[-1] == cfg.kv_lora_rank + cfg.qk_rope_head_dim


@pytest.mark.parametrize("name", [n for n in sorted(CASES) if CASES[n][0] == "v3"])
@torch.no_grad()
def test_selection_bias_changes_routing(name, tmp_path):
    """Guard against a vacuous bias test: with the bias zeroed, V3 outputs must differ."""
    hf = _hf_model(*CASES[name])
    hf.save_pretrained(tmp_path)
    ours = nanoseek.load_model(tmp_path)
    ids = _ids(T=16, seed=3)
    before = ours(ids)
    for g in _gates(ours):
        assert g.e_score_correction_bias.abs().max() > 0      # the checkpoint's bias was loaded
        g.e_score_correction_bias.zero_()
    assert (ours(ids) - before).abs().max() > 1e-3


def _gates(model):
    from nanoseek.model.moe import Gate
    return [m for m in model.modules() if isinstance(m, Gate)]
