"""Feature hooks on tiny diffusers models: captured tensors equal the blocks run by hand."""

import functools

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel, SD3Transformer2DModel, UNet2DConditionModel
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from gendistill.core.align.hooks import FeatureHook, capture_block, num_blocks, unwrap_model

REENTRANT = functools.partial(checkpoint, use_reentrant=True)


def tiny_cogvideox(patch_size_t=None, seed=0):
    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=4,
        text_embed_dim=8, num_layers=3, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        patch_size_t=patch_size_t, temporal_compression_ratio=4, max_text_seq_length=4,
        use_rotary_positional_embeddings=patch_size_t is not None,
    )


def tiny_sd3(seed=0):
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16,
    )


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2,
    )


class Wrapper(nn.Module):
    """Stands in for DDP / accelerate: the real model under `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class Compiled(nn.Module):
    """Stands in for torch.compile's OptimizedModule (`._orig_mod`)."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod = module

    def forward(self, *args, **kwargs):
        return self._orig_mod(*args, **kwargs)


def cog_inputs(frames, height, width, patch_size_t=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, frames, 4, height, width, generator=g)
    enc = torch.randn(2, 4, 8, generator=g)
    kwargs = dict(hidden_states=x, encoder_hidden_states=enc, timestep=torch.tensor([10, 500]))
    if patch_size_t is not None:
        n = (frames // patch_size_t) * (height // 2) * (width // 2)
        kwargs["image_rotary_emb"] = (torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g))
    return kwargs


def cog_by_hand(model, k, hidden_states, encoder_hidden_states, timestep, image_rotary_emb=None):
    """CogVideoX forward up to transformer_blocks[k-1], written out."""
    emb = model.time_embedding(model.time_proj(timestep).to(hidden_states.dtype), None)
    tokens = model.patch_embed(encoder_hidden_states, hidden_states)
    n_text = encoder_hidden_states.shape[1]
    enc, h = tokens[:, :n_text], tokens[:, n_text:]
    for block in model.transformer_blocks[:k]:
        h, enc = block(h, enc, emb, image_rotary_emb)
    _, f, _, height, width = hidden_states.shape
    p_t = model.config.patch_size_t or 1
    return rearrange(h, "b (f y x) d -> b f y x d", f=f // p_t, y=height // 2, x=width // 2)


def sd3_inputs(height, width, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(2, 4, height, width, generator=g),
        encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
        pooled_projections=torch.randn(2, 8, generator=g),
        timestep=torch.tensor([3, 700]),
    )


def sd3_by_hand(model, k, hidden_states, encoder_hidden_states, pooled_projections, timestep):
    h = model.pos_embed(hidden_states)
    temb = model.time_text_embed(timestep, pooled_projections)
    enc = model.context_embedder(encoder_hidden_states)
    for block in model.transformer_blocks[:k]:
        enc, h = block(hidden_states=h, encoder_hidden_states=enc, temb=temb)
    height, width = hidden_states.shape[-2:]
    return rearrange(h, "b (y x) d -> b y x d", y=height // 2, x=width // 2)


def unet_inputs(size, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(2, 4, size, size, generator=g), timestep=torch.tensor([5, 900]),
                encoder_hidden_states=torch.randn(2, 3, 8, generator=g))


def unet_down1_by_hand(model, sample, timestep, encoder_hidden_states):
    emb = model.time_embedding(model.time_proj(timestep).to(sample.dtype))
    x = model.conv_in(sample)
    x, _ = model.down_blocks[0](hidden_states=x, temb=emb, encoder_hidden_states=encoder_hidden_states)
    x, _ = model.down_blocks[1](hidden_states=x, temb=emb)
    return x


def hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# -- captured == by hand, shapes ------------------------------------------------------------------
@pytest.mark.parametrize("frames,height,width,patch_size_t", [(2, 8, 8, None), (3, 8, 12, None), (4, 12, 8, 2)])
def test_cogvideox_capture_equals_blocks_by_hand(frames, height, width, patch_size_t):
    model = tiny_cogvideox(patch_size_t).eval()
    inputs = cog_inputs(frames, height, width, patch_size_t)
    with torch.no_grad(), capture_block(model, align_layer=2) as feats:
        model(**inputs)
        got = feats.features
        ref = cog_by_hand(model, 2, **inputs)
    f = frames // (patch_size_t or 1)
    assert got.shape == (2, f, height // 2, width // 2, 16)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("height,width", [(8, 8), (8, 12), (16, 12)])
def test_sd3_capture_equals_image_tokens_by_hand(height, width):
    model = tiny_sd3().eval()
    inputs = sd3_inputs(height, width)
    with torch.no_grad(), capture_block(model, 2) as feats:
        model(**inputs)
        ref = sd3_by_hand(model, 2, **inputs)
        got = feats.pop()
    assert got.shape == (2, height // 2, width // 2, 16)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="no features"):
        feats.features  # popped


@pytest.mark.parametrize("size", [16, 24])
def test_unet_named_block_capture(size):
    model = tiny_unet().eval()
    inputs = unet_inputs(size)
    with torch.no_grad(), capture_block(model, "down_blocks.1") as feats, capture_block(model, "mid_block") as mid:
        model(**inputs)
        ref = unet_down1_by_hand(model, **inputs)
        assert feats.kind == "module"
        torch.testing.assert_close(feats.features, ref, rtol=1e-5, atol=1e-6)
        assert feats.features.shape == (2, 16, size // 2, size // 2)
        assert mid.features.shape == (2, 16, size // 2, size // 2)


# -- gradient checkpointing -----------------------------------------------------------------------
def _grads_through_capture(model, run, align_layer, checkpointing):
    """Capture, then backprop loss = sum(features^2) + mean(output); return (features, block grads)."""
    model.train()
    if checkpointing == "reentrant":
        model.enable_gradient_checkpointing(REENTRANT)
    elif checkpointing:
        model.enable_gradient_checkpointing()
    model.zero_grad()
    with capture_block(model, align_layer) as feats:
        out = run(model)
        raw = feats._raw
        captured = feats.features
        assert captured.requires_grad
        (captured.square().sum() + out.mean()).backward(retain_graph=True)
        # recomputation during backward did not replace what was captured ...
        assert feats._raw is raw
        torch.testing.assert_close(feats.features, captured)
        # ... nor capture anything once the features were taken
        feats.pop()
        out.mean().backward()
        assert feats._raw is None
    block = feats.block
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    return captured.detach(), grads


def _counted(forward, calls, *args, **kwargs):
    calls.append(1)
    return forward(*args, **kwargs)


@pytest.mark.parametrize("checkpointing", ["reentrant", True])
@pytest.mark.parametrize("family", ["cogvideox", "sd3"])
def test_gradient_checkpointing_captures_once_and_grads_flow(family, checkpointing):
    if family == "cogvideox":
        inputs = cog_inputs(2, 8, 12)
        make = tiny_cogvideox
    else:
        inputs = sd3_inputs(8, 12)
        make = tiny_sd3

    def run(m):
        return m(**inputs).sample

    ref_feats, ref_grads = _grads_through_capture(make(), run, 2, checkpointing=False)
    model = make()
    calls, block = [], model.transformer_blocks[1]
    block.forward = functools.partial(_counted, block.forward, calls)  # counts recomputations too
    feats, grads = _grads_through_capture(model, run, 2, checkpointing=checkpointing)
    assert len(calls) >= 2  # the block really was recomputed during backward
    torch.testing.assert_close(feats, ref_feats, rtol=1e-5, atol=1e-6)
    assert ref_grads and set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_unet_checkpointing_grads_through_named_block():
    inputs = unet_inputs(16)

    def run(m):
        return m(**inputs).sample

    ref_feats, ref_grads = _grads_through_capture(tiny_unet(), run, "down_blocks.0", checkpointing=False)
    feats, grads = _grads_through_capture(tiny_unet(), run, "down_blocks.0", checkpointing=True)
    torch.testing.assert_close(feats, ref_feats, rtol=1e-5, atol=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6)


# -- wrappers, removal, errors --------------------------------------------------------------------
def test_wrapped_models_are_unwrapped_and_hooks_removed():
    model = tiny_cogvideox().eval()
    inputs = cog_inputs(2, 8, 8)
    with torch.no_grad():
        ref = cog_by_hand(model, 3, **inputs)
    before = hook_counts(model)
    wrapped = Wrapper(Compiled(model))
    assert unwrap_model(wrapped) is model
    assert num_blocks(wrapped) == 3
    hook = capture_block(wrapped, align_layer=3)
    assert isinstance(hook, FeatureHook) and hook.model is model
    assert hook_counts(model) == before + 3
    with torch.no_grad():
        wrapped(**inputs)
    torch.testing.assert_close(hook.features, ref, rtol=1e-5, atol=1e-6)
    hook.remove()
    assert hook_counts(model) == before
    assert len(model.transformer_blocks[2]._forward_hooks) == 0
    assert len(model._forward_hooks) == 0 and len(model._forward_pre_hooks) == 0
    assert hook._raw is None and not hook.active
    with torch.no_grad():  # nothing captured after removal
        wrapped(**inputs)
    assert hook._raw is None


def test_cleared_at_each_forward_and_by_context_exit():
    model = tiny_sd3().eval()
    with torch.no_grad(), capture_block(model, 1) as feats:
        model(**sd3_inputs(8, 8, seed=1))
        first = feats.features
        model(**sd3_inputs(8, 12, seed=2))  # a new forward replaces the capture
        second = feats.features
        assert second.shape == (2, 4, 6, 16) and first.shape == (2, 4, 4, 16)
    assert feats._raw is None and hook_counts(model) == 0


def test_real_ddp_world_size_one():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    started = False
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
        started = True
    try:
        model = tiny_sd3()
        ddp = DistributedDataParallel(model)
        inputs = sd3_inputs(8, 8)
        with capture_block(ddp, 3) as feats:
            out = ddp(**inputs).sample
            (feats.features.square().mean() + out.mean()).backward()
            with torch.no_grad():
                ref = sd3_by_hand(model, 3, **inputs)
            torch.testing.assert_close(feats.features.detach(), ref, rtol=1e-5, atol=1e-6)
        assert model.transformer_blocks[2].ff.net[0].proj.weight.grad.abs().sum() > 0
        assert hook_counts(model) == 0
    finally:
        if started:
            dist.destroy_process_group()


def test_align_layer_is_one_based_and_checked():
    model = tiny_cogvideox()
    assert capture_block(model, 1).block is model.transformer_blocks[0]
    assert capture_block(model, 3).block_name == "transformer_blocks.2"
    for bad in (0, 4, -1):
        with pytest.raises(ValueError, match="1-based"):
            capture_block(model, bad)
    with pytest.raises(ValueError, match="no submodule"):
        capture_block(tiny_unet(), "down_blocks.7")
    with pytest.raises(ValueError, match="submodule name"):
        capture_block(tiny_unet(), 2)
    with pytest.raises(RuntimeError, match="no features"):
        capture_block(model, 2).features
