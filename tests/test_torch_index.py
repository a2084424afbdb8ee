"""tools/torch_index.py: the Makefile takes torch from PyTorch's CPU index only when it answers quickly."""

import http.server
import importlib.util
import socket
import threading
import time
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("torch_index", Path(__file__).parents[1] / "tools" / "torch_index.py")
torch_index = importlib.util.module_from_spec(spec)
spec.loader.exec_module(torch_index)


class _Index(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/whl/cpu/torch/" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def index_url():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/whl/cpu"
    server.shutdown()


def test_a_reachable_cpu_index_is_used_without_a_gpu(index_url):
    assert torch_index.pip_args(index_url, gpu=False) == ["--index-url", index_url, "--extra-index-url", torch_index.PYPI]
    assert torch_index.pip_args(index_url, gpu=True) == []  # a GPU machine keeps the plain pin
    assert torch_index.pip_args(index_url + "/missing", gpu=False) == []  # no torch there


def test_an_unreachable_index_falls_back_at_once():
    with socket.socket() as s:  # a port nobody listens on: refused
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    t = time.perf_counter()
    assert torch_index.pip_args(f"http://127.0.0.1:{closed}/whl/cpu", gpu=False) == []
    assert torch_index.pip_args("https://no-such-host.invalid/whl/cpu", gpu=False) == []
    assert time.perf_counter() - t < 2


def test_a_silent_index_costs_only_the_short_time_out():
    with socket.socket() as s:  # accepts the connection (kernel backlog) but never answers
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        t = time.perf_counter()
        assert torch_index.pip_args(f"http://127.0.0.1:{s.getsockname()[1]}/whl/cpu", timeout=0.5, gpu=False) == []
        assert time.perf_counter() - t < 1.5
