"""A running edit, live in the browser: `gendistill edit ... viewer.port=8080`.

    live = start_live_view(scene, mask, port=8080)            # the rest of the scene, sent once
    live.update(step, gaussian_arrays(...), record, image)     # every `viewer.every` steps
    live.stop()

The page shows the scene with the part's current Gaussians in place of the original part, the loss
curves (total, SDS, anchor) and the latest SDS view as our rasterizer renders it. The viewer only
reads what it is given: the command line (`gendistill.cli`) hands it the editor's state, so an
edit's interruption rules are the editor's own (Ctrl-C still stops it and writes the result).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from gendistill.core.scene import GaussianScene

__all__ = ["LiveView", "start_live_view", "LOSS_KEYS"]

LOSS_KEYS = ("loss", "sds", "anchor")  # the curves drawn, from the editor's step records


@dataclass
class LiveView:
    """The viser server of a running edit, and what it has been sent.

    Attributes:
        steps: the steps of the updates sent; losses: {key: [value per update]}; updates: how many.
    """

    server: object
    url: str
    part_node: object
    plot: object
    image: object
    status: object
    steps: list[int] = field(default_factory=list)
    losses: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in LOSS_KEYS})

    def update(self, step: int, part: dict[str, np.ndarray], record: dict, image: np.ndarray | None = None) -> None:
        """Show the part's Gaussians `part` (`gaussian_arrays`), the losses of `record` at `step`,
        and `image` [H, W, 3] uint8 (the latest SDS view), when given."""
        self.part_node.set_gaussians(**part)
        self.steps.append(int(step))
        for key in LOSS_KEYS:
            self.losses[key].append(float(record.get(key, float("nan"))))
        if len(self.steps) >= 2:  # uPlot needs two points
            self.plot.data = (np.asarray(self.steps, np.float64),
                              *(np.asarray(self.losses[k], np.float64) for k in LOSS_KEYS))
        if image is not None:
            self.image.image = image
        self.status.content = f"step **{step}**: loss {record.get('loss', float('nan')):.4g}, " \
                              f"{len(part['centers']):,} part Gaussians"

    def stop(self) -> None:
        self.server.stop()


def start_live_view(scene: GaussianScene, mask: torch.Tensor, *, host: str = "127.0.0.1",
                    port: int = 8080) -> LiveView:
    """Serve `scene` with its part (`mask` [N] bool) as a node of its own, updated by `LiveView.update`.
    A port in use: the next free one, said."""
    import viser
    import viser.uplot as uplot

    from gendistill.viewer.view import frame_clients, splat_arrays

    server = viser.ViserServer(host=host, port=port, verbose=False)
    url = f"http://{host}:{server.get_port()}"
    if server.get_port() != port:
        print(f"port {port} is in use; the live view is at {url}")
    mask = mask.detach().cpu().bool()
    server.scene.add_gaussian_splats("/edit/rest", **splat_arrays(scene.subset(~mask)))
    part_node = server.scene.add_gaussian_splats("/edit/part", **splat_arrays(scene.subset(mask)))
    status = server.gui.add_markdown("waiting for the first step")
    empty = tuple(np.zeros(2) for _ in range(len(LOSS_KEYS) + 1))
    plot = server.gui.add_uplot(empty, (uplot.Series(label="step"),
                                        *(uplot.Series(label=k, stroke=c, width=2)
                                          for k, c in zip(LOSS_KEYS, ("black", "crimson", "royalblue")))),
                                title="losses", aspect=1.5)
    image = server.gui.add_image(np.full((32, 32, 3), 255, np.uint8), label="latest SDS view")
    frame_clients(server, scene)
    return LiveView(server, url, part_node, plot, image, status)
