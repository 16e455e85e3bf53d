"""GRPO pieces against hand-computed values."""
import math

import pytest
import torch

from nanoseek.train.rl import group_advantages, informative_groups, k3_kl, policy_loss, token_logprobs


def test_group_advantages_grpo_and_dr_grpo():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    std = math.sqrt(0.5)                               # unbiased std of [1, 0]
    a = group_advantages(r, group_size=2)
    torch.testing.assert_close(a, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0]) / torch.tensor(
        [std + 1e-4] * 4 + [1e-4] * 2))
    torch.testing.assert_close(group_advantages(r, 2, scale_std=False), torch.tensor([.5, -.5, -.5, .5, 0., 0.]))
    assert informative_groups(r, 2).tolist() == [True, True, False]


def test_k3_kl_hand_value_and_zero_at_equality():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # exp(ln .5) - ln .5 - 1 = 0.5 + 0.693147 - 1
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([0.5 + math.log(2) - 1]))
    x = torch.tensor([-1.3, -0.2], requires_grad=True)
    kl = k3_kl(x, x.detach()).sum()
    kl.backward()
    assert kl.item() == 0 and x.grad.abs().max() == 0


def _batch():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float32)
    logp = torch.full((2, 3), -1.0)
    return logp, mask, torch.tensor([1.0, -2.0])


@pytest.mark.parametrize("loss_type, kw, expected", [
    ("grpo", {}, (-1.0 + 2.0) / 2),                      # per-sequence means -1 and 2
    ("bnpo", {}, (-2.0 + 6.0) / 5),                      # 5 real tokens
    ("dr_grpo", {"max_completion_length": 4}, 4.0 / (2 * 4)),
    ("dapo", {"num_tokens": 10}, 4.0 / 10),              # global token count
    ("dapo", {}, 4.0 / 5),
])
def test_aggregations_at_ratio_one(loss_type, kw, expected):
    logp, mask, adv = _batch()
    out = policy_loss(logp, logp, adv, mask, loss_type=loss_type, **kw)
    assert out.loss.item() == pytest.approx(expected)
    assert out.clip_low.item() == 0 and out.clip_high.item() == 0


def test_clipping_and_clip_higher():
    mask = torch.ones(3, 1)
    old = torch.zeros(3, 1)
    logp = torch.log(torch.tensor([[1.5], [0.5], [1.25]]))
    adv = torch.tensor([1.0, -1.0, 1.0])
    out = policy_loss(logp, old, adv, mask, loss_type="bnpo", eps_low=0.2)
    # token losses: -min(1.5, 1.2) = -1.2 ; -min(-0.5, -0.8) = 0.8 ; -min(1.25, 1.2) = -1.2
    assert out.loss.item() == pytest.approx((-1.2 + 0.8 - 1.2) / 3)
    assert out.clip_high.item() == pytest.approx(2 / 3) and out.clip_low.item() == pytest.approx(1 / 3)
    out = policy_loss(logp, old, adv, mask, loss_type="bnpo", eps_low=0.2, eps_high=0.28)
    assert out.loss.item() == pytest.approx((-1.28 + 0.8 - 1.25) / 3)   # 1.25 < 1.28: not clipped


def test_mu_one_gradient_equals_policy_gradient():
    """With old = current (one update per batch) the ratio is 1 and d loss / d logp = -A / |o_i| / S."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 3))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float32)
    adv = torch.tensor([0.7, -1.1])
    logp = token_logprobs(logits, tokens)
    out = policy_loss(logp, logp.detach(), adv, mask, loss_type="grpo")
    g1, = torch.autograd.grad(out.loss, logits, retain_graph=True)
    pg = -((adv[:, None] * logp * mask).sum(1) / mask.sum(1)).mean()      # REINFORCE with group baseline
    g2, = torch.autograd.grad(pg, logits)
    torch.testing.assert_close(g1, g2)


def test_beta_adds_kl_and_needs_reference():
    logp, mask, adv = _batch()
    ref = logp - 0.5
    out = policy_loss(logp, logp, adv, mask, loss_type="bnpo", beta=0.1, ref_logp=ref)
    kl = math.exp(-0.5) + 0.5 - 1
    assert out.kl.item() == pytest.approx(kl, rel=1e-6)
    assert out.loss.item() == pytest.approx(4.0 / 5 + 0.1 * kl, rel=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, logp, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        policy_loss(logp, logp, adv, mask, loss_type="ppo")


def test_token_logprobs_match_log_softmax():
    logits = torch.randn(2, 4, 9)
    tok = torch.randint(0, 9, (2, 4))
    ref = torch.log_softmax(logits, -1).gather(-1, tok[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, tok), ref)
