"""`gendistill edit-batch`: many part edits from one CSV manifest, split across processes.

    gendistill edit-batch edits.csv --config configs/splat_edit/romap_sd3.yaml steps=500
    accelerate launch -m gendistill edit-batch edits.csv --config ...      # or torchrun -m gendistill ...

The manifest has a header line. Columns:
- scene, part, edit_prompt, out: required in every row; prompt: optional (see `EditConfig`).
- overrides: optional, `key=value` settings separated by spaces (shell quoting: `edit_prompt="a b"`),
  read as on the command line, e.g. `steps=50 cameras.center=part`.
- any other column must be a config key (dotted for sections: `steps`, `guidance.model`,
  `guidance.options.grad_clip`); its cell is that row's value, an empty cell leaves it unset. Cells of
  text keys (prompts, part, paths) are taken as written (no YAML: `#`, `: ` and `yes` stay text).
Relative `scene` and `out` paths are relative to the manifest's folder (other paths, as on the
command line, to the working directory). Settings apply in the order: --config file, the command
line's `key=value` overrides (common to every row), the row's columns, the row's overrides cell.

Every row is checked before any work: columns, required values, `out` folders used twice, scene
files, and the row's whole config (`load_edit_config` plus the file checks of `check_inputs`, no
model loaded). A bad manifest is one error naming the manifest, the row and the column (exit 2).

Rows are dealt out to processes in turn (row i to process i mod N): deterministic, and balanced on
resume. Each process edits its rows one after another with `run_edit`; a row that raises is recorded
as failed (one line) and the next one starts. A row whose OUT/summary.json is complete
(`interrupted` false and `steps == steps_planned`) is skipped, so running the same command again
finishes a batch; interrupted and failed rows run again. The main process then writes
`batch_summary.csv` (beside the manifest, or in --out) with one line per row, in manifest order:
row, scene, part, out, status (done, skipped, failed; interrupted or pending after Ctrl-C), seconds,
steps, error, and the edit's key metrics. Exit code: 0 when every row is done or skipped, 1 when some
failed, 2 for a bad manifest or config. Ctrl-C / SIGTERM: the running edit stops after its current
step and writes its complete result (`run_edit`), no further row starts, the summary is written, and
the command exits 130 / 143 as `gendistill edit` does (a second signal aborts at once).
"""

from __future__ import annotations

import csv
import gc
import json
import os
import re
import shlex
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Sequence

__all__ = ["read_manifest", "row_configs", "row_done", "run_rows", "run_batch", "write_batch_summary",
           "batch_summary_path", "exit_code", "REQUIRED", "SUMMARY_COLUMNS"]

REQUIRED = ("scene", "part", "edit_prompt", "out")
OPTIONAL = ("prompt", "overrides")
RELATIVE_TO_MANIFEST = ("scene", "out")
METRICS = ("psnr_outside_db", "clip_similarity", "clip_directional_similarity")
SUMMARY_COLUMNS = ("row", "scene", "part", "out", "status", "seconds", "steps", "error", *METRICS)
SUMMARY_NAME = "batch_summary.csv"
# the processes meet once, after their last row: one may wait for another's hours of work (the
# default collective timeout, 10-30 minutes, would kill the batch at its end)
GATHER_TIMEOUT = timedelta(days=30)
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}
_NULLS = ("null", "Null", "NULL", "~")


# ---------------------------------------------------------------------- config keys
def _config_node(key: str):
    """The node of `EditConfig` at dotted `key`: ("value", node), ("free", None) inside a free-form dict
    (guidance.options, ...), ("section", node) for a section, or None for an unknown key."""
    from dataclasses import is_dataclass

    from omegaconf import OmegaConf

    from gendistill.splat_edit.edit_config import EditConfig

    node = _structured(EditConfig)
    for part in key.split("."):
        if not OmegaConf.is_dict(node):
            return None
        if not is_dataclass(OmegaConf.get_type(node)):
            return "free", None
        if not part or part not in node.keys():
            return None
        node = node._get_node(part)
    return ("section", node) if OmegaConf.is_dict(node) and is_dataclass(OmegaConf.get_type(node)) else ("value", node)


_STRUCTURED: dict = {}


def _structured(cls):
    if cls not in _STRUCTURED:
        from omegaconf import OmegaConf

        _STRUCTURED[cls] = OmegaConf.structured(cls)
    return _STRUCTURED[cls]


def _is_text_key(key: str) -> bool:
    from omegaconf.nodes import StringNode

    found = _config_node(key)
    return found is not None and found[0] == "value" and isinstance(found[1], StringNode)


def _override(key: str, value: str) -> str:
    """A manifest cell as a `key=value` override: text keys quoted (a prompt is never read as YAML)."""
    if _is_text_key(key) and value not in _NULLS:
        return f"{key}={json.dumps(value, ensure_ascii=False)}"
    return f"{key}={value}"


# ---------------------------------------------------------------------- the manifest
def _error(manifest, row: tuple[int, int] | None, column: str | None, text: str, cls=ValueError) -> Exception:
    """`manifest M row N (line L), column C: text`; row = (N, L): rows count from the first after the
    header, the line is the file's (as a spreadsheet numbers it)."""
    where = f"manifest {manifest}" + (f" row {row[0]} (line {row[1]})" if row else "")
    where += f", column {column}" if column else ""
    return cls(f"{where}: {text}")


def _raise_first(errors: list[Exception]) -> None:
    if errors:
        first = errors[0]
        more = f" (and {len(errors) - 1} more bad row{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
        raise type(first)(f"{first}{more}")


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """(header, [(line number, {column: cell})]) of the CSV at `path`, cells stripped, blank rows
    dropped; errors name the manifest."""
    if not path.exists():
        hint = " (the manifest comes before any key=value)" if "=" in str(path) else ""
        raise FileNotFoundError(f"manifest {path} does not exist{hint}")
    if not path.is_file():
        raise ValueError(f"manifest {path} is not a file")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a spreadsheet's byte-order mark
            reader = csv.reader(f)
            lines = [(reader.line_num, cells) for cells in reader]
    except UnicodeDecodeError:
        raise ValueError(f"manifest {path} is not UTF-8 text (save it as CSV, UTF-8)") from None
    except csv.Error as err:
        raise ValueError(f"manifest {path}: not valid CSV: {err}") from None
    except OSError as err:
        raise ValueError(f"manifest {path}: cannot read it: {err.strerror or err}") from None
    lines = [(n, [c.strip() for c in cells]) for n, cells in lines if any(c.strip() for c in cells)]
    if not lines:
        raise ValueError(f"manifest {path} is empty; its first line must name the columns, at least "
                         f"{', '.join(REQUIRED)}")
    header = lines[0][1]
    unnamed = [i for i, name in enumerate(header) if not name]
    rows = []
    for n, (line, cells) in enumerate(lines[1:], 1):
        if len(cells) > len(header) and any(cells[len(header):]):
            raise _error(path, (n, line), None, f"{len(cells)} cells, the header has {len(header)} columns "
                                                "(a value with a comma must be quoted)")
        for i in unnamed:
            if i < len(cells) and cells[i]:
                raise _error(path, (n, line), None, f"a value {cells[i]!r} in column {i + 1}, which the header "
                                                    "leaves unnamed")
        rows.append((line, {name: (cells[i] if i < len(cells) else "") for i, name in enumerate(header) if name}))
    return [name for name in header if name], rows


def _check_header(path: Path, header: list[str]) -> None:
    seen = set()
    for name in header:
        if name in seen:
            raise ValueError(f"manifest {path}: column {name} appears twice in the header")
        seen.add(name)
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ValueError(f"manifest {path}: missing column(s) {', '.join(missing)} (required: {', '.join(REQUIRED)}; "
                         f"header: {', '.join(header)})")
    for name in header:
        if name in REQUIRED or name in OPTIONAL:
            continue
        found = _config_node(name)
        if found is None:
            raise ValueError(f"manifest {path}: column {name} is not a config key (columns: {', '.join(REQUIRED)}, "
                             "prompt, overrides, and config keys such as steps or guidance.model)")
        if found[0] == "section":
            raise ValueError(f"manifest {path}: column {name} is a config section, not a key; name a key in it, "
                             f"e.g. {name}.{next(iter(found[1].keys()), 'key')}")


def _resolve(base: Path, value: str) -> str:
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else base / p)


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """The rows of the manifest at `path`, checked (every row before any is used).

    Returns one dict per row, in file order: row (1 = the first line after the header), line (in the
    file), scene / part / out / edit_prompt / prompt (scene and out resolved against the manifest's
    folder), overrides (the row's `key=value` list, column values first, then its overrides cell) and
    columns ({config key: the column it came from}). Errors (ValueError, FileNotFoundError for a missing
    scene) name the manifest, the row and the column: unknown columns, missing values, an overrides
    cell that is not `key=value`, a key set twice, an `out` folder used twice, a missing scene file.
    """
    path = Path(path)
    header, table = _read_table(path)
    _check_header(path, header)
    if not table:
        raise ValueError(f"manifest {path} has a header but no rows")
    base = path.parent
    rows, errors, outs = [], [], {}
    for n, (line, cells) in enumerate(table, 1):
        try:
            rows.append(_read_row(path, base, n, line, cells, header, outs))
        except (ValueError, FileNotFoundError) as err:
            errors.append(err)
    _raise_first(errors)
    return rows


def _read_row(path: Path, base: Path, n: int, line: int, cells: dict, header: list[str], outs: dict) -> dict:
    for col in REQUIRED:
        if not cells[col]:
            raise _error(path, (n, line), col, f"empty (required in every row: {', '.join(REQUIRED)})")
    values = {c: cells[c] for c in header if c != "overrides" and cells[c]}
    for col in RELATIVE_TO_MANIFEST:
        values[col] = _resolve(base, values[col])
    overrides = [_override(k, v) for k, v in values.items()]
    columns = {k: k for k in values}
    try:
        tokens = shlex.split(cells.get("overrides", ""))
    except ValueError as err:  # an unclosed quote
        raise _error(path, (n, line), "overrides", f"cannot split {cells['overrides']!r}: {err}") from None
    for token in tokens:
        key = token.split("=", 1)[0].strip()
        if "=" not in token or not key:
            raise _error(path, (n, line), "overrides", f"{token!r} is not key=value (settings separated by spaces)")
        if key in columns:
            where = "twice here" if columns[key] == "overrides" else f"here and in column {columns[key]}"
            raise _error(path, (n, line), "overrides", f"{key} is set {where}; set it once")
        columns[key] = "overrides"
        overrides.append(token)
    scene = Path(values["scene"])
    if not scene.is_file():
        raise _error(path, (n, line), "scene", f"scene file {scene} does not exist", FileNotFoundError)
    out = Path(values["out"]).resolve()
    if out in outs:
        raise _error(path, (n, line), "out", f"folder {values['out']} is also row {outs[out]}'s out; each row needs "
                                             "its own")
    outs[out] = n
    return {"row": n, "line": line, "scene": values["scene"], "part": values["part"], "out": values["out"],
            "edit_prompt": values["edit_prompt"], "prompt": values.get("prompt", ""), "overrides": overrides,
            "columns": columns}


def _column_of(message: str, columns: dict[str, str]) -> str | None:
    """The column whose key a config error names (`'key'`, `key: ...`, `config key: ...`), or None."""
    for key in sorted(columns, key=len, reverse=True):
        k = re.escape(key)
        if re.search(rf"'{k}[.']|^{k}[.:]|config {k}[.:]", message):
            return columns[key]
    return None


def row_configs(rows: list[dict], config: str | os.PathLike | None, common_overrides: Sequence[str] = (),
                manifest: str | os.PathLike = "manifest") -> list:
    """Each row's `EditConfig`: `load_edit_config(config, [*common_overrides, *row["overrides"]])`, the
    files it names (`check_inputs`) and its device, checked for every row before any work; no model is
    loaded. The file and the common overrides are checked alone first (an error there names no row)."""
    from gendistill.core.runtime import resolve_device
    from gendistill.splat_edit.edit_config import load_edit_config
    from gendistill.splat_edit.edit_inputs import check_inputs

    given = {o.split("=", 1)[0].strip() for o in common_overrides}
    placeholders = [f"{k}=x" for k in REQUIRED if k not in given]  # the rows set these
    load_edit_config(config, [*common_overrides, *placeholders])
    cfgs, errors = [], []
    for row in rows:
        try:
            cfg = load_edit_config(config, [*common_overrides, *row["overrides"]])
            check_inputs(cfg)
            resolve_device(cfg.device)
            cfgs.append(cfg)
        except (ValueError, FileNotFoundError) as err:
            text = re.sub(r"^(.* \+ )?command line: ", "", str(err))  # the row's settings are the news
            errors.append(_error(manifest, (row["row"], row["line"]), _column_of(text, row["columns"]), text,
                                 FileNotFoundError if isinstance(err, FileNotFoundError) else ValueError))
    _raise_first(errors)
    return cfgs


# ---------------------------------------------------------------------- running rows
def row_done(out: str | os.PathLike) -> dict | None:
    """The summary.json of `out` when it records a finished edit (parses, `interrupted` false, `steps ==
    steps_planned`), else None: the row must run (again)."""
    try:
        summary = json.loads((Path(out) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("interrupted", True) is not False:
        return None
    steps = summary.get("steps")
    return summary if isinstance(steps, int) and steps == summary.get("steps_planned") else None


def _one_line(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(text.split())  # tracebacks of other libraries span lines
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _result(row: dict, status: str, *, seconds=None, summary: dict | None = None, error: str = "",
            signal_name: str | None = None) -> dict:
    metrics = (summary or {}).get("metrics") or {}
    return {"row": row["row"], "scene": row["scene"], "part": row["part"], "out": row["out"], "status": status,
            "seconds": "" if seconds is None else round(float(seconds), 2),
            "steps": "" if summary is None else summary.get("steps", ""), "error": error,
            **{k: ("" if metrics.get(k) is None else metrics[k]) for k in METRICS}, "signal": signal_name}


def _run_row(row: dict, cfg, stop, *, progress: bool, debug: bool) -> dict:
    """Edit one row; any Exception is its result (failed), KeyboardInterrupt (a second signal) goes up."""
    import torch

    from gendistill.splat_edit import editor

    done = row_done(cfg.out)
    if done is not None:
        return _result(row, "skipped", seconds=(done.get("seconds") or {}).get("total"), summary=done)
    forwarded = []

    def forward_stop(_editor, _record) -> None:
        """A signal that came while the row was loading (the batch's handler took it): hand it to the
        edit's own handler, so the edit stops after this step and writes its result."""
        if stop.requested and not forwarded:
            forwarded.append(stop.requested)
            signal.raise_signal(getattr(signal, stop.requested))

    start = time.perf_counter()
    try:
        result = editor.run_edit(cfg, callback=forward_stop, progress=progress)
    except Exception as err:  # noqa: BLE001 - one row's failure is its result; the batch goes on
        if debug:
            import traceback

            traceback.print_exc()
        return _result(row, "failed", seconds=time.perf_counter() - start, error=_one_line(err))
    finally:
        gc.collect()  # the row's models and scene, before the next row loads its own
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    summary, seconds = result.summary, time.perf_counter() - start
    if summary.get("interrupted"):
        name = summary["interrupted"]
        return _result(row, "interrupted", seconds=seconds, summary=summary, signal_name=name,
                       error=f"{name}: stopped after step {summary['steps']} of {summary['steps_planned']}; "
                             "runs again on resume")
    return _result(row, "done", seconds=seconds, summary=summary)


def run_rows(rows: list[dict], cfgs: list, *, progress: bool = True, debug: bool = False) -> list[dict]:
    """Edit checked rows (`read_manifest`, `row_configs`) across the processes of `accelerate launch` /
    torchrun: row i on process i mod N. Returns every row's result (dicts with `SUMMARY_COLUMNS` and
    `signal`), in row order, on every process."""
    from dataclasses import replace

    from accelerate import PartialState
    from accelerate.utils import gather_object

    from gendistill.core.runtime import resolve_device
    from gendistill.splat_edit.editor import StopRequest

    cpu = resolve_device(cfgs[0].device).type == "cpu"
    state = PartialState(cpu=cpu, timeout=GATHER_TIMEOUT)  # cpu: several CPU processes join over gloo
    n_proc, rank = state.num_processes, state.process_index
    tag = f" [process {rank}]" if n_proc > 1 else ""
    results = []
    with StopRequest() as stop:  # a signal between rows; during an edit, run_edit's own handler takes it
        for i in range(rank, len(rows), n_proc):
            row, cfg = rows[i], cfgs[i]
            if n_proc > 1 and state.device.type == "cuda" and cfg.device in (None, "cuda"):
                cfg = replace(cfg, device=str(state.device))  # each process on its own GPU
            if stop.requested:
                results.append(_result(row, "pending", signal_name=stop.requested,
                                       error=f"{stop.requested}: not started; runs on resume"))
                continue
            print(f"edit-batch{tag}: row {row['row']}/{len(rows)}: {Path(row['scene']).name} part {row['part']} "
                  f"-> {row['out']}", file=sys.stderr, flush=True)
            res = _run_row(row, cfg, stop, progress=progress and state.is_local_main_process, debug=debug)
            results.append(res)
            if res["signal"] and not stop.requested:
                stop.requested = res["signal"]  # no further row starts; one more signal aborts
            took = f" in {res['seconds']:.1f} s" if res["status"] != "skipped" else " (summary.json complete)"
            print(f"edit-batch{tag}: row {row['row']}: {res['status']}{took}"
                  + (f": {res['error']}" if res["error"] else ""), file=sys.stderr, flush=True)
    if n_proc > 1:
        results = gather_object(results)
    return sorted(results, key=lambda r: r["row"])


# ---------------------------------------------------------------------- the summary
def batch_summary_path(manifest: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Where the batch summary goes: OUT/batch_summary.csv, or beside the manifest."""
    return Path(out if out is not None else Path(manifest).parent) / SUMMARY_NAME


def write_batch_summary(path: str | os.PathLike, results: list[dict]) -> Path:
    """`results` as a CSV (`SUMMARY_COLUMNS`), written atomically."""
    from gendistill.core.io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(results)
    return Path(path)


def exit_code(results: list[dict]) -> int:
    """130 / 143 when a signal stopped the batch (as `gendistill edit`), else 1 if a row failed, else 0."""
    for r in results:
        if r.get("signal"):
            return EXIT_CODES.get(r["signal"], 130)
    return 1 if any(r["status"] == "failed" for r in results) else 0


def run_batch(manifest: str | os.PathLike, config: str | os.PathLike | None, common_overrides: Sequence[str] = (),
              progress: bool = True, *, out: str | os.PathLike | None = None, debug: bool = False) -> list[dict]:
    """Check the whole manifest (`read_manifest`, `row_configs`), edit its rows across processes
    (`run_rows`) and write `batch_summary_path(manifest, out)` from the main process. Returns every
    row's result in manifest order (on every process); `exit_code(results)` is the command's code.
    Nothing is written when a check fails."""
    rows = read_manifest(manifest)
    cfgs = row_configs(rows, config, common_overrides, manifest)
    results = run_rows(rows, cfgs, progress=progress, debug=debug)
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        write_batch_summary(batch_summary_path(manifest, out), results)
    state.wait_for_everyone()  # no process ends (torchrun then stops the rest) before the summary is written
    return results
