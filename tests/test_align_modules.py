"""repa_loss, Projector, grid resampling and GridAligner."""

import math

import pytest
import torch
import torch.nn.functional as F

from gendistill.core.align import GridAligner, Projector, grid_to_tokens, repa_loss, resample_grid, tokens_to_grid


def test_repa_loss_hand_computed():
    s = torch.tensor([[[1.0, 0.0], [0.0, 3.0]], [[1.0, 1.0], [2.0, 0.0]]])  # [2, 2, 2]
    t = torch.tensor([[[2.0, 0.0], [0.0, -1.0]], [[1.0, 0.0], [0.0, 5.0]]])
    # cosines: 1, -1, 1/sqrt(2), 0 -> loss = -mean
    expected = -(1.0 - 1.0 + 1.0 / math.sqrt(2.0) + 0.0) / 4.0
    assert repa_loss(s, t).item() == pytest.approx(expected, abs=1e-6)
    assert repa_loss(s.reshape(4, 2), t.reshape(4, 2)).item() == pytest.approx(expected, abs=1e-6)
    assert repa_loss(s, s * 4.0).item() == pytest.approx(-1.0, abs=1e-6)


def test_repa_loss_gradient_and_errors():
    s = torch.randn(2, 5, 8, requires_grad=True)
    t = torch.randn(2, 5, 8)
    repa_loss(s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    with pytest.raises(ValueError, match="student has width 8, teacher 6"):
        repa_loss(s, torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match=r"student has shape \(2, 5, 8\), teacher \(2, 4, 8\)"):
        repa_loss(s, torch.randn(2, 4, 8))
    bad = t.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="teacher features contain 1 NaN"):
        repa_loss(s, bad)


def test_projector_layout_and_shapes():
    p = Projector(32, 12, hidden=64)
    assert [k for k in p.state_dict()] == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert isinstance(p[1], torch.nn.SiLU) and isinstance(p[3], torch.nn.SiLU)
    assert p[0].weight.shape == (64, 32) and p[2].weight.shape == (64, 64) and p[4].weight.shape == (12, 64)
    for shape in [(3, 32), (2, 7, 32), (1, 13, 5, 9, 32)]:
        assert p(torch.randn(shape)).shape == shape[:-1] + (12,)
    assert Projector(8, 4)[0].out_features == 2048  # REPA / VideoREPA default
    x = torch.randn(2, 32)
    expected = p[4](F.silu(p[2](F.silu(p[0](x)))))
    torch.testing.assert_close(p(x), expected)
    with pytest.raises(ValueError, match=r"Projector expects \[..., 32\]"):
        p(torch.randn(2, 31))
    with pytest.raises(ValueError, match="hidden"):
        Projector(8, 4, hidden=0)


def test_heads_save_and_load_back_as_diffusers_models(tmp_path):
    p = Projector(32, 12, hidden=64)
    p.save_pretrained(tmp_path / "projector")
    q = Projector.from_pretrained(tmp_path / "projector")
    x = torch.randn(3, 32)
    assert (q.d_in, q.d_out, q.hidden) == (32, 12, 64) and torch.equal(q(x), p(x))
    a = GridAligner(4, 6, kernel_size=(2, 3), drop_first_frame=True)
    a.save_pretrained(tmp_path / "aligner")
    b = GridAligner.from_pretrained(tmp_path / "aligner")
    g = torch.randn(1, 5, 8, 9, 4)
    assert b.kernel_size == (2, 3) and b.drop_first_frame and torch.equal(b(g, (8, 4, 3)), a(g, (8, 4, 3)))


def _videorepa_reference(aligner, x):
    """The released code's order: drop frame 0, trilinear x2 in time, then the 3x3/3 conv per frame."""
    a = x[:, 1:].permute(0, 4, 1, 2, 3)  # B, C, F, H, W
    a = F.interpolate(a, scale_factor=(2.0, 1.0, 1.0), mode="trilinear")
    B, C, Fr, H, W = a.shape
    a = a.permute(0, 2, 1, 3, 4).reshape(B * Fr, C, H, W)
    a = aligner.conv(a)
    return a.reshape(B, Fr, -1, H // 3, W // 3).permute(0, 1, 3, 4, 2)


def test_conv_aligner_matches_released_videorepa_path():
    torch.manual_seed(0)
    aligner = GridAligner(16, mode="conv", drop_first_frame=True)
    assert aligner.conv.kernel_size == (3, 3) and aligner.conv.stride == (3, 3)
    x = torch.randn(1, 13, 30, 45, 16)  # CogVideoX-2B at 49 x 480 x 720, width cut for speed
    got = aligner(x, (24, 10, 15))
    torch.testing.assert_close(got, _videorepa_reference(aligner, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "student, teacher",
    [
        ((13, 30, 45), (24, 10, 15)),
        ((9, 31, 17), (16, 10, 5)),  # odd sizes: resized before the conv
        ((5, 8, 8), (5, 16, 12)),  # teacher larger than student
        ((2, 7, 11), (1, 3, 3)),
        ((1, 4, 4), (3, 2, 2)),
    ],
)
@pytest.mark.parametrize("mode", ["conv", "area", "bilinear", "nearest"])
def test_aligner_shapes(student, teacher, mode):
    drop = student[0] > 1
    d_t = 6 if mode == "conv" else None
    aligner = GridAligner(4, d_t, mode=mode, drop_first_frame=drop)
    x = torch.randn(2, *student, 4)
    out = aligner(x, teacher)
    assert out.shape == (2, *teacher, 6 if mode == "conv" else 4)
    assert aligner(x, (2, *teacher, 99)).shape == out.shape  # a full teacher shape works too


def test_conv_gradients_reach_weights():
    aligner = GridAligner(4, 6, kernel_size=(2, 3))
    x = torch.randn(1, 5, 9, 14, 4, requires_grad=True)
    aligner(x, (7, 4, 4)).square().mean().backward()
    assert aligner.conv.weight.grad is not None and aligner.conv.weight.grad.abs().sum() > 0
    assert aligner.conv.bias.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def test_resample_grid_values():
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6, 1)
    # area: 2x2 mean pooling
    out = resample_grid(x, (2, 2, 3), spatial="area")
    torch.testing.assert_close(out[0, 0, 0, 0, 0], x[0, 0, :2, :2, 0].mean())
    # linear in time, align_corners=False: 2 -> 4 frames gives weights 1, .75/.25, .25/.75, 1
    t = torch.tensor([0.0, 4.0]).reshape(1, 2, 1, 1, 1)
    got = resample_grid(t, (4, 1, 1), temporal="linear").flatten()
    torch.testing.assert_close(got, torch.tensor([0.0, 1.0, 3.0, 4.0]))
    # same as the released trilinear upsampling (scale (2, 1, 1))
    y = torch.randn(2, 6, 5, 7, 3)
    ref = F.interpolate(y.permute(0, 4, 1, 2, 3), scale_factor=(2.0, 1.0, 1.0), mode="trilinear").permute(0, 2, 3, 4, 1)
    torch.testing.assert_close(resample_grid(y, (12, 5, 7)), ref, rtol=1e-6, atol=1e-6)
    # drop_first_frame and identity
    torch.testing.assert_close(resample_grid(y, (5, 5, 7), drop_first_frame=True), y[:, 1:])
    # bilinear both ways equals torch's interpolate per frame
    ref = F.interpolate(y.flatten(0, 1).permute(0, 3, 1, 2), size=(3, 4), mode="bilinear", align_corners=False)
    got = resample_grid(y, (6, 3, 4), spatial="bilinear")
    torch.testing.assert_close(got, ref.permute(0, 2, 3, 1).reshape(2, 6, 3, 4, 3))


def test_order_of_time_and_space_does_not_matter():
    # time downsampling runs first, upsampling runs after space: both equal the two-step result
    y = torch.randn(1, 8, 6, 6, 2)
    for frames in (3, 16):
        got = resample_grid(y, (frames, 2, 2), spatial="area")
        step = resample_grid(resample_grid(y, (8, 2, 2), spatial="area"), (frames, 2, 2))
        torch.testing.assert_close(got, step, rtol=1e-5, atol=1e-6)


def test_tokens_grid_round_trip():
    tokens = torch.randn(2, 3 * 4 * 5, 7)
    grid = tokens_to_grid(tokens, (3, 4, 5))
    assert grid.shape == (2, 3, 4, 5, 7)
    assert torch.equal(grid[1, 2, 3, 4], tokens[1, 2 * 20 + 3 * 5 + 4])
    assert grid_to_tokens(grid).shape == (2, 3, 20, 7)
    with pytest.raises(ValueError, match=r"tokens must be \[B, 3\*4\*6=72, D\]"):
        tokens_to_grid(tokens, (3, 4, 6))


def test_grid_errors():
    with pytest.raises(ValueError, match="spatial must be one of"):
        resample_grid(torch.randn(1, 2, 3, 3, 1), (2, 2, 2), spatial="bicubic")
    with pytest.raises(ValueError, match="drop_first_frame needs at least 2 frames"):
        resample_grid(torch.randn(1, 1, 3, 3, 1), (1, 2, 2), drop_first_frame=True)
    with pytest.raises(ValueError, match="student grid has batch size 2, teacher 3"):
        GridAligner(4)(torch.randn(2, 3, 6, 6, 4), (3, 3, 2, 2, 4))
    with pytest.raises(ValueError, match=r"student grid must be \[B, F, h, w, 4\]"):
        GridAligner(4)(torch.randn(2, 3, 6, 6, 5), (3, 2, 2))
    with pytest.raises(ValueError, match="keeps the width"):
        GridAligner(4, 8, mode="area")
    with pytest.raises(ValueError, match="mode must be one of"):
        GridAligner(4, mode="pixelshuffle")
    with pytest.raises(ValueError, match="positive ints"):
        resample_grid(torch.randn(1, 2, 3, 3, 1), (2, 0, 2))
