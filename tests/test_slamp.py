"""SLaMP: latent mixing keeps the background, controllers reduce to exact paths."""

import pytest
import torch

from gendistill.core.guidance import load_guidance
from gendistill.splat_edit import SLaMPConfig, mix_latents, mixing_weight, slamp_edit
from gendistill.testing.diffusion import tiny_ip2p_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline

H = 32


@pytest.fixture(scope="module", params=["sd", "sd_v", "sd3"])
def guidance(request):
    pipe = {"sd": tiny_sd_pipeline, "sd_v": lambda: tiny_sd_pipeline("v_prediction"),
            "sd3": tiny_sd3_pipeline}[request.param]()
    return load_guidance(pipe)


def _view(batch=2):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, H, H, generator=g)
    mask = torch.zeros(batch, 1, H, H)
    mask[:, :, 8:20, 10:26] = 1
    return images, mask


def test_alpha_last_one_restores_background(guidance):
    images, mask = _view()
    config = SLaMPConfig(num_steps=4, t_s=1, alpha_base=0.5, alpha_last=1.0, guidance_scale=5.0)
    out = slamp_edit(guidance, images, mask, "a golden part", config=config,
                     generator=torch.Generator().manual_seed(1))
    assert out.images.shape == images.shape and 0 <= out.images.min() and out.images.max() <= 1
    m = guidance.latent_mask(mask, 2, out.latents.shape[-2:])
    outside = (m == 0).expand_as(out.latents)
    assert torch.equal(out.latents[outside], out.original_latents[outside])
    assert (out.latents - out.original_latents)[~outside].abs().max() > 1e-3  # the part did change
    expected_z0 = guidance.encode_images(images, sample=False)
    torch.testing.assert_close(out.original_latents, expected_z0)


def test_controllers_give_exact_round_trip(guidance):
    """gamma = 1 inverts along the straight path to the noise; eta = 1 throughout comes back."""
    images, _ = _view(1)
    config = SLaMPConfig(num_steps=3, gamma=1.0, eta=1.0, eta_stop=1.0, t_s=0)
    y1 = torch.randn(1, 4, H // 2, H // 2, generator=torch.Generator().manual_seed(2))
    out = slamp_edit(guidance, images, None, "anything", config=config, generator=torch.Generator().manual_seed(2))
    if guidance.kind == "rfds":  # sigma_K = 1
        expected = y1
    else:  # DDIM ends at t = N - 1, alpha_bar > 0
        a = guidance.alphas_cumprod[-1]
        expected = a.sqrt() * out.original_latents + (1 - a).sqrt() * y1
    torch.testing.assert_close(out.inverted, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.latents, out.original_latents, rtol=1e-4, atol=1e-4)


def test_mixing_schedule_and_config_errors():
    assert [mixing_weight(i, 6, 0.3, 1.0, 2) for i in range(6)] == [0.3, 0.3, 0.3, 0.3, 1.0, 1.0]
    z, zo = torch.full((1, 1, 2, 2), 2.0), torch.zeros(1, 1, 2, 2)
    m = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])
    torch.testing.assert_close(mix_latents(z, zo, m, 0.5), torch.tensor([[[[2.0, 1.0], [1.5, 1.0]]]]))
    with pytest.raises(ValueError, match="t_s must be in"):
        SLaMPConfig(num_steps=4, t_s=5)
    with pytest.raises(ValueError, match="alpha_last must be in"):
        SLaMPConfig(alpha_last=1.5)
    with pytest.raises(ValueError, match="kind 'sds' or 'rfds', got 'ip2p'"):
        slamp_edit(load_guidance(tiny_ip2p_pipeline()), *_view(1), "x")
