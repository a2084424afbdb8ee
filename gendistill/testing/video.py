"""Tiny CogVideoX pipeline and video teacher built from configs: no downloads, CPU-fast.

    paths = write_tiny_models("outputs/tiny-models")        # {"cogvideox": Path, "videomae": Path}
    pipe = CogVideoXPipeline.from_pretrained(paths["cogvideox"])

The models are random (seeded, so every call writes the same weights) and are saved with
`save_pretrained`, then loaded through the same `from_pretrained` path as the real CogVideoX and
VideoMAE checkpoints. Sizes: a 3-block transformer of width 32, a VAE with 4x spatial and 4x
temporal compression and 4 latent channels, a 2-layer T5 encoder of width 32 with a
character-level tokenizer (built with the `tokenizers` library), a 2-layer VideoMAE of width 16.
A 9-frame 32x32 clip gives 3 x 8 x 8 latents, 3 x 4 x 4 transformer tokens.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Sequence

import torch

__all__ = [
    "TEXT_LENGTH",
    "tiny_tokenizer",
    "tiny_text_encoder",
    "tiny_vae",
    "tiny_transformer",
    "tiny_scheduler",
    "tiny_pipeline",
    "tiny_videomae",
    "write_tiny_models",
]

TEXT_LENGTH = 16  # tokens of a prompt (the transformer's max_text_seq_length)
TEXT_DIM = 32
WORDS = ("a", "an", "the", "ball", "red", "blue", "green", "yellow", "is", "thrown", "dropped", "lobbed", "high",
         "to", "right", "left", "and", "bounces", "on", "floor", "falls", "rolls", "of", "in", "with")


def tiny_tokenizer(max_length: int = TEXT_LENGTH, words: Sequence[str] = WORDS):
    """A tiny T5 tokenizer: Unigram over lower-case characters plus whole `words`, `</s>` at the end."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for c in string.ascii_lowercase + string.digits + string.punctuation:
        pieces += [(c, -3.0), ("\u2581" + c, -3.5)]
    pieces += [("\u2581" + word, -1.0) for word in words]  # whole words: short prompts
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def tiny_text_encoder(seed: int = 1):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(tiny_tokenizer()), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                   decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def tiny_vae(seed: int = 2):
    """AutoencoderKLCogVideoX: 3 blocks of width 8, 4x spatial and 4x temporal compression, 4 latent channels."""
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)
    return AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4, sample_height=32, sample_width=32,
        scaling_factor=1.15258426,
    ).eval()


def tiny_transformer(seed: int = 3, *, num_layers: int = 3, rotary: bool = False, patch_size_t: int | None = None):
    """CogVideoXTransformer3DModel of width 32 (2 heads of 16); `rotary` as CogVideoX-5B, else sin-cos as 2B;
    `patch_size_t=2`: the CogVideoX 1.5 layout (2 latent frames per patch, rotary, no patch bias)."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    v15 = dict(patch_size_t=patch_size_t, patch_bias=False, use_rotary_positional_embeddings=True) if patch_size_t \
        else dict(use_rotary_positional_embeddings=rotary)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=TEXT_DIM, num_layers=num_layers, sample_width=8, sample_height=8, sample_frames=9,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TEXT_LENGTH, **v15,
    )


def tiny_scheduler():
    """CogVideoXDPMScheduler with CogVideoX-2B's settings (v-prediction, zero-SNR, trailing spacing)."""
    from diffusers import CogVideoXDPMScheduler

    return CogVideoXDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=3.0,
        timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True, steps_offset=0,
    )


def tiny_pipeline(seed: int = 0, *, rotary: bool = False, num_layers: int = 3, patch_size_t: int | None = None):
    """A `CogVideoXPipeline` of the tiny components (random weights, seeded); see `tiny_transformer`."""
    from diffusers import CogVideoXPipeline

    return CogVideoXPipeline(
        tokenizer=tiny_tokenizer(), text_encoder=tiny_text_encoder(seed + 1), vae=tiny_vae(seed + 2),
        transformer=tiny_transformer(seed + 3, num_layers=num_layers, rotary=rotary, patch_size_t=patch_size_t),
        scheduler=tiny_scheduler(),
    )


def tiny_videomae(seed: int = 4):
    """transformers VideoMAEModel: patch 8, tubelet 2, width 16, 2 layers, trained size 4 x 32 x 32."""
    from transformers import VideoMAEConfig, VideoMAEModel

    torch.manual_seed(seed)
    cfg = VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=16,
                         num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, layer_norm_eps=1e-6)
    return VideoMAEModel(cfg).eval()


def _save_atomically(obj, folder: Path) -> None:
    """`obj.save_pretrained` into a temporary folder beside `folder`, then rename it onto `folder`."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        obj.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process wrote it first: theirs is identical (seeded)
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_tiny_models(root: str | os.PathLike, *, overwrite: bool = False, rotary: bool = False,
                      patch_size_t: int | None = None) -> dict[str, Path]:
    """Write the tiny pipeline to `root/cogvideox` and the tiny teacher to `root/videomae` (save_pretrained).

    Folders that already exist are kept unless `overwrite`. Each is written to a temporary folder and
    renamed into place, so a concurrent reader never sees half a model. Returns {"cogvideox", "videomae"}.
    """
    root = Path(root)
    paths = {"cogvideox": root / "cogvideox", "videomae": root / "videomae"}
    for name, build in (("cogvideox", lambda: tiny_pipeline(rotary=rotary, patch_size_t=patch_size_t)),
                        ("videomae", tiny_videomae)):
        folder = paths[name]
        if folder.is_dir() and overwrite:
            shutil.rmtree(folder)
        if not folder.is_dir():
            _save_atomically(build(), folder)
    return paths


if __name__ == "__main__":
    import sys

    out = write_tiny_models(sys.argv[1] if len(sys.argv) > 1 else "outputs/tiny-models")
    for name, path in out.items():
        print(f"{name}: {path}/")
