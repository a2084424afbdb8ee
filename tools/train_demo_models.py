"""Train the bundled demo model: a tiny pixel-space text-to-image pipeline for the snowman demo.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/train_demo_models.py            # ~45 min, 2 CPU cores
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/train_demo_models.py --minutes 5 --out /tmp/snowman-test

Data: orbit views of `assets/scenes/snowman.ply` rendered by gendistill itself, with the hat,
the nose and the snowman (body + head) recoloured from a palette of named colours, captioned
"a snowman with a blue hat and an orange nose". Rendering is linear in the Gaussians' colours, so
each view is rendered once as 16 feature channels (per part: its original RGB and its coverage)
plus alpha; any recolouring is then a weighted sum of these channels (done per batch, so every
step sees new colour combinations).

Model (pixel space 32x32, no VAE): `UNet2DConditionModel` (32, 64, 64), a 2-layer `CLIPTextModel`
(hidden 64), a word-level tokenizer, DDPM 1000 steps with a cosine schedule, epsilon prediction,
10% caption dropout, AdamW 1e-3, batch 64, EMA. Saved as a diffusers `StableDiffusionPipeline`
folder with `vae` (and the safety checker) null: `load_guidance(folder)` gives pixel-space SDS.
EMA weights are checkpointed to `--out` every `--save-every` steps (atomically), so an
interrupted run leaves a usable model.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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

from gendistill.core.cameras import Cameras, intrinsics_from_fov, look_at  # noqa: E402
from gendistill.core.render import rasterize  # noqa: E402
from gendistill.core.render.sh import sh_to_rgb  # noqa: E402
from gendistill.core.scene import GaussianScene  # noqa: E402

SCENE = ROOT / "assets/scenes/snowman.ply"
OUT = ROOT / "assets/models/snowman-tiny"
MASKS = ROOT / "assets/masks/snowman"
PARTS = ("body", "head", "nose", "hat")
PALETTE = {  # name -> RGB in [0, 1]
    "red": (0.85, 0.08, 0.08),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.08, 0.20, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "black": (0.05, 0.05, 0.05),
    "white": (0.95, 0.95, 0.95),
    "orange": (1.00, 0.50, 0.05),
    "purple": (0.55, 0.15, 0.75),
}
VIEW_WORDS = ("front", "side", "back", "overhead", "view")
WORDS = ("a", "an", "snowman", "with", "hat", "nose", "and", "coloured", "colored") + tuple(PALETTE) + VIEW_WORDS
BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
MAX_TOKENS = 16
SIZE = 32  # model resolution
RENDER = 64  # rendered, then 2x2-averaged to SIZE (what guidance `resolution: [32, 32]` does)
BACKGROUND = (0.6, 0.6, 0.6)
RADIUS_FACTOR = (2.3, 2.9)  # x the scene radius (half the bbox diagonal), as cameras.radius_factor
ELEVATION = (-5.0, 40.0)
FOV = 45.0


# ---------------------------------------------------------------------- data
def scene_radius(scene: GaussianScene) -> float:
    lo, hi = scene.bbox(0.01)
    return float((hi - lo).norm()) / 2.0


def random_cameras(scene: GaussianScene, n: int, rng: np.random.Generator, size: int = RENDER) -> Cameras:
    """`n` cameras on random orbit positions (z up) looking at the scene centre (jittered)."""
    center = scene.center(0.01).double()
    radius = scene_radius(scene) * rng.uniform(*RADIUS_FACTOR, n)
    az = np.deg2rad(rng.uniform(0, 360, n))
    el = np.deg2rad(rng.uniform(*ELEVATION, n))
    d = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1)
    target = center[None] + torch.from_numpy(rng.normal(0, 0.04, (n, 3)))
    eyes = target + torch.from_numpy(d * radius[:, None])
    k = intrinsics_from_fov(FOV, size, size)
    return Cameras(look_at(eyes, target, (0.0, 0.0, 1.0)), k.repeat(n, 1, 1), size, size)


def part_features(scene: GaussianScene) -> torch.Tensor:
    """[N, 16]: per part p (body, head, nose, hat) the DC RGB where the Gaussian is in p (3 channels
    each), then the one-hot part coverage (4 channels)."""
    ids = scene.extras["part"].long()
    onehot = F.one_hot(ids, len(PARTS)).float()
    rgb = sh_to_rgb(scene.sh[:, 0].float()).clamp(0, 1)
    return torch.cat([(rgb[:, None, :] * onehot[:, :, None]).flatten(1), onehot], 1)


def render_dataset(n: int, seed: int, batch: int = 32) -> torch.Tensor:
    """[n, 17, SIZE, SIZE] float16: 12 base-colour channels, 4 part coverages, alpha."""
    scene = GaussianScene.load_ply(SCENE)
    feats = part_features(scene)
    rng = np.random.default_rng(seed)
    args = {"means": scene.means, "quats": scene.quats, "scales": scene.scales(), "opacities": scene.opacities()}
    out = torch.empty(n, 17, SIZE, SIZE, dtype=torch.float16)
    t0 = time.time()
    for i in range(0, n, batch):
        m = min(batch, n - i)
        cams = random_cameras(scene, m, rng)
        with torch.no_grad():
            img, alpha, _ = rasterize(**args, colors=feats, viewmats=cams.viewmats.float(), Ks=cams.Ks.float(),
                                      width=RENDER, height=RENDER)
        x = torch.cat([img, alpha], -1).permute(0, 3, 1, 2)
        out[i:i + m] = F.avg_pool2d(x, RENDER // SIZE).half()
        if i // batch % 20 == 0:
            print(f"rendered {i + m}/{n} views ({time.time() - t0:.0f} s)", flush=True)
    return out


def compose(data: torch.Tensor, colours: torch.Tensor, recolour: torch.Tensor) -> torch.Tensor:
    """Images [B,3,H,W] in [0,1] from rendered channels `data` [B,17,H,W].

    colours: [B, 4, 3] new RGB per part; recolour: [B, 4] bool, False keeps the part's own colour.
    """
    data = data.float()
    base = data[:, :12].unflatten(1, (4, 3))  # [B,4,3,H,W]
    cover = data[:, 12:16, None]  # [B,4,1,H,W]
    new = cover * colours[:, :, :, None, None]
    parts = torch.where(recolour[:, :, None, None, None], new, base).sum(1)
    bg = torch.tensor(BACKGROUND).view(1, 3, 1, 1)
    return (parts + (1 - data[:, 16:17]) * bg).clamp(0, 1)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def random_captions(b: int, rng: random.Random, dropout: float = 0.1):
    """b captions and their colours: ([B] strings, [B,4,3] part colours, [B,4] recolour flags)."""
    names = list(PALETTE)
    colours = torch.zeros(b, 4, 3)
    recolour = torch.ones(b, 4, dtype=torch.bool)
    captions = []
    for i in range(b):
        hat = rng.choice(names)
        nose = "orange" if rng.random() < 0.3 else rng.choice(names)
        body = "white" if rng.random() < 0.6 else rng.choice(names)
        for p, c in zip(PARTS, (body, body, nose, hat)):
            colours[i, PARTS.index(p)] = torch.tensor(PALETTE[c]) + torch.empty(3).uniform_(-0.05, 0.05)
        if body == "white":  # keep the scene's own white (with its coal eyes, smile and buttons)
            recolour[i, :2] = False
        if rng.random() < 0.1:  # the scene as it is: white snowman, black hat with a red band, orange nose
            recolour[i] = False
            hat, nose, body = "black", "orange", "white"
        subject = "snowman" if body == "white" and rng.random() < 0.7 else f"{body} snowman"
        clauses = []
        if rng.random() < 0.9:
            clauses.append(f"{article(hat)} {hat} hat")
        if rng.random() < 0.5:
            clauses.append(f"{article(nose)} {nose} nose")
        text = f"{article(subject)} {subject}" + (" with " + " and ".join(clauses) if clauses else "")
        captions.append("" if rng.random() < dropout else text)
    return captions, colours.clamp(0, 1), recolour


# ---------------------------------------------------------------------- model
def build_tokenizer():
    """A word-level tokenizer (lower case, whitespace and punctuation split) as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {BOS: 0, EOS: 1, UNK: 2}
    for w in WORDS + (",",):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}", special_tokens=[(BOS, 0), (EOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=EOS,
                                   model_max_length=MAX_TOKENS)


def build_models(vocab_size: int, seed: int):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=64,
    ))
    unet = UNet2DConditionModel(
        sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              prediction_type="epsilon", clip_sample=True)
    return text, unet, scheduler


def portable_tokenizer_names(folder: Path) -> None:
    """Name the tokenizer `PreTrainedTokenizerFast` (transformers 4 and 5 both load that name; 5 saves
    its own `TokenizersBackend`, which 4 does not know)."""
    for path, key in ((folder / "model_index.json", "tokenizer"), (folder / "tokenizer/tokenizer_config.json", None)):
        cfg = json.loads(path.read_text())
        if key is None:
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            cfg.pop("backend", None)
        else:
            cfg[key] = ["transformers", "PreTrainedTokenizerFast"]
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_pipeline(out: Path, unet, text, tokenizer, scheduler, info: dict) -> None:
    """Write a StableDiffusionPipeline folder (vae, safety checker: null) to `out`, atomically."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=None, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        portable_tokenizer_names(tmp)
        (tmp / "training.json").write_text(json.dumps(info, indent=1) + "\n")
        readme = out / "README.md"
        if readme.exists():
            shutil.copy2(readme, tmp / "README.md")
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(unet, text, tokenizer, scheduler_config: dict, prompts: list[str], *, steps: int = 25, cfg: float = 4.0,
           seed: int = 0) -> torch.Tensor:
    """DDIM samples [B,3,SIZE,SIZE] in [0,1] for `prompts`, classifier-free guidance `cfg`."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    ids = tokenizer(prompts + [""], padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    emb = text(ids)[0]
    cond, uncond = emb[:-1], emb[-1:].expand(len(prompts), -1, -1)
    x = torch.randn(len(prompts), 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    for t in sched.timesteps:
        eps = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([cond, uncond])).sample
        e_c, e_u = eps.chunk(2)
        x = sched.step(e_u + cfg * (e_c - e_u), t, x).prev_sample
    return ((x + 1) / 2).clamp(0, 1)


def hat_colour(images: torch.Tensor, rows: float = 0.3) -> list[str]:
    """The palette colour of the hat in each sample [B,3,H,W]: among the top `rows` of the image,
    not background, the colour name whose palette value most pixels lie near (within 0.3)."""
    names = list(PALETTE)
    pal = torch.tensor([PALETTE[n] for n in names])  # [K,3]
    top = images[:, :, : max(1, int(rows * images.shape[-2]))].permute(0, 2, 3, 1).flatten(1, 2)  # [B,P,3]
    bg = (top - torch.tensor(BACKGROUND)).abs().amax(-1) < 0.12
    d = (top[:, :, None] - pal).norm(dim=-1)  # [B,P,K]
    near = (d < 0.3) & ~bg[..., None]
    return [names[int(c)] for c in near.sum(1).argmax(-1)]


def load_model(folder: Path):
    """(unet, text encoder, tokenizer, scheduler config) of a saved demo pipeline, via from_pretrained."""
    from gendistill.core.guidance.load import load_pipeline

    pipe = load_pipeline(str(folder), device="cpu")
    return pipe.unet.eval(), pipe.text_encoder.eval(), pipe.tokenizer, dict(pipe.scheduler.config)


def evaluate(folder: Path, n: int = 8, cfg: float = 4.0, steps: int = 20, sheet: Path | None = None) -> dict:
    """Per colour: the fraction of `n` samples of "a snowman with a <colour> hat" whose hat has that colour."""
    unet, text, tok, sconf = load_model(folder)
    acc, images = {}, []
    for i, colour in enumerate(PALETTE):
        x = sample(unet, text, tok, sconf, [f"{article(colour)} snowman with {article(colour)} {colour} hat"] * n,
                   steps=steps, cfg=cfg, seed=i)
        got = hat_colour(x)
        acc[colour] = sum(g == colour for g in got) / n
        images.append(x)
    if sheet is not None:
        from gendistill.core.media import contact_sheet, write_image

        x = F.interpolate(torch.cat(images), scale_factor=4, mode="nearest").permute(0, 2, 3, 1).numpy()
        write_image(sheet, contact_sheet(x, cols=n))
    return acc


# ---------------------------------------------------------------------- masks
def write_demo_masks(out: Path = MASKS, views: int = 12, size: int = 128) -> Path:
    """The demo's per-view hat masks: `views` cameras of `segment_cameras` (two orbit rings, 10 and 40
    degrees elevation), `size` pixels, rendered truth from the scene's `part` property
    (`write_mask_folder`: transforms.json, images/, masks/hat/)."""
    from gendistill.splat_edit.part_masks import write_mask_folder
    from gendistill.splat_edit.segment import segment_cameras

    scene = GaussianScene.load_ply(SCENE)
    if out.exists():
        shutil.rmtree(out)
    return write_mask_folder(scene, segment_cameras(scene, views, size), out, parts=["hat"])


# ---------------------------------------------------------------------- training
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--views", type=int, default=6144, help="pre-rendered views")
    p.add_argument("--cache", type=Path, default=ROOT / "outputs/demo-train/views.pt")
    p.add_argument("--minutes", type=float, default=45.0, help="training time budget (rendering included)")
    p.add_argument("--max-steps", type=int, default=100000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--masks", action="store_true", help=f"only write the demo mask folder ({MASKS.relative_to(ROOT)})")
    p.add_argument("--eval", action="store_true", help="only sample the model in --out: hat colour accuracy per colour")
    args = p.parse_args(argv)
    if args.eval:
        torch.set_num_threads(args.threads)
        acc = evaluate(args.out, sheet=args.out.parent / f"{args.out.name}-samples.png")
        print(json.dumps(acc), f"mean {np.mean(list(acc.values())):.2f}")
        return
    if args.masks:
        print(f"masks: {write_demo_masks()}")
        return
    start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    if args.cache.is_file():
        data = torch.load(args.cache)
        if data.shape[0] != args.views:
            data = None
    else:
        data = None
    if data is None:
        data = render_dataset(args.views, args.seed)
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        from gendistill.core.io import atomic_path
        with atomic_path(args.cache) as tmp:
            torch.save(data, tmp)
    print(f"{len(data)} views ready after {time.time() - start:.0f} s", flush=True)

    tokenizer = build_tokenizer()
    text, unet, scheduler = build_models(len(tokenizer), args.seed)
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema_unet, ema_text = (AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(args.ema)) for m in (unet, text))
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    warmup = 50
    sched_lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    acp = scheduler.alphas_cumprod
    n_unet = sum(p.numel() for p in unet.parameters())
    n_text = sum(p.numel() for p in text.parameters())
    print(f"unet {n_unet / 1e6:.2f}M, text encoder {n_text / 1e6:.2f}M parameters", flush=True)
    deadline = start + 60 * args.minutes
    losses, step = [], 0
    t0 = time.time()

    def checkpoint(final=False):
        info = {"steps": step, "batch": args.batch, "lr": args.lr, "ema": args.ema, "views": len(data),
                "seed": args.seed, "train_minutes": round((time.time() - start) / 60, 1),
                "loss_last_100": float(np.mean(losses[-100:])) if losses else None, "final": final,
                "palette": PALETTE, "background": BACKGROUND, "size": SIZE,
                "command": "OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/train_demo_models.py "
                           + " ".join(argv if argv is not None else sys.argv[1:])}
        save_pipeline(args.out, ema_unet.module, ema_text.module, tokenizer, scheduler, info)
        print(f"saved EMA weights at step {step} to {args.out}", flush=True)

    while step < args.max_steps and time.time() < deadline:
        idx = torch.randint(len(data), (args.batch,))
        captions, colours, recolour = random_captions(args.batch, rng)
        x0 = compose(data[idx], colours, recolour) * 2 - 1
        ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (args.batch,))
        a = acp[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(x_t, t, encoder_hidden_states=text(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched_lr.step()
        ema_unet.update_parameters(unet)
        ema_text.update_parameters(text)
        losses.append(loss.item())
        step += 1
        if step % 10 == 0:
            print(f"step {step} loss {np.mean(losses[-10:]):.4f} ({(time.time() - t0) / step:.2f} s/step, "
                  f"{(time.time() - start) / 60:.1f} min)", flush=True)
        if step % args.save_every == 0:
            checkpoint()
    checkpoint(final=True)
    print(f"done: {step} steps in {(time.time() - start) / 60:.1f} min, final loss {np.mean(losses[-100:]):.4f}")


if __name__ == "__main__":
    main()
