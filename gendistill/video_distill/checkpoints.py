"""Checkpoints of a `VideoREPATrainer` run: `checkpoint-<step>/` folders written atomically (accelerate
state with only the trainable tensors, per-process trainer state, and last `trainer_state.json`, which
lists every file's size), the last `checkpoint.keep` kept, and resuming from one (`resume_from_checkpoint`:
a folder, or "latest": the newest complete one).

A process killed at any moment leaves under `checkpoint-<step>` a whole checkpoint or nothing: folders
are written as `.tmp-checkpoint-<step>` and renamed once fsynced, and deleted after a rename to a trash
name. A folder damaged afterwards (a file missing or cut short, by a copy or a full disk) is never loaded:
"latest" skips it for the previous complete one, and naming it is refused with what is wrong."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from gendistill.config import to_yaml
from gendistill.core.io import atomic_path, clear_trash, remove_dir, replace_dir

__all__ = ["CheckpointMixin", "checkpoint_problem", "drop_log_after"]


def drop_log_after(log: Path, step: int) -> int:
    """Remove the records of steps after `step` from a JSON-lines log (they are run again after a
    resume, and would be logged twice), and a record cut short by a crash; returns how many lines
    went. The log is rewritten atomically."""
    if not log.is_file():
        return 0
    lines = log.read_text().splitlines()
    keep = [line for line in lines if (s := _record_step(line)) is not None and s <= step]
    if len(keep) != len(lines):
        with atomic_path(log) as tmp:
            tmp.write_text("".join(line + "\n" for line in keep))
    return len(lines) - len(keep)


def _record_step(line: str) -> int | None:
    """The step of one log line; None for a blank line or a record cut short."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("step", 0) if isinstance(record, dict) else None


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """What makes the folder `path` other than a complete checkpoint, or None when it is complete:
    no trainer_state.json or one cut short, or a file it lists missing or not of the size written.
    (Checkpoints written before the sizes were listed count as complete when trainer_state.json reads.)"""
    path = Path(path)
    if not (path / "trainer_state.json").is_file():
        return "no trainer_state.json"
    try:
        meta = json.loads((path / "trainer_state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "trainer_state.json does not read (cut short?)"
    if not isinstance(meta, dict) or not {"step", "num_processes"} <= meta.keys():
        return "trainer_state.json lacks step / num_processes"
    for name, size in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return None


def _step_of(folder: Path) -> int | None:
    name = folder.name
    return int(name.split("-")[-1]) if name.startswith("checkpoint-") and name.split("-")[-1].isdigit() else None


class CheckpointMixin:
    """Checkpoint methods of `VideoREPATrainer` (it provides cfg, accelerator, out, step, position,
    generator, skipped, rank, world, device, `_sharded`, `_data_state()` and `_resumed_data_state`)."""

    @property
    def checkpoint_root(self) -> Path:
        return self.out / "checkpoints"

    def _checkpoint_folders(self) -> list[Path]:
        """Folders named checkpoint-<step>, complete or not, oldest first."""
        if not self.checkpoint_root.is_dir():
            return []
        found = [p for p in self.checkpoint_root.iterdir() if p.is_dir() and _step_of(p) is not None]
        return sorted(found, key=_step_of)

    def list_checkpoints(self) -> list[Path]:
        """Complete checkpoint folders (`checkpoint_problem` finds nothing), oldest first."""
        return [p for p in self._checkpoint_folders() if checkpoint_problem(p) is None]

    def _save_state_hook(self, models, weights, output_dir) -> None:
        # keep only the trainable tensors (LoRA: the adapters; sft: everything) in model.safetensors
        if self._sharded:
            return
        for i, model in enumerate(models):
            names = {n for n, p in model.named_parameters() if p.requires_grad}
            if i < len(weights):
                weights[i] = {k: v for k, v in weights[i].items() if k in names}

    def _load_state_hook(self, models, input_dir) -> None:
        if self._sharded:
            return
        from safetensors.torch import load_file

        for i, model in enumerate(list(models)):
            name = "model.safetensors" if i == 0 else f"model_{i}.safetensors"
            state = load_file(os.path.join(input_dir, name), device=str(self.device))
            missing, unexpected = model.load_state_dict(state, strict=False)
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            missing = sorted(set(missing) & trainable)
            if missing or unexpected:
                raise ValueError(f"checkpoint {input_dir} does not fit this model: missing {missing[:5]}, "
                                 f"unexpected {sorted(unexpected)[:5]} (was it written with other settings?)")
        models.clear()

    def save_checkpoint(self) -> Path:
        """Write checkpoint-<step> atomically (a temporary folder, fsynced, renamed once complete); keep the last K."""
        acc = self.accelerator
        root = self.checkpoint_root
        final = root / f"checkpoint-{self.step}"
        tmp = root / f".tmp-checkpoint-{self.step}"
        if acc.is_main_process:
            self._clear_leftovers()
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        torch.save({"generator": self.generator.get_state(), "position": self.position, "step": self.step,
                    "skipped": sorted(self.skipped), "data_state": self._data_state()},
                   tmp / f"trainer_state_{self.rank}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / "config.yaml").write_text(to_yaml(self.cfg))
            files = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            (tmp / "trainer_state.json").write_text(json.dumps(  # written last: the folder is complete
                {"step": self.step, "position": self.position, "num_processes": self.world,
                 "training_type": self.cfg.training_type, "files": files}, indent=2))
            replace_dir(tmp, final)
            self._remove_old_checkpoints()
        acc.wait_for_everyone()
        return final

    def _remove_old_checkpoints(self) -> None:
        """Keep the newest `checkpoint.keep` complete checkpoints (main process)."""
        for old in self.list_checkpoints()[: -self.cfg.checkpoint.keep]:
            remove_dir(old)

    def _clear_leftovers(self) -> None:
        """Delete the temporary and half-deleted checkpoint folders of killed runs (main process, while
        no process writes a checkpoint)."""
        clear_trash(self.checkpoint_root, "checkpoint-")
        for stale in self.checkpoint_root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def _latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint; the incomplete ones after it are named and skipped."""
        for path in reversed(self._checkpoint_folders()):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            if self.accelerator.is_main_process:
                print(f"resume_from_checkpoint=latest: skipping {path} ({problem})")
        return None

    def _resume(self, which: str) -> None:
        log = self.out / "logs" / "train_log.jsonl"
        if self.accelerator.is_main_process:
            self._clear_leftovers()
        if which == "latest":
            path = self._latest_checkpoint()
            if path is None:
                if self.accelerator.is_main_process:
                    print(f"resume_from_checkpoint=latest: no checkpoint in {self.checkpoint_root}/, starting fresh")
                    drop_log_after(log, 0)  # the records of a run stopped before its first checkpoint
                return
            if self.accelerator.is_main_process:
                self._remove_old_checkpoints()  # a run killed between its newest checkpoint and this
        else:
            path = Path(which)
            problem = checkpoint_problem(path)
            if problem is not None:
                raise FileNotFoundError(f"{path} is not a complete checkpoint folder ({problem}); resume from "
                                        "another one, or with resume_from_checkpoint=latest (the newest complete one)")
        meta = json.loads((path / "trainer_state.json").read_text())
        if meta["num_processes"] != self.world:
            raise ValueError(f"checkpoint {path} was written by {meta['num_processes']} processes, this run has "
                             f"{self.world}; resume with the same number of processes")
        self.accelerator.load_state(str(path))
        state = torch.load(path / f"trainer_state_{self.rank}.pt", weights_only=False)
        self.generator.set_state(state["generator"])
        self.position, self.step = state["position"], state["step"]
        self.skipped.update(state.get("skipped", []))
        self._resumed_data_state = state.get("data_state")  # buckets' seeds and positions; shard cursors
        if self.accelerator.is_main_process:
            drop_log_after(log, self.step)
            print(f"resumed from {path} at step {self.step}")
