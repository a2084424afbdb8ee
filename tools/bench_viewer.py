"""The viewer in a real browser (headless chromium, software WebGL, driven by Playwright): the time
from `gendistill view` to the first frame, and what a click on each snowman part selects.

    python tools/bench_viewer.py [--scene assets/scenes/snowman.ply] [--repeats 3]

Prints two tables: launch -> page served -> canvas -> first frame with the scene in it (seconds,
median of the repeats); and per part, clicking its centre pixel: the IoU of the selection with the
true part, grown by the labels and by colour alone (no labels), and the seconds from the click to
the selection. The click goes to the pixel deepest inside the part's visible area in our own render
at the browser's camera.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gendistill.core.scene import GaussianScene  # noqa: E402
from gendistill.viewer.select import client_camera  # noqa: E402
from gendistill.viewer.view import load_parts, start_viewer  # noqa: E402

ARGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist", "--no-sandbox"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(condition, seconds: float) -> float | None:
    t, end = time.perf_counter(), time.perf_counter() + seconds
    while time.perf_counter() < end:
        if condition():
            return time.perf_counter() - t
        time.sleep(0.05)
    return None


def launch_to_first_frame(browser, scene: Path) -> dict[str, float]:
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gendistill", "view", str(scene), "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def served() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}", timeout=1).status == 200
            except OSError:
                return False

        wait(served, 120)
        t_served = time.perf_counter() - t0
        page = browser.new_page(viewport={"width": 1024, "height": 768})
        page.goto(f"http://127.0.0.1:{port}")
        page.wait_for_selector("canvas", timeout=60_000)
        t_canvas = time.perf_counter() - t0

        def drawn() -> bool:  # enough non-white pixels in the middle of the canvas
            import imageio.v3 as iio

            img = iio.imread(page.screenshot())[200:600, 300:700, :3].astype(np.int32)
            return int(((255 - img).sum(-1) > 60).sum()) > 2000

        wait(drawn, 120)
        t_frame = time.perf_counter() - t0
        page.close()
    finally:
        proc.terminate()
        proc.wait(30)
    return {"served": t_served, "canvas": t_canvas, "first frame": t_frame}


def front_part(scene: GaussianScene, parts: dict[str, np.ndarray], camera) -> torch.Tensor:
    """[H, W] index of the part in front at each pixel of our render (-1: none, or no part there)."""
    from gendistill.core.render import rasterize

    onehot = torch.from_numpy(np.stack(list(parts.values()), -1).astype(np.float32))  # [N, P]
    args = dict(scene.render_args(), colors=onehot.to(scene.means.dtype), sh_degree=None)
    img, alpha, _ = rasterize(**args, viewmats=camera.viewmats, Ks=camera.Ks, width=camera.width, height=camera.height)
    best = img[0].argmax(-1)
    return torch.where((alpha[0, ..., 0] > 0.5) & (img[0].max(-1).values > 0.5), best, -1)


def clicks(browser, scene: GaussianScene) -> list[tuple[str, float, float, float]]:
    parts = load_parts(scene)
    rows = []
    for labelled in (True, False):
        viewer = start_viewer({"scene": scene}, parts=parts if labelled else {}, port=free_port())
        page = browser.new_page(viewport={"width": 1024, "height": 768})
        page.goto(viewer.url)
        page.wait_for_selector("canvas", timeout=60_000)
        wait(lambda: len(viewer.server.get_clients()) == 1, 30)
        (client,) = viewer.server.get_clients().values()
        wait(lambda: client.camera.image_width == 1024 and abs(client.camera.up_direction[2] - 1) < 1e-6, 30)
        time.sleep(3)
        cam = client.camera
        camera = client_camera(cam.position, cam.wxyz, cam.fov, cam.image_width, cam.image_height)
        front = front_part(scene, parts, camera)
        for i, (name, mask) in enumerate(parts.items()):
            viewer.selection["scene"][:] = False
            inside = distance_transform_edt((front == i).numpy())  # the pixel deepest inside the part's visible area
            y, x = np.unravel_index(inside.argmax(), inside.shape)
            page.mouse.click(float(x) + 0.5, float(y) + 0.5)
            seconds = wait(lambda: viewer.selection["scene"].any(), 30)
            sel = viewer.selection["scene"]
            iou = float((sel & mask).sum() / max(1, (sel | mask).sum()))
            rows.append((name, labelled, iou, seconds if seconds is not None else float("nan")))
        page.close()
        viewer.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scene", default=str(ROOT / "assets" / "scenes" / "snowman.ply"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no chromium: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=ARGS)
        runs = [launch_to_first_frame(browser, Path(args.scene)) for _ in range(args.repeats)]
        print(f"\n`gendistill view {Path(args.scene).name}` in headless chromium (software WebGL), "
              f"seconds from launch, median of {args.repeats}")
        print("| served | canvas | first frame |\n|---|---|---|")
        print("| " + " | ".join(f"{np.median([r[k] for r in runs]):.1f}" for k in runs[0]) + " |")
        rows = clicks(browser, GaussianScene.load(args.scene))
        browser.close()
    print("\na click inside each part (its visible pixel farthest from its outline)")
    print("| part | grown by | IoU with the part | seconds to the selection |\n|---|---|---|---|")
    for name, labelled, iou, seconds in rows:
        print(f"| {name} | {'labels' if labelled else 'colour'} | {iou:.3f} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
