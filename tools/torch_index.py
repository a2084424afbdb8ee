"""Print the pip arguments that pick where torch comes from (nothing, or an index to use).

`make` installs `torch==2.13.0` before the package. On Linux, PyPI's torch wheel is a CUDA build of
several GB; PyTorch's CPU index holds the same release as a CPU build of ~200 MB. So on a machine with
no NVIDIA GPU that can reach the CPU index, this prints the arguments that take torch from it. Elsewhere
(a GPU machine, or no route to the index, as in CI) it prints nothing and the plain pin is installed:
there, the pin itself picks the CPU build that lies in pip's local wheel folder. The index is asked with
a short time-out, so an unreachable one costs at most `--timeout` seconds, never a network time-out.

    python tools/torch_index.py [--url URL] [--timeout S]
"""

from __future__ import annotations

import argparse
import shutil
import urllib.request
from pathlib import Path

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYPI = "https://pypi.org/simple"


def has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/gpus").is_dir()


def reachable(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/torch/", timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):  # URLError, time-out, refused, no such host, bad URL
        return False


def pip_args(url: str = CPU_INDEX, timeout: float = 2.0, gpu: bool | None = None) -> list[str]:
    if (has_nvidia_gpu() if gpu is None else gpu) or not reachable(url, timeout):
        return []
    return ["--index-url", url, "--extra-index-url", PYPI]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=CPU_INDEX, help="the CPU wheel index (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for it (default: %(default)s)")
    args = p.parse_args(argv)
    print(" ".join(pip_args(args.url, args.timeout)))


if __name__ == "__main__":
    main()
