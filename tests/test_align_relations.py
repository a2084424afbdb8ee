"""trd_loss, relation_matrices: chunked == unchunked, reductions, hinge, hand cases, bad input."""

import pytest
import torch
import torch.nn.functional as F

from gendistill.core.align import relation_matrices, trd_loss, trd_loss_reference


def _pair(B=2, T=3, N=5, Ds=8, Dt=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # varied token norms so the normalization gradient matters
    s = torch.randn(B, T, N, Ds, generator=g, dtype=dtype) * (0.5 + 2 * torch.rand(B, T, N, 1, generator=g, dtype=dtype))
    t = torch.randn(B, T, N, Dt, generator=g, dtype=dtype)
    return s.requires_grad_(), t.requires_grad_()


def _value_and_grads(fn, s, t):
    loss = fn(s, t)
    gs, gt = torch.autograd.grad(loss, [s, t])
    return loss.detach(), gs, gt


@pytest.mark.parametrize("reduction", ["joint", "paper"])
@pytest.mark.parametrize("chunk", [1, 4, 7, 15, 16, 1000])
def test_chunked_matches_unchunked(reduction, chunk):
    s, t = _pair(B=2, T=3, N=5)  # T*N = 15: 4 and 7 do not divide it
    ref = _value_and_grads(lambda a, b: trd_loss_reference(a, b, margin=0.05, reduction=reduction), s, t)
    got = _value_and_grads(lambda a, b: trd_loss(a, b, margin=0.05, reduction=reduction, chunk_size=chunk), s, t)
    assert ref[0] > 0
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["joint", "paper"])
def test_chunked_matches_unchunked_larger(reduction):
    s, t = _pair(B=1, T=4, N=37, Ds=24, Dt=16, seed=3)
    ref = _value_and_grads(lambda a, b: trd_loss_reference(a, b, reduction=reduction), s, t)
    for chunk in (10, 64, 148):
        got = _value_and_grads(lambda a, b: trd_loss(a, b, reduction=reduction, chunk_size=chunk), s, t)
        for r, g in zip(ref, got):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_auto_chunk_is_dense_when_small_and_agrees():
    s, t = _pair(B=1, T=2, N=4)
    torch.testing.assert_close(trd_loss(s, t), trd_loss_reference(s, t), rtol=0, atol=0)


def test_auto_chunk_on_larger_input_agrees():
    from gendistill.core.align.relations import _auto_chunk_size

    s, t = _pair(B=1, T=2, N=550, Ds=4, Dt=3)  # 1100^2 entries: above the dense limit
    assert _auto_chunk_size(1, 1100) is not None and _auto_chunk_size(1, 13 * 1350) == 238
    ref = _value_and_grads(lambda a, b: trd_loss_reference(a, b), s, t)
    got = _value_and_grads(lambda a, b: trd_loss(a, b), s, t)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_chunked_teacher_without_grad_and_backward_scaling():
    s, t = _pair()
    t = t.detach()
    (3.0 * trd_loss(s, t, chunk_size=4)).backward()
    ref = torch.autograd.grad(3.0 * trd_loss_reference(s, t), s)[0]
    torch.testing.assert_close(s.grad, ref, rtol=1e-5, atol=1e-6)


def test_retain_graph_backward_twice_accumulates():
    s, t = _pair()
    loss = trd_loss(s, t.detach(), chunk_size=4)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * first)


def test_zero_token_gradient_matches_normalize():
    s, t = _pair(B=1, T=2, N=3)
    s = s.detach().clone()
    s[0, 0, 1] = 0.0
    s.requires_grad_()
    ref = torch.autograd.grad(trd_loss_reference(s, t), s)[0]
    got = torch.autograd.grad(trd_loss(s, t, chunk_size=2), s)[0]
    torch.testing.assert_close(got / ref.abs().max(), ref / ref.abs().max(), rtol=1e-5, atol=1e-6)


def _paper_by_loops(s, t, margin):
    """Direct loop over frame pairs, straight from the definition."""
    x, y = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    B, T = s.shape[:2]
    spatial, temporal = [], []
    for b in range(B):
        for i in range(T):
            for j in range(T):
                h = F.relu((x[b, i] @ x[b, j].T - y[b, i] @ y[b, j].T).abs() - margin)
                (spatial if i == j else temporal).append(h.mean())
    total = torch.stack(spatial).mean()
    return total + torch.stack(temporal).mean() if temporal else total


@pytest.mark.parametrize("T", [1, 2, 3])
@pytest.mark.parametrize("chunk", [None, 3, 5])
def test_paper_equals_frame_loop(T, chunk):
    s, t = _pair(B=2, T=T, N=4, seed=T)
    s64, t64 = s.detach().double(), t.detach().double()
    expected = _paper_by_loops(s64, t64, 0.05)
    got = trd_loss(s, t, margin=0.05, reduction="paper", chunk_size=chunk)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)


def test_joint_equals_released_formula():
    """relu(|S_s - S_t| - m).mean() over B x TN x TN, diagonal included (VideoREPA's code)."""
    s, t = _pair(B=2, T=3, N=4)
    x = F.normalize(s.detach().flatten(1, 2), dim=-1)
    y = F.normalize(t.detach().flatten(1, 2), dim=-1)
    expected = F.relu((torch.bmm(x, x.transpose(1, 2)) - torch.bmm(y, y.transpose(1, 2))).abs() - 0.1).mean()
    for chunk in (None, 5):
        torch.testing.assert_close(trd_loss(s, t, chunk_size=chunk), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("reduction", ["joint", "paper"])
def test_margin_is_a_hinge(chunk, reduction):
    s, _ = _pair(B=1, T=2, N=3)
    # teacher = student rotated: identical relations, loss exactly 0 for any margin
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))
    t = (s.detach() @ q).requires_grad_()
    loss = trd_loss(s, t, margin=0.1, reduction=reduction, chunk_size=chunk)
    gs, gt = torch.autograd.grad(loss, [s, t])
    assert loss.item() == 0.0
    assert gs.abs().max().item() == 0.0 and gt.abs().max().item() == 0.0
    # relations that differ by at most the margin also cost nothing
    S_s, S_t = relation_matrices(s, _pair(B=1, T=2, N=3, seed=9)[0])
    max_gap = (S_s - S_t).abs().max().item()
    s2 = _pair(B=1, T=2, N=3, seed=9)[0]
    loss = trd_loss(s, s2, margin=max_gap + 1e-3, reduction=reduction, chunk_size=chunk)
    assert loss.item() == 0.0
    assert torch.autograd.grad(loss, s)[0].abs().max().item() == 0.0
    # and just below the largest gap, it does not
    assert trd_loss(s, s2, margin=max_gap - 1e-2, reduction=reduction, chunk_size=chunk).item() > 0.0


@pytest.mark.parametrize("chunk", [None, 4])
def test_invariant_to_token_scaling(chunk):
    s, t = _pair()
    scale = torch.rand(2, 3, 5, 1) * 10 + 0.1
    a = trd_loss(s, t, chunk_size=chunk)
    b = trd_loss(s * scale, t * 7.0, chunk_size=chunk)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_tiny_hand_computed_case():
    # one frame, two tokens: student cosine 0 (orthogonal), teacher cosine 1 (parallel)
    s = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]]])  # [1, 1, 2, 2]
    t = torch.tensor([[[[3.0], [1.0]]]])  # [1, 1, 2, 1]
    # relation matrices [[1, 0], [0, 1]] vs [[1, 1], [1, 1]]: |diff| = [[0, 1], [1, 0]]
    # hinge with margin 0.25: [[0, .75], [.75, 0]] -> mean 0.375
    for chunk in (None, 1, 2):
        assert trd_loss(s, t, margin=0.25, chunk_size=chunk).item() == pytest.approx(0.375)
        # "paper" with T = 1: spatial term only
        assert trd_loss(s, t, margin=0.25, reduction="paper", chunk_size=chunk).item() == pytest.approx(0.375)
    S_s, S_t = relation_matrices(s, t)
    torch.testing.assert_close(S_s, torch.eye(2)[None])
    torch.testing.assert_close(S_t, torch.ones(1, 2, 2))


def test_hand_computed_paper_two_frames():
    # T = 2, N = 1, 1-D tokens: student +1, -1 (cosine -1 across); teacher +1, +1 (cosine 1)
    s = torch.tensor([1.0, -1.0]).reshape(1, 2, 1, 1)
    t = torch.tensor([2.0, 5.0]).reshape(1, 2, 1, 1)
    # spatial pairs: diagonal only, |1-1| = 0; temporal pairs: |-1 - 1| = 2 -> hinge 1.9
    assert trd_loss(s, t, reduction="paper").item() == pytest.approx(1.9)
    # joint: [[0, 1.9], [1.9, 0]] averaged over 4 entries
    assert trd_loss(s, t, reduction="joint").item() == pytest.approx(0.95)


def test_bf16_and_autocast_compute_in_float32():
    s, t = _pair(B=1, T=2, N=6)
    ref = trd_loss(s, t)
    sb = s.detach().bfloat16().requires_grad_()
    for chunk in (None, 5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = trd_loss(sb, t.detach().bfloat16(), chunk_size=chunk)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, ref, rtol=0.05, atol=1e-3)
        (g,) = torch.autograd.grad(loss, sb)
        assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()


def test_relation_matrices_layout():
    s, t = _pair(B=1, T=2, N=3)
    S_s, S_t = relation_matrices(s, t)
    assert S_s.shape == S_t.shape == (1, 6, 6)
    x = F.normalize(s.detach(), dim=-1)
    # index t*N + n is token n of frame t
    assert S_s[0, 1 * 3 + 2, 0 * 3 + 1].item() == pytest.approx((x[0, 1, 2] @ x[0, 0, 1]).item(), abs=1e-6)
    torch.testing.assert_close(torch.diagonal(S_t, dim1=1, dim2=2), torch.ones(1, 6))


@pytest.mark.parametrize(
    "s_shape, t_shape, message",
    [
        ((1, 13, 1350, 4), (1, 13, 1200, 4), "student has 1350 tokens per frame, teacher 1200"),
        ((1, 13, 6, 4), (1, 12, 6, 4), "student has 13 frames, teacher 12"),
        ((2, 3, 6, 4), (1, 3, 6, 4), "student has batch size 2, teacher 1"),
        ((3, 6, 4), (1, 3, 6, 4), r"student must be \[B, T, N, D\]"),
        ((1, 3, 6, 4), (1, 3, 6, 4, 1), r"teacher must be \[B, T, N, D\]"),
    ],
)
def test_shape_errors_name_the_mismatch(s_shape, t_shape, message):
    with pytest.raises(ValueError, match=message):
        trd_loss(torch.randn(s_shape), torch.randn(t_shape))
    with pytest.raises(ValueError, match=message):
        relation_matrices(torch.randn(s_shape), torch.randn(t_shape))


@pytest.mark.parametrize("chunk", [None, 3])
def test_nan_features_raise(chunk):
    s, t = _pair()
    s = s.detach().clone()
    s[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="student features contain 1 NaN"):
        trd_loss(s, t, chunk_size=chunk)
    t = t.detach().clone()
    t[1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        trd_loss(s.nan_to_num(), t, chunk_size=chunk)


def test_bad_arguments():
    s, t = _pair()
    with pytest.raises(ValueError, match="reduction must be one of .*'mean'"):
        trd_loss(s, t, reduction="mean")
    with pytest.raises(ValueError, match="chunk_size"):
        trd_loss(s, t, chunk_size=0)
    with pytest.raises(ValueError, match="margin"):
        trd_loss(s, t, margin=-0.1)
    with pytest.raises(ValueError, match="float tensor"):
        trd_loss(torch.ones(1, 2, 3, 4, dtype=torch.long), t)
