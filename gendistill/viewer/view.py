"""`gendistill view`: splat scenes in a local web viewer (viser), offline.

    gendistill view input.ply runs/gold_hat/edited.ply --labels runs/seg/labelled.ply --port 8080

viser serves its own client from its wheel, so nothing is fetched from the network. The viewer
shows each scene given (a drop-down switches between them: "before" and "after"), the parts of a
label field or of `masks3d/<part>.npy` files in their own colours (a check box each), and the
cameras of a camera file as frustums; clicking a frustum moves the view to that camera.

Picking a part: a click selects the Gaussians that make the clicked pixel in our own rasterizer at
the browser's camera, grown to their part (`viewer.select`); shift+click adds, ctrl/cmd+click
subtracts, a shift+drag box takes the visible Gaussians inside it; undo, clear, and "save part"
writes `OUT/masks3d/<name>.npy` and `OUT/labelled.ply`, which `gendistill edit` takes as
`segment.mask_file=OUT` or `segment.labelled_ply=OUT/labelled.ply`. "Render as the editor sees it"
shows our rasterizer's image of the current view beside the browser's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from gendistill.core.cameras import Cameras, load_cameras
from gendistill.core.io import atomic_path
from gendistill.core.render import rasterize
from gendistill.core.scene import GaussianScene
from gendistill.viewer.select import SELECT_MODES, client_camera, combine, grow, pick, pick_box

__all__ = ["splat_arrays", "gaussian_arrays", "load_parts", "start_viewer", "Viewer", "part_labels", "display_colours", "save_parts",
           "save_selection", "render_view", "check_part_name", "frame_clients", "PALETTE", "SELECTION_RGB"]

# part colours (RGB in [0, 1]), in turn
PALETTE = np.array([[0.90, 0.10, 0.10], [0.10, 0.60, 0.95], [0.20, 0.80, 0.20], [0.95, 0.75, 0.10],
                    [0.70, 0.20, 0.90], [0.10, 0.85, 0.80], [0.95, 0.45, 0.10], [0.55, 0.55, 0.55]], np.float32)


def splat_arrays(scene: GaussianScene) -> dict[str, np.ndarray]:
    """What viser's `add_gaussian_splats` takes: centers [N,3], covariances [N,3,3] (R S^2 R^T),
    rgbs [N,3] (the SH DC colour, clamped to [0, 1]), opacities [N,1]."""
    s = scene.detach().to("cpu", torch.float32)
    return gaussian_arrays(s.means, s.quats, s.scales(), s.opacities(), s.colors_rgb())


def gaussian_arrays(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, opacities: torch.Tensor,
                    rgbs: torch.Tensor) -> dict[str, np.ndarray]:
    """`splat_arrays` from activated tensors: means [N,3], quats [N,4] wxyz (normalized here),
    scales [N,3], opacities [N], rgbs [N,3]."""
    t = [x.detach().to("cpu", torch.float32) for x in (means, quats, scales, opacities, rgbs)]
    means, quats, scales, opacities, rgbs = t
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    rot = torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                       2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                       2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).reshape(-1, 3, 3)
    m = rot * scales[:, None, :]
    return {"centers": means.numpy(), "covariances": (m @ m.transpose(1, 2)).numpy(),
            "rgbs": rgbs.clamp(0, 1).numpy(), "opacities": opacities.reshape(-1, 1).numpy()}


def load_parts(scene: GaussianScene, labels: str | os.PathLike | None = None,
               masks3d: str | os.PathLike | None = None,
               read_label_field: Callable[[GaussianScene], dict] | None = None) -> dict[str, np.ndarray]:
    """{part name: [N] bool} from a labelled PLY (an integer `part` property with the names in its
    `part_names` comment, or a 3D-GALP label field read by `read_label_field(scene) -> {part: [N]
    bool}`), from `masks3d/<part>.npy` files, or from the scene itself. Counts that differ from the
    scene's are an error naming the file."""
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
    if source.label_sh is not None:  # a label field is what a labelled PLY is about; it wins a `part` property
        if read_label_field is None:
            raise ValueError(f"{where}: a label field, and no reader for it was given")
        return {name: np.asarray(mask.cpu() if torch.is_tensor(mask) else mask, bool)
                for name, mask in read_label_field(source).items()}
    if "part" not in source.extras:
        if labels is not None:
            raise ValueError(f"{where}: no `part` property and no label field")
        return {}
    ids = source.extras["part"].long().numpy()
    names = source.metadata().get("part_names", "").split()
    return {(names[i] if i < len(names) else f"part_{i}"): ids == i for i in sorted(set(ids.tolist())) if i >= 0}


SELECTION_RGB = np.array([1.0, 0.3, 0.7], np.float32)  # hot pink: not a part colour
RENDER_MAX_SIZE = 512  # long side of the images our rasterizer makes for clicks and the render panel


@dataclass
class Viewer:
    """A running viewer: the viser server, its URL, and what the user has made so far.

    Attributes:
        selection: {scene name: [N] bool} the current selection in each scene.
        parts: {part name: [N] bool} of the first scene: those loaded, then those saved.
        saved: files written by "save part", in order.
    """

    server: object
    url: str
    selection: dict[str, np.ndarray]
    parts: dict[str, np.ndarray]
    saved: list[Path] = field(default_factory=list)

    def stop(self) -> None:
        self.server.stop()


def part_labels(parts: dict[str, np.ndarray], n: int) -> np.ndarray:
    """[n] int64 part index of each Gaussian (in `parts` order; the first part wins), -1 for none."""
    out = np.full(n, -1, np.int64)
    for i, mask in reversed(list(enumerate(parts.values()))):
        if len(mask) == n:
            out[mask] = i
    return out


def display_colours(rgbs: np.ndarray, parts: dict[str, np.ndarray], shown: Sequence[str],
                    selection: np.ndarray | None = None) -> np.ndarray:
    """[N, 3] colours to show: `rgbs` [N, 3], each part in `shown` in its PALETTE colour (by its place
    in `parts`), the selection [N] bool in SELECTION_RGB on top."""
    out = rgbs.copy()
    for i, (name, mask) in enumerate(parts.items()):
        if name in shown and len(mask) == len(out):
            out[mask] = PALETTE[i % len(PALETTE)]
    if selection is not None:
        out[selection] = SELECTION_RGB
    return out


def check_part_name(name: str, where: str = "part name") -> str:
    """The name stripped; ValueError unless it can be a file name (masks3d/<name>.npy)."""
    name = name.strip()
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise ValueError(f"{where}: {name!r} cannot name a part (it becomes masks3d/<name>.npy)")
    return name


def save_parts(out: str | os.PathLike, scene: GaussianScene, parts: dict[str, np.ndarray],
               write_labelled: Callable[[GaussianScene, dict[str, np.ndarray]], GaussianScene] | None = None
               ) -> list[Path]:
    """Write OUT/masks3d/<part>.npy ([N] bool, input order) for every part and, with
    `write_labelled(scene, parts) -> labelled scene`, OUT/labelled.ply; each file atomically. Returns
    the paths written."""
    out = Path(out)
    written = []
    for name, mask in parts.items():
        if mask.shape != (len(scene),):
            raise ValueError(f"part {name!r} has {mask.shape[0]} entries, the scene {len(scene)} Gaussians")
        path = out / "masks3d" / f"{check_part_name(name)}.npy"
        with atomic_path(path) as tmp:
            np.save(tmp, mask.astype(bool))
        written.append(path)
    if write_labelled is not None and parts:
        write_labelled(scene, parts).save(out / "labelled.ply")
        written.append(out / "labelled.ply")
    return written


def start_viewer(scenes: dict[str, GaussianScene], *, parts: dict[str, np.ndarray] | None = None,
                 cameras: Cameras | None = None, host: str = "127.0.0.1", port: int = 8080,
                 coloured: Sequence[str] = (), out: str | os.PathLike = "selection",
                 write_labelled=None, from_text=None, from_selection=None, backend: str = "auto") -> Viewer:
    """Serve the scenes; returns the running `Viewer`. A port in use: the next free one, said.

    `coloured`: parts whose colour is on from the start. Picking: a click selects the part under
    the cursor (shift+click adds to the selection, ctrl/cmd+click subtracts), a shift+drag box the
    visible Gaussians inside it; "save part" writes OUT/masks3d/<name>.npy and, with
    `write_labelled` (see `save_parts`), OUT/labelled.ply. With `from_text(scene, phrase) -> [N]
    bool` a "from text" box selects what a phrase names, with `from_selection(scene, [N] bool) -> [N]
    bool` a button refines the selection (the command line passes CLIPSeg and SAM lifted by 3D-GALP).
    """
    import viser

    parts = dict(parts or {})
    unknown = sorted(set(coloured) - set(parts))
    if unknown:
        raise ValueError(f"--colour: no part {', '.join(unknown)} (parts: {', '.join(parts) or 'none'})")
    server = viser.ViserServer(host=host, port=port, verbose=False)
    url = f"http://{host}:{server.get_port()}"
    if server.get_port() != port:
        print(f"port {port} is in use; the viewer is at {url}")
    viewer = Viewer(server, url, {name: np.zeros(len(sc), bool) for name, sc in scenes.items()}, parts)
    base = {name: splat_arrays(sc) for name, sc in scenes.items()}
    nodes = {name: server.scene.add_gaussian_splats(f"/scenes/{k}", **base[name])
             for k, name in enumerate(scenes)}
    history: dict[str, list[np.ndarray]] = {name: [] for name in scenes}

    shown = server.gui.add_dropdown("scene", tuple(scenes), initial_value=next(iter(scenes)))
    with server.gui.add_folder("parts"):
        toggles = {part: server.gui.add_checkbox(f"colour {part}", part in coloured) for part in parts}
    with server.gui.add_folder("select"):
        mode = server.gui.add_dropdown("click", SELECT_MODES, initial_value="replace",
                                       hint="shift+click adds, ctrl/cmd+click subtracts, shift+drag: a box")
        status = server.gui.add_markdown("Click the scene to select a part.")
        name_box = server.gui.add_text("part name", "")
        out_box = server.gui.add_text("save to", str(out))
        undo, clear, save = (server.gui.add_button(label) for label in ("undo", "clear", "save part"))
    if from_text is not None or from_selection is not None:
        with server.gui.add_folder("select with a model"):
            phrase = server.gui.add_text("phrase", "", visible=from_text is not None)
            by_text = server.gui.add_button("select from text", visible=from_text is not None)
            by_sam = server.gui.add_button("refine the selection (SAM)", visible=from_selection is not None)

        def run_model(fn, arg, what: str) -> None:
            try:
                say(f"{what}: running (this takes a while on a CPU)")
                new = np.asarray(fn(scenes[shown.value], arg), bool)
                set_selection(combine(torch.from_numpy(viewer.selection[shown.value]), torch.from_numpy(new),
                                      mode.value).numpy())
            except Exception as err:
                say(f"**{what} failed:** {err}")

        by_text.on_click(lambda _: run_model(from_text, phrase.value.strip(), "from text") if phrase.value.strip()
                         else say("type a phrase first"))
        by_sam.on_click(lambda _: run_model(from_selection, viewer.selection[shown.value].copy(), "SAM")
                        if viewer.selection[shown.value].any() else say("select something first: SAM starts there"))
    with server.gui.add_folder("render as the editor sees it", expand_by_default=False):
        render_button = server.gui.add_button("render this view")
        render_image = server.gui.add_image(np.full((32, 32, 3), 255, np.uint8), label="our rasterizer")

    def refresh(_=None) -> None:
        on = [part for part, box in toggles.items() if box.value]
        for name, node in nodes.items():
            node.visible = name == shown.value
            if name == shown.value:
                node.rgbs = display_colours(base[name]["rgbs"], parts, on, viewer.selection[name])

    def say(text: str) -> None:
        status.content = text

    def set_selection(new: np.ndarray) -> None:
        name = shown.value
        history[name].append(viewer.selection[name])
        viewer.selection[name] = new
        say(f"{int(new.sum()):,} Gaussians selected")
        refresh()

    def labels_of(name: str):
        ids = part_labels(parts, len(scenes[name]))
        return torch.from_numpy(ids) if (ids >= 0).any() else None

    def camera_of(client) -> Cameras:
        cam = client.camera
        scale = RENDER_MAX_SIZE / max(cam.image_width, cam.image_height)
        w, h = max(1, round(cam.image_width * scale)), max(1, round(cam.image_height * scale))
        return client_camera(cam.position, cam.wxyz, cam.fov, w, h)

    def clicked(event, how: str | None = None) -> None:
        try:
            name, cam = shown.value, camera_of(event.client)
            x = min(int(event.screen_pos[0] * cam.width), cam.width - 1)
            y = min(int(event.screen_pos[1] * cam.height), cam.height - 1)
            seed = pick(scenes[name], cam, [(x, y)], backend=backend).cpu()
            new = grow(scenes[name], seed, labels=labels_of(name)).numpy()
            set_selection(combine(torch.from_numpy(viewer.selection[name]), torch.from_numpy(new),
                                  how or mode.value).numpy())
        except Exception as err:  # shown in the panel: a click never stops the viewer
            say(f"**selection failed:** {err}")

    def boxed(event) -> None:
        try:
            name, cam = shown.value, camera_of(event.client)
            box = (event.screen_min[0] * cam.width, event.screen_min[1] * cam.height,
                   event.screen_max[0] * cam.width, event.screen_max[1] * cam.height)
            new = pick_box(scenes[name], cam, box, backend=backend).numpy()
            set_selection(combine(torch.from_numpy(viewer.selection[name]), torch.from_numpy(new), mode.value).numpy())
        except Exception as err:
            say(f"**selection failed:** {err}")

    server.scene.on_click()(clicked)
    server.scene.on_click(modifier="shift")(lambda event: clicked(event, "add"))
    server.scene.on_click(modifier="cmd/ctrl")(lambda event: clicked(event, "subtract"))
    server.scene.on_rect_select(modifier="shift")(boxed)

    @undo.on_click
    def _undo(_) -> None:
        if history[shown.value]:
            viewer.selection[shown.value] = history[shown.value].pop()
            say(f"undone: {int(viewer.selection[shown.value].sum()):,} Gaussians selected")
            refresh()

    @clear.on_click
    def _clear(_) -> None:
        set_selection(np.zeros(len(scenes[shown.value]), bool))

    @save.on_click
    def _save(_) -> None:
        try:
            viewer.saved.extend(save_selection(viewer, scenes, shown.value, name_box.value, out_box.value,
                                               write_labelled))
        except Exception as err:
            say(f"**not saved:** {err}")
            return
        part = check_part_name(name_box.value)
        if part not in toggles:
            with server.gui.add_folder("parts"):
                toggles[part] = server.gui.add_checkbox(f"colour {part}", True)
                toggles[part].on_update(refresh)
        toggles[part].value = True
        set_selection(np.zeros(len(scenes[shown.value]), bool))
        say(f"saved **{part}** ({int(parts[part].sum()):,} Gaussians) in {out_box.value}")

    @render_button.on_click
    def _render(event) -> None:
        render_image.image = render_view(scenes[shown.value], camera_of(event.client), backend=backend)

    shown.on_update(refresh)
    for toggle in toggles.values():
        toggle.on_update(refresh)
    refresh()
    if cameras is not None:
        _add_frustums(server, cameras)
    frame_clients(server, next(iter(scenes.values())))
    return viewer


def frame_clients(server, scene: GaussianScene) -> None:
    """Each new page starts looking at `scene`, z up (as the editor's camera ring)."""
    centre = scene.center(0.01).double().cpu().numpy()
    lo, hi = scene.bbox(0.01)
    radius = float((hi - lo).norm())

    @server.on_client_connect
    def _frame(client) -> None:
        client.camera.up_direction = (0.0, 0.0, 1.0)
        client.camera.position = centre + radius * np.array([1.2, 0.0, 0.35])
        client.camera.look_at = centre


def save_selection(viewer: Viewer, scenes: dict[str, GaussianScene], scene_name: str, part: str,
                   out: str | os.PathLike, write_labelled=None) -> list[Path]:
    """Name the current selection of `scene_name` as `part` (one of the first scene's parts; a
    name already used is replaced) and write every part with `save_parts`."""
    part = check_part_name(part)
    mask = viewer.selection[scene_name]
    if not mask.any():
        raise ValueError("nothing is selected: click the part first")
    first = next(iter(scenes))
    if len(scenes[scene_name]) != len(scenes[first]):
        raise ValueError(f"parts are saved for {first!r} ({len(scenes[first])} Gaussians); {scene_name!r} has "
                         f"{len(scenes[scene_name])}")
    viewer.parts[part] = mask.copy()
    return save_parts(out, scenes[first], viewer.parts, write_labelled)


def render_view(scene: GaussianScene, camera: Cameras, *, backend: str = "auto") -> np.ndarray:
    """[H, W, 3] uint8: our rasterizer's image of `scene` at the first camera, on white (the viewer's
    background), for comparison with the browser's."""
    cam = camera[0:1].to(scene.device, scene.means.dtype)
    with torch.no_grad():
        img, _, _ = rasterize(**scene.detach().render_args(), viewmats=cam.viewmats, Ks=cam.Ks, width=cam.width,
                              height=cam.height, backgrounds=torch.ones(1, 3, dtype=scene.means.dtype,
                                                                        device=scene.device), backend=backend)
    return (img[0].clamp(0, 1) * 255).round().byte().cpu().numpy()


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
         coloured: Sequence[str] = (), out="selection", read_label_field=None, write_labelled=None,
         from_text=None, from_selection=None, backend: str = "auto") -> int:
    """The `gendistill view` command: load, check, serve until Ctrl-C. `read_label_field` /
    `write_labelled`: see `load_parts` and `save_parts`; `from_text` / `from_selection`: see
    `start_viewer` (the command line passes 3D-GALP's and its mask sources)."""
    import time

    scenes = {}
    for p in scene_paths:
        name = Path(p).stem if Path(p).stem not in scenes else str(p)
        scenes[name] = GaussianScene.load(p)
    parts = load_parts(next(iter(scenes.values())), labels, masks3d, read_label_field)
    cams = load_cameras(cameras) if cameras is not None else None
    viewer = start_viewer(scenes, parts=parts, cameras=cams, host=host, port=port, coloured=coloured, out=out,
                          write_labelled=write_labelled, from_text=from_text, from_selection=from_selection,
                          backend=backend)
    print(f"viewer: {viewer.url} (Ctrl-C stops it)")
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        viewer.stop()
        return 0
