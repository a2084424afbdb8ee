"""Distributed engines run for real on CPU (2 processes, gloo): FSDP2 through accelerate ends a tiny
finetune with the same weights as DDP under torchrun, and both end cleanly with the tensorboard tracker on."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gendistill.testing.video import write_tiny_models

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in glob.glob(str(folder / "transformer" / "*.safetensors")):
        out.update(load_file(f))
    return out


# `python -m gendistill`, then each rank notes the threads still alive when Python starts shutting down
_NOTE_THREADS = """
import json, os, sys, threading
from gendistill import cli

code = cli.main(sys.argv[1:])
tasks = "/proc/self/task"
native = []
for tid in os.listdir(tasks) if os.path.isdir(tasks) else []:
    try:
        native.append(open(os.path.join(tasks, tid, "comm")).read().strip())
    except OSError:
        pass
python = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
with open(os.path.join(os.environ["NOTE_THREADS"], "threads-rank" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump({"native": native, "python": python}, f)
sys.exit(code)
"""


def _finetune(launcher: list[str], out: Path, models: dict) -> subprocess.CompletedProcess:
    script = out.parent / "note_threads.py"
    script.write_text(_NOTE_THREADS)
    args = [str(script), "finetune", "--config", str(ROOT / "configs" / "video_distill" / "tiny_cpu.yaml"),
            f"output_dir={out}", f"model.pretrained={models['cogvideox']}", "model.tiny=false",
            f"teacher.path={models['videomae']}", "max_steps=2", "training_type=sft", "checkpoint.every=0",
            "validation.every=0", "report_to=tensorboard", "--no-progress"]
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), NOTE_THREADS=str(out))
    return subprocess.run([*launcher, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _assert_clean_exit(proc: subprocess.CompletedProcess, out: Path) -> None:
    """Exit 0, no C++ abort, and nothing left running into interpreter shutdown: no gloo worker threads
    (a gloo worker freeing tensors there aborts the process: "terminate called without an active
    exception"), no tensorboard writer thread; the tracker's events are written."""
    assert proc.returncode == 0 and "terminate called" not in proc.stderr, proc.stderr[-3000:]
    for rank in (0, 1):
        threads = json.loads((out / f"threads-rank{rank}.json").read_text())
        assert not [n for n in threads["native"] if "gloo" in n], (rank, threads)
        assert set(threads["python"]) <= {"tqdm_monitor"}, (rank, threads)
    assert len(list((out / "logs").rglob("events.out.tfevents.*"))) == 2  # the run's, its hyperparameters'


def _has_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_fsdp2(), reason="this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
def test_fsdp2_on_cpu_ends_with_the_same_weights_as_ddp(tmp_path, free_port):
    models = write_tiny_models(tmp_path / "models")
    config = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp2.yaml").read_text())  # the committed one,
    config.update(use_cpu=True, num_processes=2, mixed_precision="no")  # on 2 CPU processes in fp32
    (tmp_path / "fsdp2_cpu.yaml").write_text(yaml.safe_dump(config))
    fsdp = _finetune([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                      str(tmp_path / "fsdp2_cpu.yaml"), "--main_process_port", str(free_port())],
                     tmp_path / "fsdp", models)
    _assert_clean_exit(fsdp, tmp_path / "fsdp")
    ddp = _finetune([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                     str(free_port())], tmp_path / "ddp", models)
    _assert_clean_exit(ddp, tmp_path / "ddp")
    assert "2 process(es)" in fsdp.stdout + fsdp.stderr and "2 process(es)" in ddp.stdout + ddp.stderr
    a, b, base = (_weights(p) for p in (tmp_path / "fsdp" / "export", tmp_path / "ddp" / "export",
                                        models["cogvideox"]))
    assert set(a) == set(b) == set(base)
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-5  # both trained
    for k in a:  # the sharded run gathers to the very weights the replicated one ends with
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
