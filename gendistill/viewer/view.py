"""`gendistill view`: splat scenes in a local web viewer (viser), offline.

    gendistill view input.ply runs/gold_hat/edited.ply --labels runs/seg/labelled.ply --port 8080

viser serves its own client from its wheel, so nothing is fetched from the network. The viewer
shows each scene given (a drop-down switches between them: "before" and "after"), the parts of a
label field or of `masks3d/<part>.npy` files in their own colours (a check box each), and the
cameras of a camera file as frustums; clicking a frustum moves the view to that camera.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from gendistill.core.cameras import Cameras, load_cameras
from gendistill.core.scene import GaussianScene

__all__ = ["splat_arrays", "load_parts", "start_viewer", "PALETTE"]

# part colours (RGB in [0, 1]), in turn
PALETTE = np.array([[0.90, 0.10, 0.10], [0.10, 0.60, 0.95], [0.20, 0.80, 0.20], [0.95, 0.75, 0.10],
                    [0.70, 0.20, 0.90], [0.10, 0.85, 0.80], [0.95, 0.45, 0.10], [0.55, 0.55, 0.55]], np.float32)


def splat_arrays(scene: GaussianScene) -> dict[str, np.ndarray]:
    """What viser's `add_gaussian_splats` takes: centers [N,3], covariances [N,3,3] (R S^2 R^T),
    rgbs [N,3] (the SH DC colour, clamped to [0, 1]), opacities [N,1]."""
    s = scene.detach().to("cpu", torch.float32)
    q = s.normalized_quats()
    w, x, y, z = q.unbind(-1)
    rot = torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                       2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                       2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).reshape(-1, 3, 3)
    m = rot * s.scales()[:, None, :]
    return {"centers": s.means.numpy(), "covariances": (m @ m.transpose(1, 2)).numpy(),
            "rgbs": s.colors_rgb().clamp(0, 1).numpy(), "opacities": s.opacities()[:, None].numpy()}


def load_parts(scene: GaussianScene, labels: str | os.PathLike | None = None,
               masks3d: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """{part name: [N] bool} from a labelled PLY (integer `part` property, or a label field, with the
    names in its `part_names` comment), from `masks3d/<part>.npy` files, or from the scene itself.
    Counts that differ from the scene's are an error naming the file."""
    n = len(scene)
    if masks3d is not None:
        folder = Path(masks3d)
        files = sorted(folder.glob("*.npy"))
        if not files:
            raise FileNotFoundError(f"--masks3d {folder}: no <part>.npy files")
        out = {}
        for f in files:
            mask = np.load(f)
            if mask.shape != (n,):
                raise ValueError(f"--masks3d {f}: {mask.shape[0] if mask.ndim else 0} entries, the scene has {n} Gaussians")
            out[f.stem] = mask.astype(bool)
        return out
    source = GaussianScene.load(labels) if labels is not None else scene
    where = f"--labels {labels}" if labels is not None else "the scene"
    if len(source) != n:
        raise ValueError(f"{where}: {len(source)} Gaussians, the scene has {n}")
    if "part" in source.extras:
        ids = source.extras["part"].long().numpy()
    elif source.label_sh is not None:
        ids = source.label_sh[:, 0].argmax(-1).numpy()
    else:
        if labels is not None:
            raise ValueError(f"{where}: no `part` property and no label field")
        return {}
    names = source.metadata().get("part_names", "").split()
    return {(names[i] if i < len(names) else f"part_{i}"): ids == i for i in sorted(set(ids.tolist())) if i >= 0}


def start_viewer(scenes: dict[str, GaussianScene], *, parts: dict[str, np.ndarray] | None = None,
                 cameras: Cameras | None = None, host: str = "127.0.0.1", port: int = 8080,
                 coloured: Sequence[str] = ()):
    """Serve the scenes; returns (viser server, the URL). A port in use: the next free one, said.
    `coloured`: parts whose colour is on from the start."""
    import viser

    parts = parts or {}
    unknown = sorted(set(coloured) - set(parts))
    if unknown:
        raise ValueError(f"--colour: no part {', '.join(unknown)} (parts: {', '.join(parts) or 'none'})")
    server = viser.ViserServer(host=host, port=port, verbose=False)
    url = f"http://{host}:{server.get_port()}"
    if server.get_port() != port:
        print(f"port {port} is in use; the viewer is at {url}")
    nodes: dict[str, dict] = {}  # scene -> {"rest": node, "plain": {part: node}, "coloured": {part: node}}
    for k, (name, scene) in enumerate(scenes.items()):
        arrays = splat_arrays(scene)
        own = {part: mask for part, mask in parts.items() if len(mask) == len(scene)}  # labels of this scene
        rest = ~np.any(np.stack(list(own.values())), axis=0) if own else np.ones(len(scene), bool)
        node = {"rest": server.scene.add_gaussian_splats(f"/scenes/{k}/rest", **_subset(arrays, rest)),
                "plain": {}, "coloured": {}}
        for j, (part, mask) in enumerate(own.items()):
            node["plain"][part] = server.scene.add_gaussian_splats(f"/scenes/{k}/plain/{j}", **_subset(arrays, mask))
            coloured_arrays = _subset(arrays, mask)
            coloured_arrays["rgbs"] = np.broadcast_to(PALETTE[j % len(PALETTE)], coloured_arrays["rgbs"].shape).copy()
            node["coloured"][part] = server.scene.add_gaussian_splats(f"/scenes/{k}/coloured/{j}", **coloured_arrays)
        nodes[name] = node
    shown = server.gui.add_dropdown("scene", tuple(scenes), initial_value=next(iter(scenes)))
    toggles = {part: server.gui.add_checkbox(f"colour {part}", part in coloured) for part in parts}

    def refresh(_=None) -> None:
        for name, node in nodes.items():
            node["rest"].visible = name == shown.value
            for part in node["plain"]:
                node["plain"][part].visible = name == shown.value and not toggles[part].value
                node["coloured"][part].visible = name == shown.value and toggles[part].value

    shown.on_update(refresh)
    for toggle in toggles.values():
        toggle.on_update(refresh)
    refresh()
    if cameras is not None:
        _add_frustums(server, cameras)
    first = next(iter(scenes.values()))
    centre, radius = first.center(0.01).double().cpu().numpy(), float((lambda b: (b[1] - b[0]).norm())(first.bbox(0.01)))

    @server.on_client_connect
    def _frame(client) -> None:  # each new page starts looking at the first scene (z up, as the ring)
        client.camera.up_direction = (0.0, 0.0, 1.0)
        client.camera.position = centre + radius * np.array([1.2, 0.0, 0.35])
        client.camera.look_at = centre

    return server, url


def _subset(arrays: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {key: value[mask] for key, value in arrays.items()}


def _add_frustums(server, cameras: Cameras) -> None:
    """The cameras as frustums; a click moves every client's view to that camera."""
    import viser.transforms as vtf

    c2w = cameras.camtoworlds().double().cpu().numpy()
    fov = float(2 * np.arctan(cameras.height / (2 * float(cameras.Ks[0, 1, 1]))))
    for i in range(len(cameras)):
        wxyz = vtf.SO3.from_matrix(c2w[i, :3, :3]).wxyz
        frustum = server.scene.add_camera_frustum(f"/cameras/{i}", fov=fov, aspect=cameras.width / cameras.height,
                                                  scale=0.1, wxyz=wxyz, position=c2w[i, :3, 3])

        def jump(event, wxyz=wxyz, position=c2w[i, :3, 3]) -> None:
            for client in server.get_clients().values():
                client.camera.wxyz, client.camera.position = wxyz, position

        frustum.on_click(jump)


def view(scene_paths: Sequence[str], *, labels=None, masks3d=None, cameras=None, host="127.0.0.1", port=8080,
         coloured: Sequence[str] = ()):
    """The `gendistill view` command: load, check, serve until Ctrl-C."""
    import time

    scenes = {}
    for p in scene_paths:
        name = Path(p).stem if Path(p).stem not in scenes else str(p)
        scenes[name] = GaussianScene.load(p)
    parts = load_parts(next(iter(scenes.values())), labels, masks3d)
    cams = load_cameras(cameras) if cameras is not None else None
    server, url = start_viewer(scenes, parts=parts, cameras=cams, host=host, port=port, coloured=coloured)
    print(f"viewer: {url} (Ctrl-C stops it)")
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        server.stop()
        return 0
