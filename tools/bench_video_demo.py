"""The video demo's table: base model, plain finetune, finetune with TRD, over several generation seeds.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/bench_video_demo.py                 # runs the demo, 5 seeds
    .venv/bin/python tools/bench_video_demo.py --seeds 8 --steps 1000 --out outputs/bench_video_demo
    .venv/bin/python tools/bench_video_demo.py --results outputs/demo_video/results.json   # table of a run

Runs `gendistill.video_distill.demo.run` (the runner of `make demo-video`: both finetunes from the bundled
base model on held-out clips, generation for held-out prompts, `physics_score` per video) and prints one
row per model: residual (RMS px of the tracked ball from the best bouncing fit), gravity accuracy (the fitted
acceleration points down), bounce accuracy (the prompt's number of bounces), colour accuracy (the prompted
colour), the moving-ball rate and the metric's total implausibility, each the mean over seeds of the
per-seed means over prompts, with a 95% t interval over seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gendistill.video_distill import demo  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=None, help="print the table of this results.json instead of running")
    p.add_argument("--out", default="outputs/bench_video_demo")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--per-colour", type=int, default=2)
    p.add_argument("--inference-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=42, help="finetuning seed")
    args = p.parse_args(argv)
    if args.results:
        results = json.loads(Path(args.results).read_text())
    else:
        import torch

        torch.set_num_threads(2)
        results = demo.run(args.out, steps=args.steps, seeds=args.seeds, per_colour=args.per_colour,
                           inference_steps=args.inference_steps, seed=args.seed)
    print(f"{len(results['prompts'])} held-out prompts x {results['seeds']} seeds per model; finetunes: "
          f"{results['steps']} steps, seed {results['seed']}; mean [95% interval over seeds]")
    print(demo.format_table(results))
    print("per seed (residual px, gravity, bounce, colour):")
    for name, label in demo.MODELS.items():
        per = results["summary"][name]["per_seed"]
        cells = ", ".join(f"{s}: {v['residual_px']:.2f} / {v['gravity_acc']:.2f} / {v['bounce_acc']:.2f} / "
                          f"{v['colour_acc']:.2f}" for s, v in per.items())
        print(f"  {label}: {cells}")
    sec = results["seconds"]
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in sec.items()))


if __name__ == "__main__":
    main()
