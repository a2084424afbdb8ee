"""Checkpoints of a `VideoREPATrainer` run: `checkpoint-<step>/` folders written atomically (accelerate
state with only the trainable tensors, per-process trainer state), the last `checkpoint.keep` kept, and
resuming from one (`resume_from_checkpoint`: a folder or "latest")."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from gendistill.config import to_yaml
from gendistill.core.io import atomic_path

__all__ = ["CheckpointMixin", "drop_log_after"]


def drop_log_after(log: Path, step: int) -> int:
    """Remove the records of steps after `step` from a JSON-lines log (they are run again after a
    resume, and would be logged twice); returns how many went. The log is rewritten atomically."""
    if not log.is_file():
        return 0
    lines = log.read_text().splitlines()
    keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(keep) != len(lines):
        with atomic_path(log) as tmp:
            tmp.write_text("".join(line + "\n" for line in keep))
    return len(lines) - len(keep)


class CheckpointMixin:
    """Checkpoint methods of `VideoREPATrainer` (it provides cfg, accelerator, out, step, position,
    generator, skipped, rank, world, device and `_sharded`)."""

    @property
    def checkpoint_root(self) -> Path:
        return self.out / "checkpoints"

    def list_checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.checkpoint_root.is_dir():
            return []
        found = [p for p in self.checkpoint_root.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
                 and p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-")[-1]))

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
        """Write checkpoint-<step> atomically (a temporary folder renamed once complete); keep the last K."""
        acc = self.accelerator
        final = self.checkpoint_root / f"checkpoint-{self.step}"
        tmp = self.checkpoint_root / f".tmp-checkpoint-{self.step}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        torch.save({"generator": self.generator.get_state(), "position": self.position, "step": self.step,
                    "skipped": sorted(self.skipped)}, tmp / f"trainer_state_{self.rank}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps(
                {"step": self.step, "position": self.position, "num_processes": self.world,
                 "training_type": self.cfg.training_type}, indent=2))
            (tmp / "config.yaml").write_text(to_yaml(self.cfg))
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            for old in self.list_checkpoints()[: -self.cfg.checkpoint.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _resume(self, which: str) -> None:
        if which == "latest":
            found = self.list_checkpoints()
            if not found:
                if self.accelerator.is_main_process:
                    print(f"resume_from_checkpoint=latest: no checkpoint in {self.checkpoint_root}/, starting fresh")
                return
            path = found[-1]
        else:
            path = Path(which)
            if not (path / "trainer_state.json").is_file():
                raise FileNotFoundError(f"{path} is not a complete checkpoint folder (no trainer_state.json)")
        meta = json.loads((path / "trainer_state.json").read_text())
        if meta["num_processes"] != self.world:
            raise ValueError(f"checkpoint {path} was written by {meta['num_processes']} processes, this run has "
                             f"{self.world}; resume with the same number of processes")
        self.accelerator.load_state(str(path))
        state = torch.load(path / f"trainer_state_{self.rank}.pt", weights_only=False)
        self.generator.set_state(state["generator"])
        self.position, self.step = state["position"], state["step"]
        self.skipped.update(state.get("skipped", []))
        if self.accelerator.is_main_process:
            drop_log_after(self.out / "logs" / "train_log.jsonl", self.step)
            print(f"resumed from {path} at step {self.step}")
