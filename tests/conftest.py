import os
import socket
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
REAL_SAMPLE = ROOT / "tests" / "data" / "garden"  # cut from SHARED_DATA by tools/make_real_sample.py

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def real_sample() -> Path:
    """The small real-data sample committed in tests/data/garden (README and licence there)."""
    return REAL_SAMPLE


@pytest.fixture(params=["sample", "full"])
def garden_points(request) -> tuple[Path, float]:
    """(npz path, the share of pixels its points cover at a quarter of camera 0's size): the committed
    8,000-point sample everywhere, and the full 138,766 points where `../shared/data` exists."""
    if request.param == "sample":
        return REAL_SAMPLE / "garden_points.npz", 0.25
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is not present (the committed sample ran)")
    return SHARED_DATA / "test_garden.npz", 0.5


@pytest.fixture
def free_port():
    """A function returning a free local TCP port (for a torchrun rendezvous)."""
    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    return port


@pytest.fixture
def decoded_frames(monkeypatch) -> list:
    """Every frame the streaming video decoder turns out (`data._decoded_frames`), appended as it goes:
    what a test counts to show that only the sampled frames were decoded."""
    import gendistill.video_distill.data as data

    decoded, real = [], data._decoded_frames

    def spy(container, stream):
        for frame in real(container, stream):
            decoded.append(frame)
            yield frame

    monkeypatch.setattr(data, "_decoded_frames", spy)
    return decoded


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny scenes and models: one torch and numba thread avoids thread wake-up
    costs that dominate on a busy machine."""
    import numba

    old = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(old[0])
    numba.set_num_threads(old[1])


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
