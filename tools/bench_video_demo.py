"""The video demo's table: base model, plain finetune, finetune with TRD, over several generation seeds.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/bench_video_demo.py                 # runs the demo, 5 seeds
    .venv/bin/python tools/bench_video_demo.py --seeds 8 --steps 1000 --out outputs/bench_video_demo
    .venv/bin/python tools/bench_video_demo.py --results outputs/demo_video/results.json   # table of a run
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/bench_video_demo.py --finetune-seeds 3   # training noise too

Runs `gendistill.video_distill.demo.run` (the runner of `make demo-video`: both finetunes from the bundled
base model on held-out clips, generation for held-out prompts, `physics_score` per video) and prints one
row per model: residual (RMS px of the tracked ball from the best bouncing fit), gravity accuracy (the fitted
acceleration points down), bounce accuracy (the prompt's number of bounces), colour accuracy (the prompted
colour), the moving-ball rate and the metric's total implausibility, each the mean over seeds of the
per-seed means over prompts, with a 95% t interval over seeds.

`--finetune-seeds N` repeats the demo with finetuning seeds seed, seed+1, ... (one run folder each, the
generation seeds the same) and adds a table over finetuning runs: each run's mean over generation seeds,
summarized over runs, and TRD minus plain paired by finetuning seed. The intervals over generation seeds
alone leave out how much two finetunes with different seeds differ; this one does not.
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
    p.add_argument("--results", nargs="+", default=None,
                   help="print the tables of these results.json files (finetuning runs) instead of running")
    p.add_argument("--out", default="outputs/bench_video_demo")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--per-colour", type=int, default=2)
    p.add_argument("--inference-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=42, help="finetuning seed")
    p.add_argument("--finetune-seeds", type=int, default=1, help="finetuning runs (seeds seed, seed+1, ...)")
    args = p.parse_args(argv)
    if args.results:
        runs = [json.loads(Path(f).read_text()) for f in args.results]
    else:
        import torch

        torch.set_num_threads(2)
        runs = []
        for k in range(args.finetune_seeds):
            out = Path(args.out) if args.finetune_seeds == 1 else Path(args.out) / f"finetune_seed{args.seed + k}"
            runs.append(demo.run(out, steps=args.steps, seeds=args.seeds, per_colour=args.per_colour,
                                 inference_steps=args.inference_steps, seed=args.seed + k))
    for results in runs:
        print_run(results)
    if len(runs) > 1:
        print_over_runs(runs)


def print_run(results: dict) -> None:
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


def print_over_runs(runs: list[dict]) -> None:
    """The finetunes over finetuning seeds: mean [95% t interval over runs] of each run's mean over generation
    seeds, and TRD - plain paired by run."""
    from gendistill.video_distill.physics import summarize

    seeds = [r["seed"] for r in runs]
    print(f"\nover {len(runs)} finetuning runs (seeds {', '.join(map(str, seeds))}); mean [95% interval over runs]")
    per_run = {name: [{k: r["summary"][name][k]["mean"] for k in demo.METRICS if k in r["summary"][name]}
                      for r in runs] for name in ("plain", "trd")}
    diff = [{k: t[k] - q[k] for k in t if k in q} for t, q in zip(per_run["trd"], per_run["plain"])]
    rows = {"finetune (plain)": summarize(per_run["plain"]), "finetune + TRD": summarize(per_run["trd"]),
            "TRD - plain (paired)": summarize(diff)}
    print("| model | " + " | ".join(label for label, _ in demo.METRICS.values()) + " |")
    print("|" + " --- |" * (len(demo.METRICS) + 1))
    for label, stats in rows.items():
        fmt = "{:+.2f}" if label.startswith("TRD -") else "{:.2f}"
        cells = []
        for key, (_, kind) in demo.METRICS.items():
            st, scale = stats.get(key), (100.0 if kind == "rate" else 1.0)
            if st is None:
                cells.append("n/a")
                continue
            low, high = st["low"], st["high"]
            if kind == "rate" and not label.startswith("TRD -"):  # shown clipped to 0-100%, as in the demo
                low, high = max(low, 0.0), min(high, 1.0)
            cells.append(f"{fmt.format(scale * st['mean'])} [{fmt.format(scale * low)}, {fmt.format(scale * high)}]")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("(rates in %; their differences in percentage points)")


if __name__ == "__main__":
    main()
