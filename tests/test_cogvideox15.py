"""CogVideoX 1.5 (`patch_size_t=2`): latent frames padded at the front to whole temporal patches in
training, the TRD token grid in patches of 2 latent frames, and generation, beside the 1.0 layout."""

import json
from pathlib import Path

import pytest
import torch

from gendistill.config import load_config
from gendistill.core.align import capture_block
from gendistill.testing.video import TEXT_DIM, TEXT_LENGTH, tiny_transformer, write_tiny_models
from gendistill.video_distill.finetune_config import FinetuneConfig
from gendistill.video_distill.student import pad_latent_frames
from gendistill.video_distill.trainer import finetune

ROOT = Path(__file__).resolve().parents[1]


def test_latent_frames_are_padded_with_the_first_frame_in_front():
    x = torch.arange(3.0).view(1, 3, 1, 1, 1).expand(2, 3, 4, 2, 2)  # frame k holds k
    padded = pad_latent_frames(x, 2)
    assert padded.shape == (2, 4, 4, 2, 2) and padded[:, :, 0, 0, 0].tolist() == [[0, 0, 1, 2]] * 2
    assert pad_latent_frames(x, None) is x and pad_latent_frames(x[:, :2], 2).shape[1] == 2
    assert pad_latent_frames(torch.zeros(1, 4, 1, 1, 1), 3).shape[1] == 6  # the fewest frames to a multiple


@pytest.mark.parametrize("patch_size_t, grid_frames", [(None, 3), (2, 2)])
def test_the_hooked_token_grid_has_one_frame_per_temporal_patch(patch_size_t, grid_frames):
    tr = tiny_transformer(num_layers=2, patch_size_t=patch_size_t)
    latents = pad_latent_frames(torch.randn(1, 3, 4, 8, 8), patch_size_t)  # 9 frames -> 3 latent frames
    from gendistill.video_distill.student import rotary_embeddings

    rotary = rotary_embeddings(tr.config, latent_frames=latents.shape[1], latent_height=8, latent_width=8,
                               device="cpu") if tr.config.use_rotary_positional_embeddings else None
    with capture_block(tr, 1) as hook:
        text = torch.randn(1, TEXT_LENGTH, TEXT_DIM)
        out = tr(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([5]), image_rotary_emb=rotary,
                 return_dict=False)[0]
        tokens = hook.pop()
    assert out.shape == latents.shape and tokens.shape[:4] == (1, grid_frames, 4, 4)


def test_a_cogvideox_15_finetune_with_trd_runs_and_exports_the_15_layout(tmp_path):
    models = write_tiny_models(tmp_path / "models", patch_size_t=2)
    out = tmp_path / "run"
    cfg = load_config(FinetuneConfig, ROOT / "configs" / "video_distill" / "tiny_cpu.yaml",
                      [f"output_dir={out}", f"model.pretrained={models['cogvideox']}", "model.tiny=false",
                       f"teacher.path={models['videomae']}", f"data.path={ROOT / 'assets' / 'clips'}", "max_steps=2",
                       "checkpoint.every=0", "validation.every=2", "training_type=sft"])
    summary = finetune(cfg)
    steps = summary["history"]
    assert summary["step"] == 2 and len(steps) == 2
    assert all(torch.isfinite(torch.tensor([r["diffusion"], r["align"]])).all() and r["align"] != 0 for r in steps)
    exported = json.loads((Path(summary["export"]) / "transformer" / "config.json").read_text())
    assert exported["patch_size_t"] == 2
    videos = list((out / "validation").rglob("*.mp4"))  # the pipeline pads and drops the frames itself
    assert videos, "no validation video"
    from gendistill.core.media import read_video

    assert read_video(videos[0]).shape[0] == 9
