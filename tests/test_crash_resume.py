"""Kill -9 at seeded moments while `gendistill finetune` checkpoints, validates and exports, and while
`gendistill edit` writes its outputs; then resume. The resumed finetune ends bitwise equal to an
uninterrupted run, and no file or folder under its final name is ever partial.

Partial files are also made by hand (a checkpoint file cut short or missing, a log record cut short): a
damaged checkpoint is skipped by resume_from_checkpoint=latest and refused by name, never loaded.

The commands run in processes forked from one "zygote" that has imported torch, diffusers and gendistill
once (the imports take 5 s on 2 cores, a tiny run 1 s). Each run is a real process killed with SIGKILL:
either by itself, from a `sys.addaudithook` hook, at the k-th file-system write under its output folder
(open for writing, mkdir, rename, remove, rmtree: the moments between the steps of an atomic write), or by
the zygote after a delay drawn from the span of writes of an uninterrupted run (which lands inside
safetensors / torch.save writes, that the audit hook does not see).
"""

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from gendistill.video_distill.checkpoints import CheckpointMixin

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ROOT / "configs" / "video_distill" / "tiny_cpu.yaml"
EDIT = ROOT / "configs" / "splat_edit" / "tiny_cpu.yaml"
CLIPS = ROOT / "assets" / "clips"
SCENE = ROOT / "assets" / "scenes" / "snowman.ply"

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="os.fork and /proc/self/fd")

# forked per command: argv for gendistill.cli.main, a folder whose writes are counted, the k-th write
# at which the process SIGKILLs itself, or a delay after which the zygote SIGKILLs it
ZYGOTE = r'''
import json, os, signal, sys, threading, time, traceback

import torch, diffusers, transformers, accelerate, peft  # noqa: F401  imported once, before any fork
from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXTransformer3DModel  # noqa: F401
from transformers import AutoTokenizer, T5EncoderModel  # noqa: F401
import gendistill.video_distill.trainer, gendistill.splat_edit.editor  # noqa: F401
from gendistill.cli import main

WRITES = {"os.rename", "os.replace", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate"}


def watch(root, kill_at, events):
    root = os.path.realpath(root) + os.sep
    t0 = time.perf_counter()

    def hook(event, args):
        if event == "open":
            mode, flags = args[1], args[2]
            if not ((mode and any(c in mode for c in "wax+")) or (mode is None and flags & (os.O_WRONLY | os.O_RDWR))):
                return
        elif event not in WRITES:
            return
        if event in ("os.remove", "os.rmdir") and isinstance(args[1], int) and args[1] >= 0:  # rmtree: dir_fd
            args = (os.path.join(os.readlink(f"/proc/self/fd/{args[1]}"), os.fsdecode(args[0])),)
        paths = [os.path.realpath(os.fsdecode(a)) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        paths = [os.path.relpath(p, root) for p in paths if p.startswith(root)]
        if paths:
            events.append((time.perf_counter() - t0, event, paths))
            if len(events) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)


print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        events, rc = [], 1
        watch(req["root"], req["kill_at"] or 0, events)
        try:
            rc = main(req["argv"]) or 0
        except SystemExit as err:
            rc = err.code if isinstance(err.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            with open(req["log"] + ".events", "w") as f:
                json.dump(events, f)
            os._exit(rc)
    timer = threading.Timer(req["kill_after"] or 300.0, os.kill, (pid, signal.SIGKILL))  # or a hung run
    timer.start()
    _, status = os.waitpid(pid, 0)
    timer.cancel()
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - t0}), flush=True)
'''


class Zygote:
    """A process that imported the heavy modules once and forks one child per command (`run`)."""

    def __init__(self, folder: Path):
        self.folder, self.n = folder, 0
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, argv, root, *, kill_at=None, kill_after=None) -> dict:
        """Run `gendistill <argv>` in a forked process; {"rc", "seconds", "events", "output"}. rc -9: killed."""
        self.n += 1
        log = self.folder / f"run{self.n:03d}.log"
        self.proc.stdin.write(json.dumps({"argv": [str(a) for a in argv], "root": str(root), "log": str(log),
                                          "kill_at": kill_at, "kill_after": kill_after}) + "\n")
        self.proc.stdin.flush()
        result = json.loads(self.proc.stdout.readline())
        events = log.with_name(log.name + ".events")
        result["events"] = json.loads(events.read_text()) if events.is_file() else None
        result["output"] = log.read_text()
        return result

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models")


def finetune_argv(models, out, *extra):
    """Checkpoints at 2 and 4 (4 rotates 2 out), a validation video at 3, step 5 only in the log and the export."""
    return ["finetune", "--no-progress", "--config", FINETUNE, f"output_dir={out}",
            f"model.pretrained={models / 'cogvideox'}", f"teacher.path={models / 'videomae'}", f"data.path={CLIPS}",
            "max_steps=5", "checkpoint.every=2", "checkpoint.keep=1", "validation.every=3", *extra]


@pytest.fixture(scope="module")
def reference(zygote, models, tmp_path_factory):
    """Uninterrupted runs: `out` as configured (its writes timed), `all` keeping every checkpoint."""
    root = tmp_path_factory.mktemp("reference")
    runs = {}
    for name, extra in (("out", ()), ("all", ("checkpoint.keep=10",))):
        r = zygote.run(finetune_argv(models, root / name, *extra), root / name)
        assert r["rc"] == 0, r["output"][-3000:]
        runs[name] = r
    assert sorted(p.name for p in (root / "out" / "checkpoints").iterdir()) == ["checkpoint-4"]
    return {"out": root / "out", "all": root / "all", "events": runs["out"]["events"]}


# -- what a reader may find ---------------------------------------------------------------------------
def _visible(folder: Path):
    """Every file and folder under `folder` whose name does not start with a dot (nor any folder above it)."""
    for p in sorted(folder.rglob("*")):
        if not any(part.startswith(".") for part in p.relative_to(folder).parts):
            yield p


def _load(path: Path):
    """Read a file completely; raises on a partial one."""
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix in (".bin", ".pt"):
        return torch.load(path, weights_only=False)
    if path.suffix == ".pkl":
        try:
            return torch.load(path, weights_only=False)
        except Exception:
            return pickle.loads(path.read_bytes())
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".md":  # the export's model card
        return path.read_text()
    if path.suffix == ".yaml":
        value = yaml.safe_load(path.read_text())
        assert isinstance(value, dict), path
        return value
    if path.suffix == ".mp4":
        from gendistill.core.media import read_video

        return read_video(path)
    if path.suffix == ".png":
        import imageio.v3 as iio

        return iio.imread(path)
    if path.suffix == ".npy":
        return np.load(path)
    if path.suffix == ".ply":
        from gendistill.core.scene import GaussianScene

        return GaussianScene.load_ply(path)
    if path.suffix == ".html":
        text = path.read_text()
        assert text.rstrip().endswith("</html>"), f"{path} is cut short"
        return text
    raise AssertionError(f"unexpected output {path}")


def _same(a, b, where) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}[{k}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b, where


def _log_lines(out: Path) -> list[str]:
    log = out / "logs" / "train_log.jsonl"
    return log.read_text().split("\n") if log.is_file() else [""]


def check_no_partial_output(out: Path, ref: Path) -> None:
    """After a kill: every checkpoint, export and video under its final name is complete and equal to the
    uninterrupted run's; the log is the uninterrupted log's first lines (the last one possibly cut short)."""
    for p in _visible(out):
        rel = p.relative_to(out)
        if rel.parts[0] == "logs":
            continue
        if p.is_dir():
            if rel.parts[0] == "checkpoints" and len(rel.parts) == 2 or rel.parts == ("export",):  # all of it
                assert (ref / rel).is_dir(), f"{rel}: not a folder of the uninterrupted run"
                mine = sorted(str(f.relative_to(p)) for f in p.rglob("*"))
                assert mine == sorted(str(f.relative_to(ref / rel)) for f in (ref / rel).rglob("*")), \
                    f"{rel} is partial: {mine}"
            continue
        assert (ref / rel).is_file(), f"{rel}: not an output of the uninterrupted run"
        mine, theirs = _load(p), _load(ref / rel)
        if p.name == "config.yaml" or p.suffix == ".pkl":  # output_dir differs; RNG states: loadable
            continue
        if p.name == "trainer_state.json":  # the sizes of the files, but config.yaml's (output_dir differs)
            for state in (mine, theirs):
                state.get("files", {}).pop("config.yaml", None)
        _same(mine, theirs, str(rel))
    lines, ref_lines = _log_lines(out), _log_lines(ref)
    complete = lines[:-1]  # the text after the last newline may be a cut record
    assert complete == ref_lines[:len(complete)], "the log is not the uninterrupted run's first records"


def check_equal_to_reference(out: Path, ref: Path) -> None:
    """After the last resume: the same checkpoints, validation videos, export and log as the uninterrupted
    run, and nothing left of the killed runs' temporary or half-deleted checkpoint folders."""
    check_no_partial_output(out, ref)
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    for folder in ("checkpoints", "validation", "export"):
        assert sorted(p.relative_to(out) for p in _visible(out / folder)) == \
            sorted(p.relative_to(ref) for p in _visible(ref / folder)), folder
    assert _log_lines(out) == _log_lines(ref)
    a, b = load_file(out / "export" / "transformer" / "diffusion_pytorch_model.safetensors"), \
        load_file(ref / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert len(a) > 10 and all(torch.equal(a[k], b[k]) for k in a)


# -- kill points --------------------------------------------------------------------------------------
def _kill_points(events, seed: int) -> list[tuple[str, dict]]:
    """Seeded kill points inside each kind of write of an uninterrupted run: (name, run kwargs)."""
    rng = random.Random(seed)

    def pick(name, where, after=0):
        found = [i + 1 for i, (_, _, paths) in enumerate(events) if i >= after and where(paths[0], paths[-1])]
        assert found, f"no write of kind {name}: {[e[1:] for e in events]}"
        return name, {"kill_at": rng.choice(found)}

    first_checkpoint = next(i for i, e in enumerate(events) if "checkpoint-2" in e[2][-1])
    rotation = next(i for i, e in enumerate(events) if e[2][-1] == "checkpoints/checkpoint-4") + 1
    points = [
        ("log before the first checkpoint", {"kill_at": first_checkpoint}),  # as step 2's record is appended
        pick("checkpoint being written", lambda p, q: p.startswith("checkpoints/.tmp-checkpoint-")),
        pick("checkpoint rename", lambda p, q: q == "checkpoints/checkpoint-4"),
        ("between a new checkpoint and the deletion of the old", {"kill_at": rotation + 1}),
        pick("old checkpoint being deleted", lambda p, q: "checkpoint-2" in p, after=rotation),
        pick("validation video", lambda p, q: p.startswith("validation/")),
        pick("export", lambda p, q: "export" in p),
    ]
    t0, t1 = events[0][0], events[-1][0]
    points += [(f"random delay {i}", {"kill_after": rng.uniform(t0, t1 + 0.3)}) for i in range(2)]
    return points


KILL_POINTS = 9  # len(_kill_points(...))


@pytest.mark.parametrize("point", range(KILL_POINTS))
def test_kill9_then_resume_equals_an_uninterrupted_run(zygote, models, reference, tmp_path, point):
    """Kill at a seeded write (or delay), check what is on disk, resume and kill again at a random write of
    the resumed run, check, resume to the end: everything equals the uninterrupted run's."""
    points = _kill_points(reference["events"], seed=11)
    assert len(points) == KILL_POINTS
    name, kill = points[point]
    out = tmp_path / "run"
    first = zygote.run(finetune_argv(models, out), out, **kill)
    if "kill_at" in kill:
        assert first["rc"] == -signal.SIGKILL, (name, first["output"][-3000:])
    check_no_partial_output(out, reference["all"])
    second = zygote.run(finetune_argv(models, out, "resume_from_checkpoint=latest"), out,
                        kill_at=random.Random(point).randint(1, len(reference["events"])))
    assert second["rc"] in (0, -signal.SIGKILL), (name, second["output"][-3000:])
    check_no_partial_output(out, reference["all"])
    last = zygote.run(finetune_argv(models, out, "resume_from_checkpoint=latest"), out)
    assert last["rc"] == 0, (name, last["output"][-3000:])
    check_equal_to_reference(out, reference["out"])


def test_a_step_s_validation_video_is_written_before_its_checkpoint(zygote, models, tmp_path):
    """Step 2's validation video comes before checkpoint-2, so a kill between them never leaves a
    checkpoint whose step has no video: the resumed run (from before step 2) writes it."""
    out = tmp_path / "run"
    argv = finetune_argv(models, out, "max_steps=3", "validation.every=2", "export=false")
    probe = zygote.run(argv, out)  # its writes, counted
    assert probe["rc"] == 0, probe["output"][-3000:]
    video = next(i for i, e in enumerate(probe["events"]) if e[2][0].startswith("validation"))
    ckpt = next(i for i, e in enumerate(probe["events"]) if any("checkpoint-2" in p for p in e[2]))
    assert video < ckpt
    shutil.rmtree(out)
    assert zygote.run(argv, out, kill_at=ckpt + 1)["rc"] == -signal.SIGKILL  # video written, checkpoint not
    last = zygote.run([*argv, "resume_from_checkpoint=latest"], out)
    assert last["rc"] == 0, last["output"][-3000:]
    assert (out / "validation" / "step-000002_prompt-00.mp4").is_file()


# -- partial files are never loaded -------------------------------------------------------------------
def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "model cut short": lambda c: _cut(c / "model.safetensors"),
    "optimizer missing": lambda c: (c / "optimizer.bin").unlink(),
    "trainer state empty": lambda c: (c / "trainer_state_0.pt").write_bytes(b""),
    "random states cut short": lambda c: _cut(c / "random_states_0.pkl"),
    "trainer_state.json cut short": lambda c: _cut(c / "trainer_state.json"),
}


class _Trainer(CheckpointMixin):
    """What `CheckpointMixin._resume` uses of a `VideoREPATrainer`; `loaded`: what accelerate would load."""

    def __init__(self, out: Path):
        self.out, self.world, self.rank, self.skipped, self.loaded = out, 1, 0, set(), []
        self.cfg = SimpleNamespace(checkpoint=SimpleNamespace(keep=10))
        self.generator = torch.Generator()
        self.accelerator = SimpleNamespace(is_main_process=True, load_state=self.loaded.append)


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_skipped_by_latest_and_refused_by_name(reference, tmp_path, damage, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference["all"] / "checkpoints", out / "checkpoints")
    DAMAGE[damage](out / "checkpoints" / "checkpoint-4")
    trainer = _Trainer(out)
    trainer._resume("latest")
    assert trainer.loaded == [str(out / "checkpoints" / "checkpoint-2")] and trainer.step == 2
    assert "skipping" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="checkpoint-4 is not a complete checkpoint folder"):
        _Trainer(out)._resume(str(out / "checkpoints" / "checkpoint-4"))


def test_resume_after_a_damaged_checkpoint_equals_an_uninterrupted_run(zygote, models, reference, tmp_path):
    """The newest checkpoint cut short (and the log's last record): the run resumes from the one before,
    writes the newest again and ends equal to the uninterrupted run."""
    out = tmp_path / "run"
    shutil.copytree(reference["all"], out)
    shutil.rmtree(out / "export")
    _cut(out / "checkpoints" / "checkpoint-4" / "optimizer.bin")
    log = out / "logs" / "train_log.jsonl"
    log.write_text(log.read_text()[:-20])
    r = zygote.run(finetune_argv(models, out, "checkpoint.keep=10", "resume_from_checkpoint=latest"), out)
    assert r["rc"] == 0, r["output"][-3000:]
    assert f"resumed from {out / 'checkpoints' / 'checkpoint-2'} at step 2" in r["output"]
    check_equal_to_reference(out, reference["all"])


def test_a_checkpoint_without_the_list_of_sizes_still_resumes(reference, tmp_path):
    """Checkpoints written before trainer_state.json listed the files' sizes count as complete."""
    out = tmp_path / "run"
    shutil.copytree(reference["all"] / "checkpoints", out / "checkpoints")
    state = out / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "files"}))
    trainer = _Trainer(out)
    trainer._resume("latest")
    assert trainer.loaded == [str(state.parent)] and trainer.step == 4


def test_a_log_record_cut_short_is_dropped(tmp_path):
    from gendistill.video_distill.checkpoints import drop_log_after

    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 0.1}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert drop_log_after(log, 10) == 1
    text = log.read_text()
    assert text.endswith("\n") and [json.loads(x)["step"] for x in text.splitlines()] == [1, 2, 3, 4, 5]
    assert drop_log_after(log, 2) == 3 and len(log.read_text().splitlines()) == 2


def test_replace_dir_fsyncs_the_new_folder_before_the_rename(tmp_path, monkeypatch):
    """A rename can reach the disk before the data (power loss): every file and folder of the new
    folder is fsynced before it takes the name, and the parent after."""
    from gendistill.core.io import replace_dir

    new, final = tmp_path / ".tmp-x", tmp_path / "x"
    (new / "sub").mkdir(parents=True)
    (new / "a.bin").write_bytes(b"new")
    (new / "sub" / "b.json").write_text("{}")
    final.mkdir()
    (final / "a.bin").write_bytes(b"old")
    calls, real_fsync, real_rename = [], os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    monkeypatch.setattr(os, "rename", lambda a, b: (calls.append(("rename", str(a), str(b))), real_rename(a, b)))
    replace_dir(new, final)
    moved = calls.index(("rename", str(new), str(final)))
    assert {str(new / "a.bin"), str(new / "sub" / "b.json"), str(new / "sub"), str(new)} <= set(calls[:moved])
    assert str(tmp_path) in calls[moved:]
    assert (final / "a.bin").read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["x"]


# -- the editor ---------------------------------------------------------------------------------------
def edit_argv(models, out, *extra):
    return ["edit", "--no-progress", "--config", EDIT, f"scene={SCENE}", "part=hat", "prompt=a snowman with a hat",
            "edit_prompt=a snowman with a gold hat", f"out={out}", f"guidance.model={models / 'sd3'}", "steps=1",
            "densify.enabled=false", "anchors.method=none", "report.turntable_frames=4", "report.grid_views=2",
            "cameras.n_azimuths=4", "cameras.n_elevations=1", "cameras.width=32", "cameras.height=32", *extra]


def check_edit_outputs(out: Path, ref: Path) -> None:
    """Every file under its final name reads whole; the edited scene is the uninterrupted run's, byte for byte;
    summary.json (the mark of a loadable result) only beside an edited.ply."""
    for p in _visible(out):
        if p.is_file():
            _load(p)
    if (out / "edited.ply").is_file():
        assert (out / "edited.ply").read_bytes() == (ref / "edited.ply").read_bytes()
    if (out / "summary.json").is_file():
        assert (out / "edited.ply").is_file()


def test_kill9_while_the_editor_writes_leaves_only_whole_files(zygote, models, tmp_path):
    """Kills at a seeded write of edited.ply, of summary.json, and after a delay into the writing of the
    report, each run into the folder the killed runs before it left: every output under its final name is
    whole."""
    ref = tmp_path / "reference"
    r = zygote.run(edit_argv(models, ref), ref)
    assert r["rc"] == 0, r["output"][-3000:]
    events = r["events"]
    start = next(i for i, e in enumerate(events) if e[2][0].startswith(".edited"))  # the outputs begin
    assert {"edited.ply", "summary.json", "report.html", "turntable.mp4"} <= {p.name for p in ref.iterdir()}
    rng = random.Random(5)
    kills = [{"kill_at": rng.choice([i + 1 for i, e in enumerate(events) if name in e[2][-1]])}
             for name in ("edited", "summary")]
    kills.append({"kill_after": rng.uniform(events[start][0], events[-1][0])})
    out = tmp_path / "run"
    for kill in kills:
        run = zygote.run(edit_argv(models, out), out, **kill)
        assert run["rc"] == -signal.SIGKILL or "kill_after" in kill and run["rc"] == 0, run["output"][-3000:]
        check_edit_outputs(out, ref)
