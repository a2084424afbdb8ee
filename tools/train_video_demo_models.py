"""Train the bundled video demo models: a tiny CogVideoX text-to-video pipeline and a tiny VideoMAE teacher.

    OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python tools/train_video_demo_models.py       # ~55 min, 2 cores
    .venv/bin/python tools/train_video_demo_models.py --stage eval                           # colour / motion rate
    .venv/bin/python tools/train_video_demo_models.py --vae-minutes 2 --transformer-minutes 3 \
        --teacher-minutes 1 --clips 512 --out /tmp/vd-models                                  # a quick trial

Data: 32x32, 9-frame ball-physics clips (`gendistill.video_distill.physics.simulate_clip`) with their
captions ("a red ball is thrown to the right and bounces twice"); the pipeline's clips come from seed
`--seed` (default 1), the teacher's from `--teacher-seed` (default 2); `gendistill.video_distill.demo`
finetunes on clips of seed 3.

Stages (each resumes from its checkpoint in `--work`, and the model folders are rewritten atomically, so a
crash loses at most a few minutes; the default `--stage all` trains the VAE and the teacher at once, one core
each, then the transformer on two cores):
  1. vae: `AutoencoderKLCogVideoX` (3 blocks: 4x spatial, 4x temporal compression, 8 latent channels),
     reconstruction (MSE, the ball's pixels weighted 10x) + a small KL; its scaling factor is set to
     1 / std of the latents afterwards.
  2. transformer: the clips' latent distributions are cached; `CogVideoXTransformer3DModel` and a
     2-layer `T5EncoderModel` (word-level tokenizer over the caption vocabulary) train jointly with
     CogVideoX's v-prediction loss (`student.diffusion_loss`) under CogVideoX-2B's scheduler, 10% empty
     captions (classifier-free guidance), AdamW, EMA (the saved weights).
  3. teacher: transformers `VideoMAEForPreTraining` (tube masking 75%, normalized-pixel loss) on frames
     1..8 of the teacher's own clips; the encoder (`VideoMAEModel`) is saved.
  4. eval: the saved pipeline, loaded with `CogVideoXPipeline.from_pretrained`, generates balls of each
     colour; the rate of "a moving ball of the prompted colour" (`demo.moving_ball`) is printed and
     written to training.json.
Budgets are process CPU time / threads (minutes on that many unshared cores), so a shared machine only
stretches the wall time: VAE 21 (1 core) beside the teacher 10 (1 core), then the transformer 31 (2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gendistill.video_distill.physics import COLOURS, simulate_clip  # noqa: E402

BASE = ROOT / "assets/models/video_demo_base"
TEACHER = ROOT / "assets/models/video_demo_teacher"
WORK = ROOT / "outputs/video_demo_train"
FRAMES, SIZE, TEXT_LENGTH, TEXT_DIM, LATENT_CHANNELS = 9, 32, 16, 64, 8
WORDS = ("a", "an", "the", "ball", "is", "thrown", "to", "right", "left", "dropped", "up", "and", "does", "not",
         "bounce", "bounces", "once", "twice", "three", "four", "times", "on", "floor", *COLOURS)


# -- the models ---------------------------------------------------------------------------------------------
def demo_tokenizer(max_length: int = TEXT_LENGTH):
    """T5TokenizerFast: a Unigram model over whole caption words (`WORDS`) with single characters as the fallback."""
    from gendistill.testing.video import tiny_tokenizer

    return tiny_tokenizer(max_length, words=WORDS)


def build_text_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                   decoder_start_token_id=0)
    return T5EncoderModel(cfg)


def build_vae():
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(16, 32, 64), latent_channels=LATENT_CHANNELS,
        layers_per_block=1, norm_num_groups=8, temporal_compression_ratio=4, sample_height=SIZE, sample_width=SIZE,
        scaling_factor=1.0)


def build_transformer(num_layers: int = 6):
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=32, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        time_embed_dim=128, text_embed_dim=TEXT_DIM, num_layers=num_layers, sample_width=SIZE // 4,
        sample_height=SIZE // 4, sample_frames=FRAMES, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=TEXT_LENGTH, use_rotary_positional_embeddings=False)


def build_scheduler():
    from gendistill.testing.video import tiny_scheduler

    return tiny_scheduler()  # CogVideoX-2B's CogVideoXDPMScheduler settings (v-prediction, zero SNR)


def build_teacher():
    from transformers import VideoMAEConfig, VideoMAEForPreTraining

    cfg = VideoMAEConfig(image_size=SIZE, patch_size=4, num_frames=8, tubelet_size=2, hidden_size=64,
                         num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, layer_norm_eps=1e-6,
                         use_mean_pooling=False, norm_pix_loss=True, decoder_hidden_size=64,
                         decoder_num_hidden_layers=2, decoder_num_attention_heads=4, decoder_intermediate_size=128)
    return VideoMAEForPreTraining(cfg)


# -- helpers ------------------------------------------------------------------------------------------------
THREADS = 2


def cpu_minutes() -> float:
    """Process CPU time (all threads) / the threads it runs: its minutes on that many dedicated cores."""
    return time.process_time() / 60.0 / THREADS


def make_clips(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """n simulated clips: uint8 [n, 9, 32, 32, 3] and their captions (seeded: rng [seed, 0] as make_physics_clips)."""
    rng = np.random.default_rng([seed, 0])
    frames, captions = [], []
    for _ in range(n):
        video, _, caption = simulate_clip(rng, FRAMES, SIZE)
        frames.append(video)
        captions.append(caption)
    return np.stack(frames), captions


def clips_cached(work: Path, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    path = work / f"clips_seed{seed}_n{n}.npz"
    if path.is_file():
        data = np.load(path)
        return data["frames"], [str(c) for c in data["captions"]]
    t0 = time.perf_counter()
    frames, captions = make_clips(n, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path.with_suffix(".tmp.npz"), frames=frames, captions=np.asarray(captions))
    os.replace(path.with_suffix(".tmp.npz"), path)
    print(f"{n} clips (seed {seed}) in {time.perf_counter() - t0:.0f} s", flush=True)
    return frames, captions


def to_model(frames: np.ndarray) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] -> float [B, 3, T, H, W] in [-1, 1] (the VAE's input)."""
    x = torch.from_numpy(frames).float().div(127.5).sub(1.0)
    return x.permute(0, 4, 1, 2, 3).contiguous()


def save_atomically(obj, folder: Path) -> None:
    """`obj.save_pretrained` into a temporary folder beside `folder`, then swap it in (README.md and
    training.json of the old folder kept)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    obj.save_pretrained(tmp)
    for keep in ("README.md", "training.json"):
        if (folder / keep).is_file():
            shutil.copy2(folder / keep, tmp / keep)
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def save_torch(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def lr_at(step: int, lr: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% at `total` (held there after)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min((step - warmup) / max(total - warmup, 1), 1.0)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


class _Timer:
    """Stops a stage at its CPU budget; `steps_estimate` from the speed so far (for the learning-rate schedule)."""

    def __init__(self, minutes: float, spent: float = 0.0):
        self.minutes, self.start = minutes, cpu_minutes() - spent

    @property
    def spent(self) -> float:
        return cpu_minutes() - self.start

    def done(self) -> bool:
        return self.spent >= self.minutes


def resume(ckpt: Path, stage: str, state: dict, **objects) -> dict:
    """Load a stage's checkpoint, if there is one, into `objects` (its keys: "model", "opt", "ema", ...);
    returns the saved state, or `state` when starting fresh."""
    if not ckpt.is_file():
        return state
    saved = torch.load(ckpt, weights_only=False)
    for key, obj in objects.items():
        obj.load_state_dict(saved[key])
    state = saved["state"]
    print(f"{stage}: resumed at step {state['step']} ({state['minutes']:.1f} min)", flush=True)
    return state


def write_record(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "training.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    old.update(record)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(old, indent=1))
    os.replace(tmp, path)


# -- stage 1: the VAE -----------------------------------------------------------------------------------------
def train_vae(args, frames: np.ndarray) -> dict:
    ckpt = Path(args.work) / "vae.pt"
    torch.manual_seed(args.seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    state = {"step": 0, "minutes": 0.0, "losses": [], "done": False}
    state = resume(ckpt, "vae", state, model=vae, opt=opt)
    if state["done"]:
        return {"vae": vae, **state}
    gen = torch.Generator().manual_seed(args.seed)
    timer = _Timer(args.vae_minutes, state["minutes"])
    vae.train()
    last_save = timer.spent
    est_total = None
    while not timer.done():
        step = state["step"]
        if est_total is None and step >= 20:
            est_total = int(step * args.vae_minutes / max(timer.spent, 1e-3))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_lr, 50, est_total or 10**6)
        idx = torch.randint(0, len(frames), (args.vae_batch,), generator=gen).numpy()
        batch = frames[idx]
        if torch.rand((), generator=gen) < 0.5:  # left-right flip: the same physics
            batch = batch[:, :, :, ::-1]
        x = to_model(np.ascontiguousarray(batch))
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        rgb = (x + 1) / 2
        chroma = rgb.max(1).values - rgb.min(1).values  # [B, T, H, W]: the ball is saturated, the rest grey
        weight = 1.0 + 9.0 * (chroma > 0.2).float()[:, None]
        mse = (weight * (rec - x) ** 2).mean()
        kl = post.kl().mean() / post.mean[0].numel()  # per latent element
        loss = mse + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        state["step"] += 1
        state["losses"].append([mse.item(), kl.item()])
        if state["step"] % 25 == 0:
            m = np.mean(state["losses"][-25:], axis=0)
            print(f"vae step {state['step']}: mse(weighted) {m[0]:.5f} kl {m[1]:.3f} ({timer.spent:.1f} min)",
                  flush=True)
        if timer.spent - last_save > args.save_every:
            state["minutes"] = timer.spent
            save_torch({"model": vae.state_dict(), "opt": opt.state_dict(), "state": state}, ckpt)
            last_save = timer.spent
    state.update(minutes=timer.spent, done=True)
    save_torch({"model": vae.state_dict(), "opt": opt.state_dict(), "state": state}, ckpt)
    return {"vae": vae, **state}


@torch.no_grad()
def encode_all(vae, frames: np.ndarray, batch: int = 32) -> torch.Tensor:
    """Latent distribution parameters [N, 2C, 3, 8, 8] (mean, logvar) of every clip."""
    vae.eval()
    out = []
    for i in range(0, len(frames), batch):
        out.append(vae.encode(to_model(frames[i:i + batch])).latent_dist.parameters)
    return torch.cat(out)


@torch.no_grad()
def vae_quality(vae, frames: np.ndarray, captions: list[str], n: int = 64) -> dict:
    """PSNR and the tracked ball-centre error (px) of reconstructions of `n` clips, and the colour kept."""
    from gendistill.video_distill.physics import parse_caption, track_ball

    vae.eval()
    n = min(n, len(frames))
    x = to_model(frames[:n])
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    psnr = float(10 * torch.log10(4.0 / ((rec - x) ** 2).mean()))
    rec_u8 = ((rec + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 4, 1).numpy()
    errs, colour_ok = [], 0
    for i in range(n):
        colour = parse_caption(captions[i])["colour"]
        a, b = track_ball(frames[i], colour), track_ball(rec_u8[i], colour)
        both = a["found"] & b["found"]
        errs.append(float(np.nanmax(np.hypot(a["x"] - b["x"], a["y"] - b["y"])[both])) if both.any() else 99.0)
        colour_ok += b["colour"] == colour and b["found"].all()
    return {"psnr_db": psnr, "centre_error_max_px_median": float(np.median(errs)),
            "centre_error_max_px_mean": float(np.mean(errs)), "colour_and_found": colour_ok / n}


# -- stage 2: the transformer (and the text encoder) ---------------------------------------------------------------
def train_transformer(args, vae, params: torch.Tensor, captions: list[str]) -> dict:
    from gendistill.video_distill.student import diffusion_loss, sample_latents

    ckpt = Path(args.work) / "transformer.pt"
    torch.manual_seed(args.seed + 1)
    tokenizer = demo_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer))
    transformer = build_transformer(args.layers)
    scheduler = build_scheduler()
    modules = torch.nn.ModuleDict({"transformer": transformer, "text_encoder": text_encoder})
    ema = torch.nn.ModuleDict({"transformer": build_transformer(args.layers),
                               "text_encoder": build_text_encoder(len(tokenizer))})
    ema.load_state_dict(modules.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(modules.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    state = {"step": 0, "minutes": 0.0, "losses": [], "done": False, "steps_planned": None}
    state = resume(ckpt, "transformer", state, model=modules, ema=ema, opt=opt)
    scaling = vae.config.scaling_factor
    ids = tokenizer(captions + [""], padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                    return_tensors="pt").input_ids
    empty = ids[-1:]
    ids = ids[:-1]
    gen = torch.Generator().manual_seed(args.seed + 1 + state["step"])
    timer = _Timer(args.transformer_minutes, state["minutes"])
    last_save = timer.spent
    modules.train()

    def save(final=False):
        state["minutes"] = timer.spent
        save_torch({"model": modules.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "state": state}, ckpt)
        write_pipeline(Path(args.out), tokenizer, ema["text_encoder"], vae, ema["transformer"], scheduler)
        write_record(Path(args.out), {"transformer_steps": state["step"], "transformer_minutes": state["minutes"],
                                      "final": final})

    while not state["done"] and not timer.done():
        step = state["step"]
        if state["steps_planned"] is None and step >= 30:
            state["steps_planned"] = int(step * args.transformer_minutes / max(timer.spent, 1e-3))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.lr, 200, state["steps_planned"] or 10**6)
        idx = torch.randint(0, len(params), (args.batch,), generator=gen)
        latents = sample_latents(params[idx], scaling, gen)  # [B, 3, C, 8, 8]
        tok = ids[idx].clone()
        drop = torch.rand(args.batch, generator=gen) < 0.1
        tok[drop] = empty
        prompt_embeds = text_encoder(tok)[0]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t)
        v = transformer(hidden_states=noisy, encoder_hidden_states=prompt_embeds, timestep=t, return_dict=False)[0]
        loss = diffusion_loss(scheduler.alphas_cumprod, v, noisy, latents, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), modules.parameters()):
                pe.lerp_(pm, 1 - decay)
        state["step"] += 1
        state["losses"].append(float(loss))
        if state["step"] % 50 == 0:
            print(f"transformer step {state['step']}: loss {np.mean(state['losses'][-50:]):.4f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} ({timer.spent:.1f} min)", flush=True)
        if timer.spent - last_save > args.save_every:
            save()
            last_save = timer.spent
    state["done"] = True
    save(final=True)
    return state


def write_pipeline(out: Path, tokenizer, text_encoder, vae, transformer, scheduler) -> None:
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                             transformer=transformer.eval(), scheduler=scheduler)
    save_atomically(pipe, out)


# -- stage 3: the teacher ----------------------------------------------------------------------------------------
def tube_mask(batch: int, cfg, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """[B, T' * H' * W'] bool: the same random spatial mask for every tubelet (VideoMAE's tube masking)."""
    per_frame = (cfg.image_size // cfg.patch_size) ** 2
    slots = cfg.num_frames // cfg.tubelet_size
    n_mask = int(round(ratio * per_frame))
    order = torch.rand(batch, per_frame, generator=gen).argsort(1)
    mask = torch.zeros(batch, per_frame, dtype=torch.bool)
    mask.scatter_(1, order[:, :n_mask], True)
    return mask.repeat(1, slots)


def train_teacher(args, frames: np.ndarray) -> dict:
    from gendistill.video_distill.teachers import IMAGENET_MEAN, IMAGENET_STD

    ckpt = Path(args.work) / "teacher.pt"
    torch.manual_seed(args.teacher_seed)
    model = build_teacher()
    opt = torch.optim.AdamW(model.parameters(), lr=args.teacher_lr, betas=(0.9, 0.95), weight_decay=0.05)
    state = {"step": 0, "minutes": 0.0, "losses": [], "done": False, "steps_planned": None}
    state = resume(ckpt, "teacher", state, model=model, opt=opt)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)
    gen = torch.Generator().manual_seed(args.teacher_seed + state["step"])
    timer = _Timer(args.teacher_minutes, state["minutes"])
    last_save = timer.spent
    model.train()
    while not state["done"] and not timer.done():
        step = state["step"]
        if state["steps_planned"] is None and step >= 20:
            state["steps_planned"] = int(step * args.teacher_minutes / max(timer.spent, 1e-3))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.teacher_lr, 50, state["steps_planned"] or 10**6)
        idx = torch.randint(0, len(frames), (args.teacher_batch,), generator=gen).numpy()
        batch = frames[idx][:, 1:9]  # frames 1..8, as the teacher is fed in finetuning
        if torch.rand((), generator=gen) < 0.5:
            batch = batch[:, :, :, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(batch)).float().div(255).permute(0, 1, 4, 2, 3)
        x = (x - mean) / std
        mask = tube_mask(len(idx), model.config, args.mask_ratio, gen)
        loss = model(pixel_values=x, bool_masked_pos=mask).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        state["step"] += 1
        state["losses"].append(float(loss))
        if state["step"] % 50 == 0:
            print(f"teacher step {state['step']}: loss {np.mean(state['losses'][-50:]):.4f} ({timer.spent:.1f} min)",
                  flush=True)
        if timer.spent - last_save > args.save_every:
            state["minutes"] = timer.spent
            save_torch({"model": model.state_dict(), "opt": opt.state_dict(), "state": state}, ckpt)
            last_save = timer.spent
    state.update(done=True, minutes=timer.spent)
    save_torch({"model": model.state_dict(), "opt": opt.state_dict(), "state": state}, ckpt)
    out = Path(args.teacher_out)
    save_atomically(model.videomae.eval(), out)
    write_record(out, {"steps": state["step"], "minutes": round(state["minutes"], 2),
                       "loss_last_100": float(np.mean(state["losses"][-100:])), "seed": args.teacher_seed,
                       "clips": len(frames), "batch": args.teacher_batch, "mask_ratio": args.mask_ratio,
                       "lr": args.teacher_lr})
    return state


# -- stage 4: evaluation ---------------------------------------------------------------------------------------------
def evaluate(folder: Path, per_colour: int = 8, steps: int = 20, guidance: float = 3.0, seed: int = 0) -> dict:
    """Generate `per_colour` videos for each colour (held-out captions) with the saved pipeline; the rates of
    a moving ball of the prompted colour, per colour and in all."""
    from gendistill.video_distill import demo

    pipe = demo.load_base(folder)
    prompts = demo.held_out_prompts(per_colour)
    videos = demo.sample_videos(pipe, prompts, steps=steps, guidance_scale=guidance, seed=seed)
    ok = [demo.moving_ball(v, demo.prompt_colour(p)) for v, p in zip(videos, prompts)]
    per = {c: sum(o for o, p in zip(ok, prompts) if demo.prompt_colour(p) == c) for c in COLOURS}
    return {"moving_ball_rate": float(np.mean(ok)), "moving_ball_per_colour": per, "per_colour": per_colour,
            "steps": steps, "guidance_scale": guidance, "seed": seed}


def run_parallel(args, stages: list[str]) -> None:
    """Run `--stage S --threads 1` for each stage at once (one core each), logs in --work; raise if one fails."""
    import subprocess

    base = [sys.executable, "-u", str(Path(__file__).resolve()), "--threads", "1"]
    skip = {"--stage", "--threads"}
    argv, it = [], iter(sys.argv[1:])
    for a in it:  # pass the other options on
        if a.split("=")[0] in skip:
            if "=" not in a:
                next(it, None)
            continue
        argv.append(a)
    procs = []
    for stage in stages:
        log = open(Path(args.work) / f"{stage}.log", "a")
        procs.append((stage, subprocess.Popen(base + argv + ["--stage", stage], stdout=log, stderr=subprocess.STDOUT)))
    for stage, proc in procs:
        if proc.wait():
            raise RuntimeError(f"stage {stage} failed; see {Path(args.work) / (stage + '.log')}")


def main(argv=None) -> None:
    global LATENT_CHANNELS, THREADS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="all", choices=["all", "vae", "transformer", "teacher", "eval"])
    p.add_argument("--out", default=str(BASE))
    p.add_argument("--teacher-out", default=str(TEACHER))
    p.add_argument("--work", default=str(WORK), help="checkpoints and cached clips (resumed from)")
    p.add_argument("--clips", type=int, default=6144)
    p.add_argument("--teacher-clips", type=int, default=2048)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--teacher-seed", type=int, default=2)
    p.add_argument("--vae-minutes", type=float, default=21.0, help="one core, beside the teacher")
    p.add_argument("--transformer-minutes", type=float, default=31.0, help="two cores")
    p.add_argument("--teacher-minutes", type=float, default=10.0, help="one core, beside the VAE")
    p.add_argument("--vae-batch", type=int, default=4)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--teacher-batch", type=int, default=32)
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--save-every", type=float, default=3.0, help="CPU minutes between checkpoints")
    p.add_argument("--eval-per-colour", type=int, default=8)
    p.add_argument("--eval-guidance", type=float, default=3.0)
    p.add_argument("--latent-channels", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    THREADS = args.threads
    LATENT_CHANNELS = args.latent_channels
    out, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_wall = time.perf_counter()
    command = "OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python tools/train_video_demo_models.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    if args.stage == "all":  # the VAE and the teacher at once, one core each; then the rest here
        w0 = time.perf_counter()
        run_parallel(args, ["vae", "teacher"])
        print(f"vae and teacher: {(time.perf_counter() - w0) / 60:.1f} min wall", flush=True)
    if args.stage == "vae":
        m0 = cpu_minutes()
        frames, captions = clips_cached(work, args.clips, args.seed)
        write_record(out, {"data_minutes": round(cpu_minutes() - m0, 2)})
        train_vae(args, frames)
    if args.stage in ("all", "transformer"):
        frames, captions = clips_cached(work, args.clips, args.seed)
        res = train_vae(args, frames)
        vae = res["vae"]
        m0 = cpu_minutes()
        if not ((work / "vae_final.pt").is_file() and (work / "latents.pt").is_file()):
            params = encode_all(vae, frames)
            mean, logvar = params.chunk(2, dim=1)
            std = float((mean + torch.randn_like(mean) * (0.5 * logvar).exp()).std())
            vae.register_to_config(scaling_factor=1.0 / std)
            torch.save(params, work / "latents.pt")
            save_torch({"model": vae.state_dict(), "state": dict(res, vae=None), "scaling_factor": 1.0 / std},
                       work / "vae_final.pt")
        else:
            params = torch.load(work / "latents.pt")
        final = torch.load(work / "vae_final.pt", weights_only=False)
        vae.register_to_config(scaling_factor=final["scaling_factor"])
        quality = vae_quality(vae, frames[-64:], captions[-64:])
        print(f"vae: {res['step']} steps in {res['minutes']:.1f} min; {quality}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        write_record(out, {"clips": args.clips, "seed": args.seed, "frames": FRAMES, "size": SIZE,
                           "latents_minutes": round(cpu_minutes() - m0, 2), "vae_threads": 1,
                           "vae": {"steps": res["step"], "minutes": round(res["minutes"], 2), "batch": args.vae_batch,
                                   "lr": args.vae_lr, "kl_weight": args.vae_kl,
                                   "scaling_factor": vae.config.scaling_factor,
                                   "loss_last_100": np.mean(res["losses"][-100:], axis=0).tolist(), **quality},
                           "command": command})
        st = train_transformer(args, vae, params, captions)
        write_record(out, {"transformer": {"steps": st["step"], "minutes": round(st["minutes"], 2),
                                           "threads": args.threads, "batch": args.batch, "lr": args.lr,
                                           "ema": args.ema, "layers": args.layers,
                                           "loss_last_200": float(np.mean(st["losses"][-200:]))}})
    if args.stage == "teacher":
        tframes, _ = clips_cached(work, args.teacher_clips, args.teacher_seed)
        train_teacher(args, tframes)
    if args.stage in ("all", "eval"):
        m0 = cpu_minutes()
        result = evaluate(out, per_colour=args.eval_per_colour, guidance=args.eval_guidance)
        print(f"eval ({cpu_minutes() - m0:.1f} min): {result}", flush=True)
        write_record(out, {"eval": result})
    print(f"done ({args.stage}): {cpu_minutes():.1f} CPU minutes / {args.threads} thread(s), {(time.perf_counter() - t_wall) / 60:.1f} min wall; "
          f"{out}/, {args.teacher_out}/", flush=True)


if __name__ == "__main__":
    main()
