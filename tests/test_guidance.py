"""gendistill.core.guidance: gradients against hand computations with tiny pipelines."""

import pytest
import torch
import torch.nn.functional as F

from gendistill.core.guidance import (
    anneal_t_range,
    detect_kind,
    flow_alpha_bar,
    load_guidance,
    t_bounds,
    view_suffix,
)
from gendistill.testing.diffusion import (
    TinyPixelPipeline,
    tiny_ddpm_pipeline,
    tiny_ip2p_pipeline,
    tiny_pixel_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
)

B, H = 2, 32
PROMPT, NEG = "a red car", "blurry"


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def sd_v():
    return tiny_sd_pipeline("v_prediction")


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_pipeline()


@pytest.fixture(scope="module")
def ip2p():
    return tiny_ip2p_pipeline()


def _close(actual, expected):
    """Equal up to float32 round-off (batched vs. separate model calls), relative to the scale."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=2e-5 * float(expected.abs().max()))


def _inputs(c=4, h=H // 2, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(B, c, h, h, generator=g)
    noise = torch.randn(B, c, h, h, generator=g)
    return latents, noise


def _latent_grad(guidance, latents, **kwargs):
    latents = latents.clone().requires_grad_(True)
    guidance.loss(latents=latents, **kwargs).backward()
    return latents.grad


def _sd_eps(pipe, x_t, t, prompt, neg):
    """eps_c, eps_u by hand: the pipeline's encode_prompt and the UNet called directly."""
    pe, ne = pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt=neg)
    with torch.no_grad():
        eps_c = pipe.unet(x_t, t, encoder_hidden_states=pe.expand(B, -1, -1)).sample
        eps_u = pipe.unet(x_t, t, encoder_hidden_states=ne.expand(B, -1, -1)).sample
    return eps_c, eps_u


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("cfg", ["standard", "threestudio"])
def test_sds_gradient_matches_hand_computation(sd, sd_v, prediction, cfg):
    pipe = sd if prediction == "epsilon" else sd_v
    s = 7.5
    guidance = load_guidance(pipe, guidance_scale=s, cfg=cfg)
    assert guidance.kind == "sds" and guidance.prediction_type == prediction
    latents, noise = _inputs()
    t = torch.tensor([100, 700])
    grad = _latent_grad(guidance, latents, prompt=PROMPT, negative_prompt=NEG, t=t, noise=noise)

    a = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * latents + (1 - a).sqrt() * noise
    out_c, out_u = _sd_eps(pipe, x_t, t, PROMPT, NEG)
    if prediction == "v_prediction":
        out_c, out_u = (a.sqrt() * o + (1 - a).sqrt() * x_t for o in (out_c, out_u))
    eps_hat = out_u + s * (out_c - out_u) if cfg == "standard" else out_c + s * (out_c - out_u)
    expected = (1 - a) * (eps_hat - noise) / B
    _close(grad, expected)
    assert grad.abs().max() > 1e-3


@pytest.mark.parametrize("weighting", ["uniform", "fantasia3d"])
def test_weightings(sd, weighting):
    guidance = load_guidance(sd, guidance_scale=3.0, weighting=weighting)
    ref = load_guidance(sd, guidance_scale=3.0, weighting="sds")
    latents, noise = _inputs()
    t = torch.tensor([250, 900])
    g = _latent_grad(guidance, latents, prompt=PROMPT, t=t, noise=noise)
    g_sds = _latent_grad(ref, latents, prompt=PROMPT, t=t, noise=noise)
    a = sd.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    w = torch.ones_like(a) if weighting == "uniform" else a.sqrt() * (1 - a)
    _close(g, g_sds / (1 - a) * w)


def test_mask_zeroes_gradient_and_is_resized(sd):
    guidance = load_guidance(sd, guidance_scale=7.5)
    latents, noise = _inputs()
    mask = torch.ones(B, 1, H, H)
    mask[:, :, :, : H // 2] = 0  # left half of the image
    mask[1] = 0.0
    t = torch.tensor([300, 600])
    grad = _latent_grad(guidance, latents, prompt=PROMPT, mask=mask, t=t, noise=noise)
    full = _latent_grad(guidance, latents, prompt=PROMPT, t=t, noise=noise)
    assert torch.all(grad[:, :, :, : H // 4] == 0) and torch.all(grad[1] == 0)
    torch.testing.assert_close(grad[0, :, :, H // 4 :], full[0, :, :, H // 4 :])
    # a mask on the latent grid, broadcast over the batch
    m = torch.zeros(1, 1, H // 2, H // 2)
    m[..., 3:9, 2:5] = 1
    grad = _latent_grad(guidance, latents, prompt=PROMPT, mask=m, t=t, noise=noise)
    torch.testing.assert_close(grad, full * m)


@pytest.mark.parametrize("kind", ["sds", "rfds"])
def test_reductions_against_romaps_masked_mse(sd, sd3, kind):
    """"masked_mean" is RoMaP's `F.mse_loss(noise[m] - latents[m], target[m]) / B` with the mask
    bilinear-resized and > 0.5: computed here from the "sum" gradient g / B (the same t and noise)."""
    pipe = sd if kind == "sds" else sd3
    c = 4 if kind == "sds" else pipe.transformer.config.in_channels
    latents, noise = _inputs(c=c)
    t = torch.tensor([300, 600])
    soft = torch.rand(B, 1, H, H, generator=torch.Generator().manual_seed(1))
    kw = dict(prompt=PROMPT, t=t, noise=noise)
    g = _latent_grad(load_guidance(pipe, kind=kind, guidance_scale=7.5), latents, **kw) * B  # unmasked g
    masked = _latent_grad(load_guidance(pipe, kind=kind, guidance_scale=7.5, reduction="masked_mean"), latents,
                          mask=soft, **kw)
    hard = (F.interpolate(soft, size=latents.shape[-2:], mode="bilinear", align_corners=False) > 0.5).float()
    n = hard.sum() * c  # every channel of each masked latent position
    assert 0 < n < latents.numel()
    _close(masked, 2 * g * hard / (n * B))
    # the loss value itself: the MSE over the masked elements of the residual, / B
    guidance = load_guidance(pipe, kind=kind, guidance_scale=7.5, reduction="masked_mean")
    loss = guidance.loss(latents=latents, mask=soft, **kw)
    residual = guidance.last["grad"]
    expected = F.mse_loss(residual[hard.expand_as(residual) > 0], torch.zeros(int(n))) / B
    torch.testing.assert_close(loss, expected)
    mean = _latent_grad(load_guidance(pipe, kind=kind, guidance_scale=7.5, reduction="mean"), latents, **kw)
    _close(mean, g / (B * latents[0].numel()))
    with pytest.raises(ValueError, match="reduction 'max'"):
        load_guidance(pipe, kind=kind, reduction="max")


def test_gradient_reaches_images_through_the_vae(sd):
    guidance = load_guidance(sd, guidance_scale=7.5)
    images = torch.rand(B, 3, H, H, requires_grad=True)
    noise = _inputs()[1]
    t = torch.tensor([400, 500])
    guidance.loss(images, PROMPT, t=t, noise=noise, generator=torch.Generator().manual_seed(3)).backward()
    grad_latents = guidance.last["grad"] / B

    x = images.detach().clone().requires_grad_(True)
    z = sd.vae.encode(2 * x - 1).latent_dist.sample(generator=torch.Generator().manual_seed(3))
    z = z * sd.vae.config.scaling_factor
    torch.testing.assert_close(z.detach(), guidance.last["latents"])
    (expected,) = torch.autograd.grad(z, x, grad_outputs=grad_latents)
    _close(images.grad, expected)
    assert images.grad.abs().sum() > 0


def test_rfds_matches_hand_computation(sd3):
    s = 5.0
    guidance = load_guidance(sd3, guidance_scale=s, weighting="uniform")
    assert guidance.kind == "rfds"
    latents, noise = _inputs()
    t = torch.tensor([150, 800])
    grad = _latent_grad(guidance, latents, prompt=PROMPT, negative_prompt=NEG, t=t, noise=noise)

    sched = type(sd3.scheduler).from_config(sd3.scheduler.config)
    sigma = sched.sigmas.flip(0)[t].view(-1, 1, 1, 1)  # t ascending in noise
    pe, ne, pp, npp = sd3.encode_prompt(PROMPT, None, None, device="cpu", negative_prompt=NEG)

    def velocity(x, e, p):
        ts = sigma.view(-1) * 1000
        with torch.no_grad():
            return sd3.transformer(hidden_states=x, timestep=ts, encoder_hidden_states=e.expand(B, -1, -1),
                                   pooled_projections=p.expand(B, -1)).sample

    x_t = sigma * noise + (1 - sigma) * latents
    v_u = velocity(x_t, ne, npp)
    eps_r = noise + (1 - sigma) * (v_u + latents - noise)
    x_r = sigma * eps_r + (1 - sigma) * latents
    v_c2, v_u2 = velocity(x_r, pe, pp), velocity(x_r, ne, npp)
    v_hat = v_u2 + s * (v_c2 - v_u2)
    expected = (v_hat - (eps_r - latents)) / B
    _close(grad, expected)

    # the "sds" weighting uses the alpha_bar of equal signal-to-noise ratio
    weighted = _latent_grad(load_guidance(sd3, guidance_scale=s), latents, prompt=PROMPT, negative_prompt=NEG,
                            t=t, noise=noise)
    _close(weighted, expected * (1 - flow_alpha_bar(sigma)))


def test_ip2p_three_way_guidance_matches_hand_computation(ip2p):
    s_t, s_i = 7.5, 1.5
    guidance = load_guidance(ip2p, guidance_scale=s_t, image_guidance_scale=s_i)
    assert guidance.kind == "ip2p"
    latents, noise = _inputs()
    cond_image = torch.rand(1, 3, H, H)
    t = torch.tensor([200, 650])
    grad = _latent_grad(guidance, latents, prompt=PROMPT, t=t, noise=noise, image_cond=cond_image)

    c = ip2p.vae.encode(cond_image * 2 - 1).latent_dist.mode().expand(B, -1, -1, -1)
    embeds = ip2p._encode_prompt(PROMPT, "cpu", 1, True, "")  # [cond, neg, neg]
    a = ip2p.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * latents + (1 - a).sqrt() * noise

    def eps(img, e):
        with torch.no_grad():
            return ip2p.unet(torch.cat([x_t, img], 1), t, encoder_hidden_states=e.expand(B, -1, -1)).sample

    e_text, e_img, e_u = eps(c, embeds[:1]), eps(c, embeds[1:2]), eps(torch.zeros_like(c), embeds[2:3])
    eps_hat = e_u + s_t * (e_text - e_img) + s_i * (e_img - e_u)
    _close(grad, (1 - a) * (eps_hat - noise) / B)
    with pytest.raises(ValueError, match="image_cond"):
        guidance.loss(latents=latents, prompt=PROMPT)


def test_pixel_space_unet_gets_gradient_directly():
    pipe = tiny_pixel_pipeline()
    guidance = load_guidance(pipe, guidance_scale=4.0)
    assert guidance.vae is None and guidance.kind == "sds"
    images = torch.rand(B, 3, 16, 16, requires_grad=True)
    noise = torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([50, 950])
    guidance.loss(images, PROMPT, t=t, noise=noise).backward()
    x0 = images.detach() * 2 - 1
    a = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    ids = pipe.tokenizer([PROMPT, ""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    emb = pipe.text_encoder(ids)[0]
    with torch.no_grad():
        e_c = pipe.unet(x_t, t, encoder_hidden_states=emb[:1].expand(B, -1, -1)).sample
        e_u = pipe.unet(x_t, t, encoder_hidden_states=emb[1:].expand(B, -1, -1)).sample
    expected = 2 * (1 - a) * (e_u + 4.0 * (e_c - e_u) - noise) / B  # d latents / d images = 2
    _close(images.grad, expected)

    ddpm = load_guidance(tiny_ddpm_pipeline())  # unconditional: eps_hat = eps, prompts ignored
    images = torch.rand(1, 3, 16, 16, requires_grad=True)
    ddpm.loss(images, "ignored").backward()
    assert images.grad.abs().sum() > 0 and ddpm.prompts is None


def test_timestep_annealing_hits_endpoints(sd):
    start, end = (0.02, 0.98), (0.2, 0.5)
    for mode in ("linear", "sqrt"):
        assert anneal_t_range(0, 100, start, end, mode) == pytest.approx(start)
        assert anneal_t_range(100, 100, start, end, mode) == pytest.approx(end)
        assert anneal_t_range(500, 100, start, end, mode) == pytest.approx(end)
    mid_lin = anneal_t_range(25, 100, start, end, "linear")[1]
    mid_sqrt = anneal_t_range(25, 100, start, end, "sqrt")[1]
    assert mid_lin == pytest.approx(0.98 - 0.48 * 0.25) and mid_sqrt == pytest.approx(0.98 - 0.48 * 0.5)

    guidance = load_guidance(sd, t_anneal="sqrt", t_range_end=(0.5, 0.5))
    assert guidance.set_step(0, 10) == pytest.approx((0.02, 0.98))
    assert guidance.set_step(10, 10) == pytest.approx((0.5, 0.5))
    guidance.loss(latents=_inputs()[0], prompt=PROMPT)
    assert guidance.last["t"].tolist() == [500, 500]
    assert t_bounds((0.02, 0.98), 1000) == (20, 980)
    guidance.set_step(0, 10)
    g = torch.Generator().manual_seed(0)
    ts = torch.cat([guidance.timesteps(None, 64, g) for _ in range(20)])
    assert ts.min() >= 20 and ts.max() <= 980 and ts.unique().numel() > 500


def test_generator_reproducible_clip_and_view_prompts(sd):
    guidance = load_guidance(sd, guidance_scale=7.5, grad_clip=0.01)
    images = torch.rand(B, 3, H, H)
    azi, ele = torch.tensor([10.0, 180.0]), torch.tensor([0.0, 0.0])
    losses = [guidance.loss(images, PROMPT, azimuth=azi, elevation=ele,
                            generator=torch.Generator().manual_seed(5)).item() for _ in range(2)]
    assert losses[0] == losses[1]
    assert guidance.last["grad"].abs().max() <= 0.01 + 1e-7
    assert len(guidance.prompts) == 2  # "a red car, front view" and ", back view", encoded once
    assert [view_suffix(a, e) for a, e in [(0, 0), (90, 0), (-170, 10), (200, 0), (30, 75)]] == [
        ", front view", ", side view", ", back view", ", back view", ", overhead view"]
    # a per-view prompt embedding equals the pipeline's own encoding of the suffixed prompt
    cond, _ = guidance.embeddings(PROMPT, "", B, azi, ele)
    pe, _ = sd.encode_prompt(PROMPT + ", back view", "cpu", 1, True, negative_prompt="")
    torch.testing.assert_close(cond["encoder_hidden_states"][1:], pe)


def test_save_and_load_offline(sd, tmp_path, monkeypatch):
    sd.save_pretrained(tmp_path / "tiny-sd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_guidance(str(tmp_path / "tiny-sd"), guidance_scale=7.5, device="cpu")
    ref = load_guidance(sd, guidance_scale=7.5)
    assert type(loaded.pipe).__name__ == "StableDiffusionPipeline" and loaded.kind == "sds"
    latents, noise = _inputs()
    t = torch.tensor([321, 654])
    torch.testing.assert_close(_latent_grad(loaded, latents, prompt=PROMPT, t=t, noise=noise),
                               _latent_grad(ref, latents, prompt=PROMPT, t=t, noise=noise))


def test_half_precision_with_memory_options(sd):
    latents, noise = _inputs()
    t = torch.tensor([300, 700])
    ref = _latent_grad(load_guidance(sd, guidance_scale=7.5), latents, prompt=PROMPT, t=t, noise=noise)
    half = load_guidance(tiny_sd_pipeline(), guidance_scale=7.5, dtype="bfloat16", attention_slicing=True,
                         vae_tiling=True)
    assert half.dtype == torch.bfloat16
    grad = _latent_grad(half, latents, prompt=PROMPT, t=t, noise=noise)
    assert grad.dtype == torch.float32
    assert (grad - ref).norm() / ref.norm() < 0.1
    images = torch.rand(1, 3, H, H, requires_grad=True)
    half.loss(images, PROMPT).backward()
    assert images.grad.dtype == torch.float32 and torch.isfinite(images.grad).all()


def test_detect_kind(sd, sd3, ip2p):
    assert [detect_kind(p) for p in (sd, sd3, ip2p, tiny_pixel_pipeline(), tiny_ddpm_pipeline())] == [
        "sds", "rfds", "ip2p", "sds", "sds"]


def test_bad_inputs_have_clear_errors(sd, sd3):
    guidance = load_guidance(sd)
    good = torch.rand(1, 3, H, H)
    with pytest.raises(ValueError, match=r"unsupported pipeline type TinyPixelPipeline"):
        load_guidance(TinyPixelPipeline(unet=None, text_encoder=None, tokenizer=None, scheduler=sd3.scheduler))
    with pytest.raises(TypeError, match="hub id, a local folder or a diffusers pipeline"):
        load_guidance(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="kind 'rfds' needs a pipeline with a flow-matching"):
        load_guidance(sd, kind="rfds")
    with pytest.raises(KeyError, match=r"unknown guidance kind 'dds'; known: ip2p, rfds, sds"):
        load_guidance(sd, kind="dds")
    with pytest.raises(ValueError, match=r"unknown weighting 'snr'; expected one of sds, uniform, fantasia3d"):
        load_guidance(sd, weighting="snr")
    with pytest.raises(ValueError, match="unknown cfg form"):
        load_guidance(sd, cfg="perp-neg")
    with pytest.raises(TypeError, match="unknown option.*grad_clipping"):
        load_guidance(sd, grad_clipping=1.0)
    with pytest.raises(ValueError, match=r"multiples of 2 for this model, got 33x32"):
        guidance.loss(torch.rand(1, 3, 33, 32), PROMPT)
    with pytest.raises(ValueError, match=r"images must be in \[0, 1\], got values in \[-0.99"):
        guidance.loss(good * 2 - 1, PROMPT)
    with pytest.raises(ValueError, match=r"\[B,3,H,W\], got shape \(1, 32, 32, 3\) \(channels last"):
        guidance.loss(good.permute(0, 2, 3, 1), PROMPT)
    with pytest.raises(ValueError, match=r"mask must be \[B,1,H,W\] in \[0,1\] \(B = 1, H x W = 16x16 or 32x32\)"):
        guidance.loss(good, PROMPT, mask=torch.ones(1, 1, 20, 20))
    with pytest.raises(ValueError, match=r"mask must be \[B,1,H,W\]"):
        guidance.loss(good, PROMPT, mask=torch.ones(1, 3, H, H))
    with pytest.raises(ValueError, match="exactly one"):
        guidance.loss(good, PROMPT, latents=torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"latents must have 4 channels"):
        guidance.loss(latents=torch.zeros(1, 3, 16, 16), prompt=PROMPT)
    with pytest.raises(ValueError, match=r"t must hold integer timesteps in \[0, 1000\)"):
        guidance.loss(good, PROMPT, t=1000)
    with pytest.raises(ValueError, match="noise must have the latents' shape"):
        guidance.loss(good, PROMPT, noise=torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="unknown t_anneal"):
        load_guidance(sd, t_anneal="cosine")


def test_romap_config_gives_the_released_noise_range(sd3):
    """romap_sd3.yaml's t_range reaches the transformer as RoMaP's sigmas: indices 300..980 (its
    [0.3, 0.98]) into the descending timesteps of SD3's scheduler (shift 3), no more, no less."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from omegaconf import OmegaConf

    from pathlib import Path

    config = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "splat_edit" / "romap_sd3.yaml")
    official = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3-medium's scheduler
    released = official.sigmas[300:981]  # the sigmas of timesteps[300..980], descending
    assert released.max() == pytest.approx(0.875, abs=1e-3) and released.min() == pytest.approx(0.058, abs=1e-3)

    pipe = type(sd3)(**{**sd3.components, "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)})
    guidance = load_guidance(pipe, kind="rfds", guidance_scale=100.0, weighting="uniform",
                             t_range=tuple(config.guidance.t_range))
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timestep"].float() / 1000), with_kwargs=True)
    try:
        latents = torch.randn(64, 4, 8, 8, requires_grad=True)
        guidance.loss(latents=latents, prompt=PROMPT, generator=torch.Generator().manual_seed(0)).backward()
    finally:
        hook.remove()
    sigmas = torch.cat(seen)
    assert sigmas.min() >= released.min() - 1e-6 and sigmas.max() <= released.max() + 1e-6
    assert sigmas.max() > 0.6 and sigmas.min() < 0.3  # the draws span the range
    lo, hi = t_bounds(tuple(config.guidance.t_range), 1000)
    ours = guidance.sigmas[lo:hi + 1].flip(0)
    torch.testing.assert_close(ours, released.float())  # the same 681 noise levels, ends included


def test_kinds_declare_what_they_need(sd, sd_v, sd3, ip2p, monkeypatch):
    """Each kind says its prediction, image condition and anchor method; detection asks each registered
    kind, so a plugin kind is detected and the editor takes its anchor method without knowing its name."""
    from gendistill.core.guidance import GUIDANCE, SDSGuidance
    from gendistill.splat_edit.edit_config import load_edit_config
    from gendistill.splat_edit.editor import _anchor_method

    kinds = {name: load_guidance(p) for name, p in (("eps", sd), ("v", sd_v), ("flow", sd3), ("ip2p", ip2p))}
    assert [g.prediction for g in kinds.values()] == ["eps", "v", "flow", "eps"]
    assert [g.needs_image_condition for g in kinds.values()] == [False, False, False, True]
    assert [g.anchor_method for g in kinds.values()] == ["slamp", "slamp", "slamp", "ip2p"]
    assert [g.attention_capture for g in kinds.values()] == ["ours", "ours", "romap", None]

    class ToyPipeline(type(sd)):
        pass

    class ToyGuidance(SDSGuidance):
        kind = "toy"
        anchor_method = "ip2p"

        @classmethod
        def accepts(cls, pipe):
            return isinstance(pipe, ToyPipeline)

    monkeypatch.setitem(GUIDANCE, "toy", ToyGuidance)  # registered last: asked before "sds", which accepts it too
    toy_pipe = ToyPipeline(**sd.components)
    assert detect_kind(toy_pipe) == "toy"
    guidance = load_guidance(toy_pipe)
    assert isinstance(guidance, ToyGuidance)
    cfg = load_edit_config(None, ["scene=s.ply", "part=p", "edit_prompt=e", "out=o", "guidance.model=m"])
    assert _anchor_method(cfg, guidance) == "ip2p" and _anchor_method(cfg, kinds["flow"]) == "slamp"
