"""`gendistill edit-batch`: a CSV manifest of part edits with a tiny SD3 pipeline on CPU: good rows edited, a
failing row recorded while the others go on, resume, bad manifests refused up front, Ctrl-C / SIGTERM, and
the rows dealt out to 2 processes under torchrun."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gendistill.cli import main as cli_main
from gendistill.splat_edit import edit_batch
from gendistill.splat_edit import editor as editor_mod
from gendistill.splat_edit.editor import EditResult, StopRequest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "splat_edit" / "tiny_cpu.yaml"
SCENE = ROOT / "assets" / "scenes" / "snowman.ply"
# 2 steps, no SLaMP anchors, a short report: about 2 s a row on 2 CPU cores
FAST = ["steps=2", "anchors.method=none", "densify.enabled=false", "report.turntable_frames=4", "report.grid_views=2"]
HEADER = ["scene", "part", "prompt", "edit_prompt", "out", "steps", "overrides"]


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """The tiny SD3 pipeline, written once (processes of a batch never race to write it)."""
    from gendistill.testing.diffusion import write_tiny_pipeline

    return write_tiny_pipeline("sd3", tmp_path_factory.mktemp("tiny_models") / "sd3")


def _common(sd3) -> list[str]:
    return [f"guidance.model={sd3}", *FAST]


def _manifest(folder: Path, rows: list[list[str]], header=HEADER, name="edits.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def _summary(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_good_rows_are_edited_a_failing_row_is_reported_and_a_rerun_resumes(sd3, tmp_path, monkeypatch, capsys):
    batch = tmp_path / "batch"
    (batch / "scenes").mkdir(parents=True)
    shutil.copy(SCENE, batch / "scenes" / "snowman.ply")
    manifest = _manifest(batch, [
        # relative paths: against the manifest's folder; a prompt with YAML's `: ` and `#` stays text
        ["scenes/snowman.ply", "hat", "a snowman with a hat", "a snowman with a gold hat: shiny #1", "runs/hat", "3",
         ""],
        [str(SCENE), "scarf", "", "a red scarf", "runs/scarf", "", ""],  # no such part: fails when it runs
        [str(SCENE), "nose", "", "a blue nose", "runs/nose", "", "seed=1 report.grid_views=3"],
    ])
    monkeypatch.chdir(tmp_path)  # not the manifest's folder
    argv = ["edit-batch", str(manifest), "--config", str(CONFIG), "--no-progress", *_common(sd3)]
    assert cli_main(argv) == 1  # a row failed
    out, err = capsys.readouterr()
    assert "edit-batch: 3 rows: 2 done, 1 failed" in out
    assert "row 2 (" in err and "part scarf) failed: ValueError: part 'scarf' matches no Gaussian" in err

    runs = batch / "runs"
    assert (runs / "hat" / "edited.ply").is_file() and (runs / "nose" / "edited.ply").is_file()
    assert not (runs / "scarf" / "edited.ply").exists()
    hat = json.loads((runs / "hat" / "summary.json").read_text())
    nose = json.loads((runs / "nose" / "summary.json").read_text())
    assert hat["steps"] == 3 and nose["steps"] == 2  # the steps column, else the common override
    assert hat["edit_prompt"] == "a snowman with a gold hat: shiny #1" and hat["prompt"] == "a snowman with a hat"
    assert nose["config"]["seed"] == 1 and nose["config"]["report"]["grid_views"] == 3  # the overrides cell
    assert hat["config"]["seed"] == 0 and hat["scene"] == str(batch / "scenes" / "snowman.ply")

    table = _summary(batch / "batch_summary.csv")
    assert list(table[0]) == list(edit_batch.SUMMARY_COLUMNS)
    assert [(r["row"], r["part"], r["status"], r["steps"]) for r in table] == [
        ("1", "hat", "done", "3"), ("2", "scarf", "failed", ""), ("3", "nose", "done", "2")]
    assert table[0]["out"] == str(batch / "runs" / "hat")
    error = table[1]["error"]
    assert error.startswith("ValueError: part 'scarf' matches no Gaussian") and "\n" not in error
    assert table[0]["error"] == table[2]["error"] == ""
    for r, s in ((table[0], hat), (table[2], nose)):
        assert float(r["psnr_outside_db"]) == pytest.approx(s["metrics"]["psnr_outside_db"]) and float(r["seconds"]) > 0

    # again, summary in --out: complete rows are skipped (not rewritten), the failed one runs again
    mtimes = {p: (runs / p / "edited.ply").stat().st_mtime_ns for p in ("hat", "nose")}
    assert cli_main([*argv, "--out", str(tmp_path / "report")]) == 1
    out, err = capsys.readouterr()
    assert "2 skipped, 1 failed" in out and "row 2: failed" in err
    again = _summary(tmp_path / "report" / "batch_summary.csv")
    assert [r["status"] for r in again] == ["skipped", "failed", "skipped"]
    assert again[0]["steps"] == "3"
    assert float(again[0]["psnr_outside_db"]) == pytest.approx(hat["metrics"]["psnr_outside_db"])
    assert {p: (runs / p / "edited.ply").stat().st_mtime_ns for p in mtimes} == mtimes
    assert _summary(batch / "batch_summary.csv") == table  # the first run's summary is left as it was


@pytest.mark.parametrize("summary, done", [
    ({"steps": 5, "steps_planned": 5, "interrupted": False}, True),
    ({"steps": 2, "steps_planned": 5, "interrupted": "SIGINT"}, False),  # interrupted: runs again
    ({"steps": 5, "steps_planned": 5, "interrupted": "SIGTERM"}, False),
    ({"steps": 4, "steps_planned": 5, "interrupted": False}, False),
    ({"steps_planned": 5, "interrupted": False}, False),
    ("[1, 2]", False), ("{not json", False), (None, False),
])
def test_a_row_is_done_only_when_its_summary_is_complete(tmp_path, summary, done):
    if summary is not None:
        (tmp_path / "summary.json").write_text(summary if isinstance(summary, str) else json.dumps(summary))
    assert (edit_batch.row_done(tmp_path) is not None) is done


GOOD = [str(SCENE), "hat", "", "a gold hat"]


@pytest.mark.parametrize("header, rows, match", [
    (["scene", "part", "edit_prompt"], [[str(SCENE), "hat", "x"]], r"missing column\(s\) out \(required"),
    ([*HEADER[:5], "colour"], [[*GOOD, "a", "red"]], r": column colour is not a config key"),
    ([*HEADER[:5], "cameras"], [[*GOOD, "a", "3"]], r": column cameras is a config section"),
    (HEADER, [[*GOOD, "a", "", ""], [*GOOD, "b", "", "colour=red"]],
     r" row 2 \(line 3\), column overrides: unknown key 'colour'"),
    (HEADER, [[*GOOD, "a", "", ""], [*GOOD, "b", "", "steps=1 seed"]],
     r" row 2 \(line 3\), column overrides: 'seed' is not key=value"),
    (HEADER, [[*GOOD, "a", "2", "steps=3"]],
     r" row 1 \(line 2\), column overrides: steps is set here and in column steps; set it once"),
    (HEADER, [[*GOOD, "a", "", ""], [*GOOD, "b", "", ""], [*GOOD, "c", "many", ""]],
     r" row 3 \(line 4\), column steps: bad value for 'steps': Value 'many'"),
    (HEADER, [[*GOOD, "a", "-1", ""]], r" row 1 \(line 2\), column steps: config steps: must be >= 0"),
    (HEADER, [[*GOOD, "runs/a", "", ""], [*GOOD, "runs/../runs/a", "", ""]],
     r" row 2 \(line 3\), column out: folder .*runs/\.\./runs/a is also row 1's out"),
    (HEADER, [["nope.ply", "hat", "", "x", "a", "", ""]],
     r" row 1 \(line 2\), column scene: scene file .*nope.ply does not exist"),
    (HEADER, [[str(SCENE), "", "", "x", "a", "", ""]], r" row 1 \(line 2\), column part: empty \(required"),
    (HEADER, [[*GOOD, "a", "", ""], [*GOOD, "b", "", "guidance.tiny=null guidance.model=/no/model"]],
     r" row 2 \(line 3\), column overrides: guidance.model: model path '/no/model' does not exist"),
])
def test_a_bad_manifest_fails_up_front_naming_row_and_column(sd3, tmp_path, monkeypatch, capsys, header, rows, match):
    def never(*args, **kwargs):
        raise AssertionError("an edit started before the whole manifest was checked")

    monkeypatch.setattr(edit_batch, "run_rows", never)
    manifest = _manifest(tmp_path / "m", rows, header)
    capsys.readouterr()
    assert cli_main(["edit-batch", str(manifest), "--config", str(CONFIG), *_common(sd3)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gendistill edit-batch: error: manifest {manifest}") and "\n" not in err, err
    assert re.search(match, err), err
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["edits.csv"]  # nothing written


def test_bad_common_settings_name_no_row(sd3, tmp_path, capsys):
    manifest = _manifest(tmp_path, [[*GOOD, "a", "", ""]])
    assert cli_main(["edit-batch", str(manifest), "--config", str(CONFIG), *_common(sd3), "colour=red"]) == 2
    err = capsys.readouterr().err
    assert "command line: unknown key 'colour'" in err and "row" not in err
    assert cli_main(["edit-batch", str(tmp_path / "none.csv"), "--config", str(CONFIG)]) == 2
    assert f"manifest {tmp_path / 'none.csv'} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_after_the_running_edit_and_the_next_run_finishes(tmp_path, monkeypatch, capsys, sd3, sig,
                                                                         code):
    """Row 2's signal comes while it loads (the batch's handler takes it): the edit stops after its first
    step, row 3 does not start, the summary is written, exit 130 / 143. `run_edit` is a stand-in that
    writes summary.json as the editor does, and stops as the editor does (its own StopRequest)."""
    calls = []

    def fake_run_edit(cfg, *, callback=None, progress=True, send=True):
        calls.append(cfg.part)
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        if cfg.part == "nose" and send:
            os.kill(os.getpid(), sig)  # while "loading": before the edit's own handler is installed
        steps = 0
        with StopRequest() as stop:
            for _ in range(cfg.steps):
                if stop.requested:
                    break
                steps += 1
                callback(None, {"step": steps})
        summary = {"steps": steps, "steps_planned": cfg.steps, "interrupted": stop.requested or False,
                   "seconds": {"total": 0.5}, "metrics": {"psnr_outside_db": 50.0}}
        (out / "summary.json").write_text(json.dumps(summary))
        return EditResult(out=out, scene=out / "edited.ply", summary=summary)

    monkeypatch.setattr(editor_mod, "run_edit", fake_run_edit)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    manifest = _manifest(tmp_path, [[*GOOD, "hat", "", ""], [str(SCENE), "nose", "", "x", "nose", "", ""],
                                    [str(SCENE), "head", "", "x", "head", "", ""]])
    argv = ["edit-batch", str(manifest), "--config", str(CONFIG), "--no-progress", *_common(sd3), "steps=5"]
    assert cli_main(argv) == code
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert calls == ["hat", "nose"]
    table = _summary(tmp_path / "batch_summary.csv")
    assert [(r["status"], r["steps"]) for r in table] == [("done", "5"), ("interrupted", "1"), ("pending", "")]
    assert table[1]["error"] == f"{sig.name}: stopped after step 1 of 5; runs again on resume"
    assert table[2]["error"] == f"{sig.name}: not started; runs on resume"
    assert "the same command finishes" in capsys.readouterr().err

    monkeypatch.setattr(editor_mod, "run_edit", lambda cfg, **kw: fake_run_edit(cfg, **kw, send=False))
    assert cli_main(argv) == 0
    assert calls == ["hat", "nose", "nose", "head"]  # the done row is skipped
    assert [r["status"] for r in _summary(tmp_path / "batch_summary.csv")] == ["skipped", "done", "done"]


@pytest.mark.slow
def test_two_processes_under_torchrun_edit_each_row_once(sd3, tmp_path, free_port):
    """Rows dealt out in turn: rows 1 and 3 on process 0, row 2 on process 1; the main process writes the
    whole summary once."""
    manifest = _manifest(tmp_path, [[str(SCENE), part, "", f"a gold {part}", f"runs/{part}", "", ""]
                                    for part in ("hat", "nose", "head")])
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
    for attempt in range(2):  # a gloo rendezvous on CPU occasionally aborts; retry once on a fresh port
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(free_port()), "-m", "gendistill", "edit-batch", str(manifest),
                               "--config", str(CONFIG), "--no-progress", *_common(sd3)],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
        if proc.returncode == 0 or "edit-batch: row" in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = [line for line in proc.stderr.splitlines() if ": done in " in line]
    owners = {int(line.split("row ")[1].split(":")[0]): line.split("[process ")[1][0] for line in done}
    assert len(done) == 3 and owners == {1: "0", 2: "1", 3: "0"}, proc.stderr[-3000:]
    table = _summary(tmp_path / "batch_summary.csv")
    assert [(r["row"], r["part"], r["status"], r["steps"]) for r in table] == [
        ("1", "hat", "done", "2"), ("2", "nose", "done", "2"), ("3", "head", "done", "2")]
    for part in ("hat", "nose", "head"):
        assert json.loads((tmp_path / "runs" / part / "summary.json").read_text())["part"] == part
    assert proc.stdout.count("edit-batch: 3 rows: 3 done") == 1  # only the main process reports
