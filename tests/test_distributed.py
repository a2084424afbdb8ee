"""Several processes (2 on CPU, under torchrun): a failing rank stops them all; unshared folders are refused."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gendistill.testing.video import write_tiny_models

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "video_distill" / "tiny_cpu.yaml"
CLIPS = ROOT / "assets" / "clips"

# Runs the real CLI; rank 1 raises at the named place and notes the moment in FAILED_AT.
_FAILING_RANK = """
import os, sys, time
from gendistill import cli
from gendistill.video_distill import trainer as T

where, mark = os.environ["FAIL_IN"], os.environ["FAILED_AT"]
original = getattr(T.VideoREPATrainer, where)
def failing(self, *args, **kwargs):
    if self.rank == 1 and (where != "training_step" or self.step == 1):
        open(mark, "w").write(str(time.time()))
        raise RuntimeError(f"injected failure in {where} on rank 1")
    return original(self, *args, **kwargs)
setattr(T.VideoREPATrainer, where, failing)
sys.exit(cli.main(sys.argv[1:]))
"""


# Runs the real CLI; rank 1 cannot see the files the main process writes (as on another machine
# without a shared filesystem).
_UNSHARED = """
import os, sys
from pathlib import Path
from gendistill import cli

is_file = Path.is_file
if os.environ["RANK"] == "1":
    Path.is_file = lambda self: not self.name.startswith(".shared-check-") and is_file(self)
sys.exit(cli.main(sys.argv[1:]))
"""


def _torchrun(script_text, tmp_path, port, args, **env):
    script = tmp_path / "run_rank.py"
    script.write_text(script_text)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), str(script), *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["_encode_clip_batch", "training_step"])  # precompute, training
def test_a_failing_rank_stops_every_rank_within_60_s(tiny_models, tmp_path, free_port, where):
    mark = tmp_path / "failed_at"
    args = ["finetune", "--config", str(TINY), f"output_dir={tmp_path / 'run'}", f"data.path={CLIPS}",
            f"model.pretrained={tiny_models['cogvideox']}", f"teacher.path={tiny_models['videomae']}",
            "max_steps=50", "checkpoint.every=0", "validation.every=0", f"data.cache_dir={tmp_path / 'cache'}"]
    proc = _torchrun(_FAILING_RANK, tmp_path, free_port(), args, FAIL_IN=where, FAILED_AT=str(mark))
    ended = time.time()
    assert mark.is_file(), proc.stderr[-3000:]  # the failure was injected (not some other error)
    assert proc.returncode != 0
    assert f"injected failure in {where} on rank 1" in proc.stderr
    print(f"{where}: every process ended {ended - float(mark.read_text()):.1f} s after the failure")
    assert ended - float(mark.read_text()) < 60, proc.stderr[-3000:]


@pytest.mark.slow
def test_a_folder_one_process_cannot_see_is_refused_before_models_load(tiny_models, tmp_path, free_port):
    out = tmp_path / "run"
    args = ["finetune", "--config", str(TINY), f"output_dir={out}", f"data.path={CLIPS}",
            f"model.pretrained={tiny_models['cogvideox']}", f"teacher.path={tiny_models['videomae']}", "max_steps=2"]
    proc = _torchrun(_UNSHARED, tmp_path, free_port(), args)
    assert proc.returncode != 0
    assert f"process 1 on {socket.gethostname()} cannot see {out}" in proc.stderr, proc.stderr[-3000:]
    assert "shared" in proc.stderr and "output_dir" in proc.stderr
    assert not (out / "cache").exists() and not list(out.glob(".shared-check-*"))  # nothing was computed or left
