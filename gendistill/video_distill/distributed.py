"""What the processes of one run must agree on: a flag any of them raised, and folders they all see."""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path
from typing import Sequence

import torch


def agreed(accelerator, flag: bool) -> bool:
    """`flag` raised on any process; every process gets the same answer (one all-reduce)."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum")
    return bool(total > 0)


def check_shared_folders(accelerator, folders: Sequence[Path], wait_s: float = 5.0) -> None:
    """Raise on every process unless each one sees a file the main process writes in each folder.

    Checkpoints, the feature cache and the tiny models are written by the main process and read by
    all, so with several machines these folders must be on a shared filesystem (NFS, Lustre, ...).
    A process waits up to `wait_s` for the file (a network filesystem may show it late).
    """
    from accelerate.utils import broadcast_object_list, gather_object

    if accelerator.num_processes == 1:
        return
    token = broadcast_object_list([f".shared-check-{uuid.uuid4().hex}" if accelerator.is_main_process else None])[0]
    if accelerator.is_main_process:
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / token).write_text(socket.gethostname())
    accelerator.wait_for_everyone()
    deadline = time.monotonic() + wait_s
    unseen = [f for f in folders if not (f / token).is_file()]
    while unseen and time.monotonic() < deadline:
        time.sleep(0.2)
        unseen = [f for f in unseen if not (f / token).is_file()]
    reports = gather_object([(accelerator.process_index, socket.gethostname(), [str(f) for f in unseen])])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for folder in folders:
            (folder / token).unlink(missing_ok=True)
    bad = [r for r in reports if r[2]]
    if bad:
        who = "; ".join(f"process {rank} on {host} cannot see {', '.join(paths)}" for rank, host, paths in bad)
        raise RuntimeError(f"{who}. The main process writes checkpoints, the feature cache and the tiny models "
                           "there and every process reads them, so with several machines these folders must be "
                           "on a filesystem all of them share (NFS, Lustre, ...): set output_dir (and "
                           "data.cache_dir) to such a folder")
