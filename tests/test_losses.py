"""Training losses and balancing rules against hand-computed values: CE with masks and global normalizers, MTP
target alignment, V3's sequence-wise balance loss, and the aux-loss-free bias update."""
import math

import pytest
import torch

from nanoseek.train.balance import expert_load, load_stats, update_bias
from nanoseek.train.losses import (cross_entropy, lm_loss, mtp_loss, mtp_targets, sequence_balance_loss,
                                   target_counts)


def test_cross_entropy_by_hand():
    logits = torch.tensor([[[0.0, 0.0, math.log(2.0)], [1.0, 0.0, 0.0]]])       # (1,2,3)
    targets = torch.tensor([[2, 1]])
    ce0 = -math.log(2 / 4)                                                      # softmax [1,1,2]/4 -> 2/4
    ce1 = -math.log(1 / (math.e + 2))
    assert cross_entropy(logits, targets).item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)
    mask = torch.tensor([[1, 0]])
    assert cross_entropy(logits, targets, mask).item() == pytest.approx(ce0, rel=1e-6)
    # a global normalizer: this batch holds 1 of 4 counted tokens
    assert cross_entropy(logits, targets, mask, normalizer=4).item() == pytest.approx(ce0 / 4, rel=1e-6)
    # bf16 logits are scored in fp32
    assert cross_entropy(logits.bfloat16(), targets).dtype == torch.float32


@pytest.mark.parametrize("chunk,workspace_chunks,onednn_head",
                         [(7, None, None), (256, None, None), (7, 2, True), (7, 2, False), (7, None, False)])
def test_fused_head_cross_entropy_matches_logits_path(chunk, workspace_chunks, onednn_head, monkeypatch):
    """`head_weight` fuses the vocabulary projection into the loss chunk by chunk (train.linear_ce): the same
    value and gradients as lm_head -> logits -> CE, with a mask, a global normalizer, an MTP depth, chunks that
    do not divide the rows, and bf16 autocast (where both sides round the matmuls to bf16). On x86 CPUs fp32
    runs the oneDNN path; `workspace_chunks` shrinks its gradient workspace to that many chunks, so its matmuls
    run per fill and dL/dW accumulates across fills; `onednn_head` picks that path's matmul library (oneDNN on
    AVX-512; MKL on AVX2, with logits in vocabulary blocks and the softmax in place: both are checked on any x86
    machine)."""
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 3, 11, 16, 97
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    head = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).long()
    mtp_hidden = [torch.randn(B, T, H, generator=g, requires_grad=True)]
    counts = target_counts(mask, 1) * 2                                   # another micro-batch holds as many
    from nanoseek.train import linear_ce
    if onednn_head is not None:
        monkeypatch.setattr(linear_ce, "onednn_fp32_head", lambda: onednn_head)
        monkeypatch.setattr(linear_ce, "VOCAB_BLOCK", 10)                 # blocks that do not divide V
    old = linear_ce.CHUNK_ROWS, linear_ce.CHUNK_ELEMENTS, linear_ce.WORKSPACE_BYTES
    linear_ce.CHUNK_ROWS, linear_ce.CHUNK_ELEMENTS = chunk, 0                # exactly `chunk` rows a chunk
    if workspace_chunks:
        linear_ce.WORKSPACE_BYTES = 4 * V * chunk * workspace_chunks
    try:
        for dtype, tol in [(None, 1e-5), (torch.bfloat16, 2e-2)]:
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                ref = lm_loss(hidden @ head.t() if dtype is None else torch.nn.functional.linear(hidden, head),
                              [torch.nn.functional.linear(mtp_hidden[0], head)], targets, mask, 0.3, counts)[0]
                got = lm_loss(hidden, mtp_hidden, targets, mask, 0.3, counts, head_weight=head)[0]
            assert got.dtype == ref.dtype
            torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
            params = [hidden, head, mtp_hidden[0]]
            for a, b in zip(torch.autograd.grad(got * 3, params), torch.autograd.grad(ref * 3, params)):
                assert a.abs().max() > 0
                torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())
        with torch.no_grad():                                              # no gradient work without autograd
            torch.testing.assert_close(cross_entropy(hidden, targets, mask, head_weight=head),
                                       cross_entropy(hidden @ head.t(), targets, mask))
    finally:
        linear_ce.CHUNK_ROWS, linear_ce.CHUNK_ELEMENTS, linear_ce.WORKSPACE_BYTES = old


@pytest.mark.parametrize("onednn_head", [True, False])
def test_fused_head_loss_stays_exact_when_the_target_probability_underflows(onednn_head, monkeypatch):
    """The CPU fp32 head scores a row as -log softmax[target]; where that probability is below what fp32 holds
    precisely (below 2^-100: a target logit ~70 below the row's logsumexp) the row's loss comes from
    logsumexp - logit instead. Checked on the row routine itself (fp32 against fp64 log-softmax) and through
    cross_entropy's fused path, both ways: logits kept (oneDNN) and overwritten in place, those rows' logits
    recomputed (MKL)."""
    from nanoseek.train import linear_ce
    g = torch.Generator().manual_seed(0)
    N, H, V = 6, 8, 64
    hidden = torch.randn(N, H, generator=g)
    head = torch.randn(V, H, generator=g) * 40                                    # logits spread over ~±300
    logits = hidden @ head.t()
    targets = logits.argmin(-1)                                                   # p[target] ~ exp(-300): 0 in fp32
    targets[0] = logits[0].argmax()                                               # and one ordinary row
    loss, grad = linear_ce._softmax_grad_(logits.clone(), targets[:, None], out=torch.empty(N, V))
    ref = -torch.log_softmax(logits.double(), -1).gather(1, targets[:, None])
    assert ref[1:].min() > 110                  # exp(-110) < 2^-149: these rows underflow in fp32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    onehot = torch.nn.functional.one_hot(targets, V)
    torch.testing.assert_close(grad, torch.softmax(logits, -1) - onehot, rtol=0, atol=1e-7)

    monkeypatch.setattr(linear_ce, "onednn_fp32_head", lambda: onednn_head)
    monkeypatch.setattr(linear_ce, "CHUNK_ROWS", 4)
    monkeypatch.setattr(linear_ce, "CHUNK_ELEMENTS", 0)                           # 4-row chunks: the CPU path
    h, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    got = cross_entropy(h[None], targets[None], head_weight=w)                    # (1,N,H): one sequence
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), ref.mean(), rtol=1e-6, atol=0)


def test_fused_head_stays_fp32_under_autocast_without_hardware_bf16(monkeypatch):
    """On a CPU without hardware bf16 the fused head ignores bf16 autocast (emulated bf16 matmuls run 1-12
    GFLOP/s): the loss and both gradients are bitwise the fp32 ones."""
    from nanoseek import hardware
    from nanoseek.train.linear_ce import linear_cross_entropy

    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(30, 16, generator=g, requires_grad=True)
    head = torch.randn(50, 16, generator=g, requires_grad=True)
    targets, rows = torch.randint(0, 50, (30,), generator=g), torch.rand(30, generator=g)
    ref = linear_cross_entropy(hidden, head, targets, rows)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, head, targets, rows)
    assert torch.equal(got, ref)
    for a, b in zip(torch.autograd.grad(got, [hidden, head]), torch.autograd.grad(ref, [hidden, head])):
        assert torch.equal(a, b)


def test_fused_head_passes_gradcheck_in_float64():
    """Finite differences against the hand-built gradients, over several chunks and with row weights; gradcheck
    runs backward repeatedly on one graph, so saved gradients must not be scaled in place."""
    from nanoseek.train.linear_ce import linear_cross_entropy

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, 6, dtype=torch.float64, generator=g, requires_grad=True)
    head = torch.randn(11, 6, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (40,), generator=g)
    rows = torch.rand(40, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy(h, w, targets, rows, chunk=16), (hidden, head))


def one_hot_logits(ids, V, scale=50.0):
    return torch.nn.functional.one_hot(ids, V).float() * scale


def test_mtp_targets_are_shifted_by_depth():
    # tokens t0..t5; inputs t0..t4, targets t1..t5. Depth k at position i predicts t_{i+k+1} = targets[:, i+k].
    tokens = torch.tensor([[10, 11, 12, 13, 14, 15]])
    targets = tokens[:, 1:]
    t1, m1 = mtp_targets(targets, None, 1)
    assert t1.tolist() == [[12, 13, 14, 15]] and m1.tolist() == [[1, 1, 1, 1]]
    t2, _ = mtp_targets(targets, None, 2)
    assert t2.tolist() == [[13, 14, 15]]


def test_mtp_loss_rewards_the_right_alignment_only():
    V, T = 20, 6
    tokens = torch.randint(0, V, (2, T + 1), generator=torch.Generator().manual_seed(0))
    targets = tokens[:, 1:]                                                      # (B,T)
    # A perfect depth-k predictor: position i puts all its mass on t_{i+k+1} (the last k positions: anything).
    perfect = []
    for k in (1, 2):
        ids = torch.cat([tokens[:, k + 1:], torch.zeros(2, k, dtype=torch.long)], dim=1)   # (B,T)
        perfect.append(one_hot_logits(ids, V))
    assert mtp_loss(perfect, targets).item() < 1e-6
    shifted = [one_hot_logits(targets, V)] * 2                                  # predicts t_{i+1}: wrong
    assert mtp_loss(shifted, targets).item() > 10
    assert mtp_loss([], targets).item() == 0.0


def test_micro_batch_pieces_sum_to_the_whole_step_loss():
    """With the step's global target counts, micro-batch losses add up to the full-batch loss exactly."""
    g = torch.Generator().manual_seed(1)
    B, T, V = 4, 7, 11
    logits, mtp = torch.randn(B, T, V, generator=g), [torch.randn(B, T, V, generator=g)]
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).long()
    whole, ce, m = lm_loss(logits, mtp, targets, mask, mtp_weight=0.3)
    assert whole.item() == pytest.approx(ce.item() + 0.3 * m.item(), rel=1e-6)
    counts = target_counts(mask, 1).tolist()
    assert counts == [mask.sum().item(), mask[:, 1:].sum().item()]
    halves = sum(lm_loss(logits[s], [mtp[0][s]], targets[s], mask[s], 0.3, counts)[0]
                 for s in (slice(0, 1), slice(1, 4)))
    assert halves.item() == pytest.approx(whole.item(), rel=1e-6)
    # ... whereas a mean of per-micro-batch means would not be (unequal token counts)
    naive = sum(lm_loss(logits[s], [mtp[0][s]], targets[s], mask[s], 0.3)[0] for s in (slice(0, 1), slice(1, 4)))
    assert abs(naive.item() / 2 - whole.item()) > 1e-3


def test_sequence_balance_loss_by_hand():
    # One sequence, T=2 tokens, E=2 experts, K=1.
    scores = torch.tensor([[[0.6, 0.2], [0.3, 0.3]]], requires_grad=True)
    # s' = [[0.75, 0.25], [0.5, 0.5]] -> P = [0.625, 0.375]
    balanced = torch.tensor([[[0], [1]]])        # f = E/(K T) * counts = [1, 1]
    assert sequence_balance_loss(scores, balanced).item() == pytest.approx(1.0)
    skewed = torch.tensor([[[0], [0]]])          # f = [2, 0]
    loss = sequence_balance_loss(scores, skewed)
    assert loss.item() == pytest.approx(2 * 0.625)
    loss.backward()                              # gradients through P only (f is a count)
    assert scores.grad is not None and torch.isfinite(scores.grad).all()
    # masking the second token: T=1, s' = [0.75, 0.25], f = [2, 0] -> 1.5
    assert sequence_balance_loss(scores, skewed, mask=torch.tensor([[1, 0]])).item() == pytest.approx(1.5)
    # two sequences average; a global normalizer divides the sum instead
    two = torch.cat([scores, scores]).detach()
    idx = torch.cat([balanced, skewed])
    assert sequence_balance_loss(two, idx).item() == pytest.approx((1.0 + 1.25) / 2)
    assert sequence_balance_loss(two, idx, normalizer=5).item() == pytest.approx((1.0 + 1.25) / 5)


def test_bias_update_follows_the_sign_of_the_load_error():
    bias = torch.zeros(4)
    load = torch.tensor([10.0, 2.0, 4.0, 0.0])   # mean 4: overloaded, under, exact, idle
    update_bias(bias, load, gamma=0.001)
    assert bias.tolist() == pytest.approx([-0.001, 0.001, 0.0, 0.001])
    update_bias(bias, torch.full((4,), 3.0), gamma=0.5)    # balanced: no change
    assert bias.tolist() == pytest.approx([-0.001, 0.001, 0.0, 0.001])


def test_expert_load_and_stats():
    idx = torch.tensor([[[0, 1], [0, 2]], [[0, 3], [3, 1]]])    # (B=2, T=2, K=2)
    assert expert_load(idx, 5).tolist() == [3, 2, 1, 2, 0]
    mask = torch.tensor([[1, 1], [0, 1]])
    assert expert_load(idx, 5, mask).tolist() == [2, 2, 1, 1, 0]
    ratio, vio = load_stats(torch.tensor([3.0, 2.0, 1.0, 2.0, 0.0]))
    assert ratio == 3.0                            # the idle expert counts as one token
    assert vio == pytest.approx(3 / 1.6 - 1)       # MaxVio = max / mean - 1
    assert load_stats(torch.full((4,), 7.0)) == (1.0, 0.0)
