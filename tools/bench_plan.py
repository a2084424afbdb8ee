"""Plan every shipped real-model config at full size (`gendistill plan`) and print one table.

    python tools/bench_plan.py [--configs romap_sd3 videorepa_2b_sft ...] [--json FILE] [override ...]

Columns: peak memory of one step (GiB) split into parameters, gradients, optimizer state and
activations; FLOPs per step; estimated s/step on an H200; the seconds the plan took on this machine;
and, where tools/measurements/full_size_h200.json has one, the peak measured on an H200.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIGS = {"romap_sd3": "splat_edit", "sds_sd21": "splat_edit", "ip2p": "splat_edit",
           "videorepa_2b_sft": "video_distill", "videorepa_5b_lora": "video_distill", "repa_baseline": "video_distill"}
MEASURED = ROOT / "tools" / "measurements" / "full_size_h200.json"


def measured_peaks() -> dict:
    if not MEASURED.is_file():
        return {}
    rows = json.loads(MEASURED.read_text())["rows"]
    return {(r["config"], r["shape"].split("batch ")[-1]): r["peak_steps_gib"] for r in rows if r.get("peak_steps_gib")}


def main(argv=None) -> None:
    from gendistill.plan import plan_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--json", help="also write the plans to this file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every config (e.g. batch_size=1)")
    args = p.parse_args(argv)
    measured, plans = measured_peaks(), []
    print("| config | batch | peak GiB | params | grads | optimizer | activations | TFLOP/step | H200 s/step "
          "| plan s | measured H200 peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.configs:
        result = plan_config(ROOT / "configs" / CONFIGS[name] / f"{name}.yaml", args.overrides)
        plans.append(result)
        m, g = result["memory"], 2**30
        batch = result["switches"].get("batch_size", 1)
        print(f"| {name} | {batch} | {result['peak_memory_bytes'] / g:.1f} | {(m['parameters'] + m['buffers']) / g:.1f} "
              f"| {m['gradients'] / g:.1f} | {m['optimizer_state'] / g:.1f} | {(m['activations'] + m['temporaries']) / g:.1f} "
              f"| {result['flops_per_step'] / 1e12:.1f} | {result['gpus']['H200']['s_per_step']} | {result['seconds']} "
              f"| {measured.get((name, str(batch)), '')} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(plans, indent=1))


if __name__ == "__main__":
    main()
