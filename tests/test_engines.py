"""Distributed engines run for real on CPU (2 processes, gloo): FSDP2 through accelerate ends a tiny
finetune with the same weights as DDP under torchrun."""

import glob
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


def _finetune(launcher: list[str], out: Path, models: dict) -> subprocess.CompletedProcess:
    args = ["-m", "gendistill", "finetune", "--config", str(ROOT / "configs" / "video_distill" / "tiny_cpu.yaml"),
            f"output_dir={out}", f"model.pretrained={models['cogvideox']}", "model.tiny=false",
            f"teacher.path={models['videomae']}", "max_steps=2", "training_type=sft", "checkpoint.every=0",
            "validation.every=0", "report_to=none", "--no-progress"]  # the engines alone, no tracker threads
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([*launcher, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


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
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    ddp = _finetune([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                     str(free_port())], tmp_path / "ddp", models)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es)" in fsdp.stdout + fsdp.stderr and "2 process(es)" in ddp.stdout + ddp.stderr
    a, b, base = (_weights(p) for p in (tmp_path / "fsdp" / "export", tmp_path / "ddp" / "export",
                                        models["cogvideox"]))
    assert set(a) == set(b) == set(base)
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-5  # both trained
    for k in a:  # the sharded run gathers to the very weights the replicated one ends with
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
