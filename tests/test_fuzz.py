"""Fuzzing the config loader and the command line (hypothesis): a bad config file, override or flag is a
one-line error that names the key, flag or file, never a traceback.

Deterministic (derandomize, no example database, no .hypothesis folder) and about half a minute on 2 CPU
cores. The command-line fuzz never starts real work: the functions that would (editing, training,
planning, rendering, generating, segmenting) are replaced by one that raises `Started`, so reaching it
means every check before it passed.
"""

from __future__ import annotations

import os
import string
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gendistill.cli import build_parser, main
from gendistill.config import ConfigError, load_config
from gendistill.splat_edit.edit_config import EditConfig, load_edit_config
from gendistill.video_distill.finetune_config import FinetuneConfig, check_config

# Hypothesis caches what it reads of the code under test in its home folder as pytest collects (./.hypothesis
# by default, even without an example database): keep that out of the checkout.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "gendistill-hypothesis")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"edit": sorted((ROOT / "configs" / "splat_edit").glob("*.yaml")),
           "finetune": sorted((ROOT / "configs" / "video_distill").glob("*.yaml"))}
CLASSES = {"edit": EditConfig, "finetune": FinetuneConfig}
REQUIRED = {"scene": "s.ply", "part": "hat", "edit_prompt": "a gold hat", "out": "o"}  # edit keys without defaults


def fuzz(examples: int) -> settings:
    """The same examples every run (derandomize), no example database, no deadline (a busy machine)."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.filter_too_much, HealthCheck.data_too_large])


# -- values and keys -------------------------------------------------------------------------------
TEXT = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.sampled_from(["${nope}", "${oc.env:NOPE}", "${", "???", "no", "true", "1e-3", "[1, 2", "{a: 1}", "cuda",
                     "gpu", "", " ", "auto", "sds", "none", "-1", "nan", "0"]),
)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**4, 10**4), st.integers(), st.floats(), TEXT)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3),
                   st.dictionaries(st.text(string.ascii_lowercase, min_size=1, max_size=5), SCALARS, max_size=3))
NEW_KEYS = st.one_of(st.text(string.ascii_lowercase + "_", min_size=1, max_size=8),
                     st.sampled_from(["a.b", "x y", "0", "${x}", "up[0]", "-"]))


def _dotted(path) -> str:
    return ".".join(map(str, path))


def _key_paths(tree: dict, prefix=()):
    """Every key path of a nested dict, sections and values."""
    for key, value in tree.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from _key_paths(value, (*prefix, key))


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _config_keys(cls) -> list[tuple]:
    return sorted(_key_paths(OmegaConf.to_container(OmegaConf.structured(cls))), key=_dotted)


KNOWN = {kind: _config_keys(cls) for kind, cls in CLASSES.items()}
TREES = {path: OmegaConf.to_container(OmegaConf.load(path)) for paths in CONFIGS.values() for path in paths}


def names(msg: str, keys) -> bool:
    """Whether `msg` names one of `keys` (dotted paths): the whole path, its last key with its section, or,
    quoted, the part of it that is already wrong (`unknown key 'a'` for a.b, `bad value for 'steps'` for
    steps.x)."""
    for key in keys:
        parts = key if isinstance(key, tuple) else tuple(str(key).split("."))
        if _dotted(parts) in msg or (str(parts[-1]) in msg and _dotted(parts[:-1]) in msg):
            return True
        if any(f"'{_dotted(parts[:n])}'" in msg for n in range(1, len(parts))):
            return True
    return False


def load(kind: str, path, overrides=()):
    """What the commands load: edit: `load_edit_config`; finetune: `load_config` + `check_config`."""
    if kind == "edit":
        return load_edit_config(path, overrides)
    cfg = load_config(FinetuneConfig, path, overrides)
    check_config(cfg)
    return cfg


def user_error(call) -> str | None:
    """None when `call()` works, else the message of the documented error (`ConfigError` or a check's
    `ValueError`), which must be one line; anything else (an OmegaConf error, a TypeError, ...) escapes."""
    try:
        call()
    except ValueError as err:
        assert not isinstance(err, OmegaConfBaseException), f"raw OmegaConf error {type(err).__name__}: {err}"
        msg = str(err)
        assert msg and "\n" not in msg, f"not one line: {msg!r}"
        return msg
    return None


def write(tmp_path: Path, tree_or_text, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    if isinstance(tree_or_text, str):
        path.write_text(tree_or_text, encoding="utf-8")
    else:
        path.write_text(yaml.safe_dump(tree_or_text, allow_unicode=True), encoding="utf-8")
    return path


def required_overrides(kind: str, tree: dict) -> list[str]:
    """Placeholders for the required edit keys the shipped file leaves to the command line."""
    return [f"{k}={v}" for k, v in REQUIRED.items() if kind == "edit" and k not in tree]


# -- the config loader ------------------------------------------------------------------------------
@st.composite
def mutations(draw):
    """A shipped config with 1-3 changes: a value of the wrong type at a key of the file or of the dataclass
    (sections included), a key deleted, or an unknown key added (nested too). Returns (kind, original
    tree, mutated tree, the dotted paths touched)."""
    kind = draw(st.sampled_from(sorted(CONFIGS)))
    path = draw(st.sampled_from(CONFIGS[kind]))
    original = TREES[path]
    tree = yaml.safe_load(yaml.safe_dump(original))  # a deep copy
    touched = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "set_known", "delete", "add"]))
        keys = sorted(_key_paths(tree), key=_dotted)
        if op == "set_known" or (op in ("set", "delete") and not keys):
            key = draw(st.sampled_from(KNOWN[kind]))
            node = tree
            for part in key[:-1]:  # make the sections on the way
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            node[key[-1]] = draw(VALUES)
        elif op == "set":
            key = draw(st.sampled_from(keys))
            _get(tree, key[:-1])[key[-1]] = draw(VALUES)
        elif op == "delete":
            key = draw(st.sampled_from(keys))
            del _get(tree, key[:-1])[key[-1]]
        else:
            sections = [()] + [k for k in keys if isinstance(_get(tree, k), dict)]
            key = (*draw(st.sampled_from(sections)), draw(NEW_KEYS))
            _get(tree, key[:-1])[key[-1]] = draw(VALUES)
        touched.append(key)
    return kind, original, tree, touched


@fuzz(150)
@given(case=mutations())
def test_mutated_shipped_configs_load_or_name_the_key(case, tmp_path):
    kind, original, tree, touched = case
    path = write(tmp_path, tree)
    msg = user_error(lambda: load(kind, path, required_overrides(kind, original)))
    if msg is not None:
        assert names(msg, touched) or str(path) in msg, f"{msg!r} names none of {list(map(_dotted, touched))}"


def _random_tree(keys: list[str]):
    key = st.one_of(st.sampled_from(keys), NEW_KEYS)
    return st.recursive(st.dictionaries(key, VALUES, max_size=4),
                        lambda inner: st.dictionaries(key, st.one_of(VALUES, inner), max_size=4), max_leaves=12)


@fuzz(60)
@given(data=st.data())
def test_random_yaml_dicts_load_or_name_a_key(data, tmp_path):
    kind = data.draw(st.sampled_from(sorted(CONFIGS)))
    top = sorted({str(k[0]) for k in KNOWN[kind]} | {str(k[-1]) for k in KNOWN[kind]})
    tree = data.draw(_random_tree(top))
    path = write(tmp_path, tree)
    msg = user_error(lambda: load(kind, path, required_overrides(kind, tree)))
    if msg is not None:
        assert names(msg, list(_key_paths(tree)) + list(REQUIRED)) or str(path) in msg, msg


YAML_NOISE = st.lists(st.sampled_from([*":-[]{}&*!|>'\"%@`#,?\t\n $=.", "  ", "\n  ", "- ", ": ", "\x00", "\ufeff",
                                        "é", "${", "}", "!!python/object:os.system", "<<: "]), max_size=8).map("".join)


@st.composite
def broken_yaml(draw) -> tuple[str, str]:
    """(kind, text): shipped YAML with noise inserted, a span deleted or the end cut off; or pure noise."""
    kind = draw(st.sampled_from(sorted(CONFIGS)))
    text = draw(st.sampled_from(CONFIGS[kind])).read_text(encoding="utf-8")
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "truncate", "noise"]))
        if op == "insert":
            text = text[:at] + draw(YAML_NOISE) + text[at:]
        elif op == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 40)):]
        elif op == "truncate":
            text = text[:at]
        else:
            text = draw(YAML_NOISE)
    return kind, text


@fuzz(100)
@given(case=broken_yaml())
def test_broken_yaml_text_names_the_file_or_a_key(case, tmp_path):
    kind, text = case
    path = write(tmp_path, text)
    msg = user_error(lambda: load(kind, path, [f"{k}={v}" for k, v in REQUIRED.items()] if kind == "edit" else []))
    if msg is not None:  # a file that is still YAML may fail on one of its keys
        try:
            tree = OmegaConf.to_container(OmegaConf.load(path))
        except Exception:
            tree = None
        keys = list(_key_paths(tree)) if isinstance(tree, dict) else []
        assert str(path) in msg or names(msg, keys), msg


OVERRIDE_VALUES = st.one_of(TEXT, VALUES.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()
                                             .removesuffix("...").strip()))


@st.composite
def overrides(draw, kind: str) -> list[str]:
    known = [_dotted(k) for k in KNOWN[kind]]
    key = st.one_of(st.sampled_from(known), NEW_KEYS,
                    st.sampled_from(known).map(lambda k: k + ".x"), st.sampled_from(known).map(lambda k: k + "[0]"))
    return draw(st.lists(st.builds(lambda k, v: f"{k}={v}", key, OVERRIDE_VALUES), min_size=1, max_size=3))


@fuzz(120)
@given(data=st.data())
def test_overrides_load_or_name_the_key(data):
    kind = data.draw(st.sampled_from(sorted(CONFIGS)))
    config = data.draw(st.sampled_from(CONFIGS[kind]))
    given_ = data.draw(overrides(kind))
    msg = user_error(lambda: load(kind, config, [*required_overrides(kind, TREES[config]), *given_]))
    if msg is not None:
        keys = [o.split("=", 1)[0].replace("[0]", "") for o in given_]
        assert names(msg, keys) or str(config) in msg, f"{msg!r} names none of {keys}"


# -- the command line -------------------------------------------------------------------------------
class Started(Exception):
    """Raised where a command would start real work: every check before it has passed."""


def _started(*args, **kwargs):
    raise Started


@pytest.fixture
def no_work(monkeypatch, tmp_path):
    """Every command stops with `Started` where its real work would begin; the working directory is
    `tmp_path`; returns the files the fuzzed flags point to."""
    import gendistill.batch_render as batch_render
    import gendistill.plan as plan
    import gendistill.splat_edit.edit_batch as edit_batch
    import gendistill.splat_edit.editor as editor
    import gendistill.splat_edit.segment as segment
    import gendistill.video_distill.generate as generate
    import gendistill.video_distill.trainer as trainer
    import gendistill.viewer.view as view

    def finetune(cfg):
        check_config(cfg)  # what the trainer checks before it builds anything
        raise Started

    monkeypatch.setattr(editor, "run_edit", _started)
    monkeypatch.setattr(edit_batch, "run_rows", _started)  # after every manifest row's checks
    monkeypatch.setattr(trainer, "finetune", finetune)
    monkeypatch.setattr(plan, "_plan_edit", _started)
    monkeypatch.setattr(plan, "_plan_finetune", _started)
    monkeypatch.setattr(batch_render.GaussianScene, "load", staticmethod(_started))  # after the job's checks
    monkeypatch.setattr(generate, "load_video_pipeline", _started)
    monkeypatch.setattr(segment, "segment", _started)
    monkeypatch.setattr(view, "start_viewer", _started)  # after the scenes, parts and cameras are checked
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # --no-progress sets it
    monkeypatch.chdir(tmp_path)
    files = {"broken.yaml": "steps: [1\n", "list.yaml": "- 1\n- 2\n", "empty.yaml": "", "prompts.txt": "a ball\n",
             "prompts.json": '["a ball", ', "empty.txt": "\n# only a comment\n", "scene.ply": "ply\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81")
    return sorted(str(tmp_path / name) for name in [*files, "binary.txt", "missing.yaml"]) + [str(tmp_path)]


GARBAGE = st.sampled_from(["--nope", "-", "--", "=", "key=", "x=1=2", "", "-1", "--frames", "--config", "é"])
ODD_VALUES = st.one_of(TEXT, st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:x", "gpu", "cpu:-1", "512x512", "0x0",
                                              "8x", "1,1,1", "1,1", "a,b,c", "nope", "0", "-1", "nan", "inf", "1e9",
                                              "0x10"]))
PARSERS = build_parser(key_lists=False)._subparsers._group_actions[0].choices  # command -> its parser
SKIP = {"-h", "--help", "--debug"}  # --debug re-raises by design


def _mostly(draw, fitting, odd):
    """A value that fits the flag 9 times in 10, else an odd one."""
    return draw(fitting if draw(st.integers(0, 9)) else odd)


@st.composite
def command_lines(draw, files: list[str]) -> list[str]:
    """A command with most of its real flags (values that mostly fit; file flags pointing to shipped configs
    or `files`), key=value overrides and now and then a garbage token, in a random order."""
    command = draw(st.sampled_from(sorted(PARSERS)))
    kind = command if command in CONFIGS else draw(st.sampled_from(sorted(CONFIGS)))
    paths = st.sampled_from(files)
    config = st.one_of(st.sampled_from(CONFIGS[kind]).map(str), st.sampled_from(CONFIGS["edit"] + CONFIGS["finetune"])
                       .map(str), paths)
    chunks = []
    for action in PARSERS[command]._actions:
        flag = action.option_strings[-1] if action.option_strings else None
        if flag in SKIP or action.dest == "help":
            continue
        if not (draw(st.integers(0, 30)) if action.required else draw(st.booleans())):
            continue  # a required flag is nearly always there
        if action.choices:
            value = _mostly(draw, st.sampled_from([str(c) for c in action.choices]), ODD_VALUES)
        elif action.type is int:
            value = _mostly(draw, st.integers(-2, 10**4).map(str), ODD_VALUES)
        elif action.type is float:
            value = _mostly(draw, st.floats().map(str), ODD_VALUES)
        elif action.dest == "config":
            value = _mostly(draw, st.sampled_from(CONFIGS[kind]).map(str), config)
        elif action.dest in ("scene", "scenes", "prompts", "cameras", "masks", "manifest", "labels", "masks3d"):
            value = _mostly(draw, paths, ODD_VALUES)
        else:
            value = draw(ODD_VALUES)
        if action.dest == "overrides":
            required = [f"{k}={v}" for k, v in REQUIRED.items()] if kind == "edit" and draw(st.integers(0, 3)) else []
            chunks.append(required + (draw(overrides(kind)) if draw(st.booleans()) else []))
        elif not action.option_strings:  # scene(s)
            chunks.append([value])
        elif action.nargs == 0:
            chunks.append([flag])
        elif value.startswith("-") or draw(st.booleans()):
            chunks.append([f"{flag}={value}"])
        else:
            chunks.append([flag, value])
    if not draw(st.integers(0, 5)):
        chunks.append([draw(GARBAGE)])
    return [command, *(token for chunk in draw(st.permutations(chunks)) for token in chunk)]


def _names_in(argv: list[str], files: list[str]) -> list[str]:
    """What an error about `argv` may name: its flags (with or without dashes), its override keys and the
    files it points to; the positional key=value list is named `overrides`."""
    names = ["overrides"] if argv[0] in ("edit", "edit-batch", "finetune", "plan") else []
    names += ["manifest"] if argv[0] == "edit-batch" else []  # its errors start `manifest FILE`
    names += ["input", "output"] if argv[0] == "convert" else []  # its positional arguments
    for token in argv[1:]:
        if token.startswith("--"):
            name, _, token = token[2:].partition("=")  # --config=FILE
            names += [f"--{name}", name, name.replace("-", "_"), name.replace("-", " ")]
            names += ["part names"] if name == "parts" else []  # segment's own wording for its --parts check
        elif "=" in token:
            key = token.split("=", 1)[0]
            names += [key, key.replace("[", ".").replace("]", "")]  # OmegaConf reads a[0] as a.0
            continue
        if token in files or token.endswith(".yaml"):
            names.append(token)
    return [n for n in names if n]


@fuzz(400)
@given(data=st.data())
def test_command_lines_run_or_fail_in_one_line_naming_the_flag(data, no_work, capsys):
    argv = data.draw(command_lines(no_work))
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's usage error
        assert exit_.code in (0, 2), exit_.code
        return
    except Started:
        return
    err = capsys.readouterr().err
    if code == 0:
        return
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"gendistill {argv[0]}: error: "), (code, err)
    msg = lines[0].split(": error: ", 1)[1]
    assert names(msg, _names_in(argv, no_work)), f"{msg!r} names nothing of {argv}"


# -- what the fuzzing found (each failed before its fix) -------------------------------------------
EDIT_REQUIRED = [*(f"{k}={v}" for k, v in REQUIRED.items()), "guidance.model=m"]


@pytest.mark.parametrize("cls, given, match", [
    # OmegaConf's full_key / object_type trailer made every type error three lines
    (EditConfig, ["steps=[1]"], r"^command line: bad value for 'steps': Value '\[1\]' of type 'ListConfig' could not "
                                r"be converted to Integer$"),
    # a ${...} that resolves to nothing, or is left open: a raw OmegaConf traceback
    (EditConfig, ["prompt=${nope}"], r"^command line: bad value for 'prompt': Interpolation key 'nope' not found$"),
    (FinetuneConfig, ["output_dir=${"], r"^command line: bad value for 'output_dir': "),
    # a mapping for a list: a bare TypeError ("Cannot merge incompatible container types")
    (EditConfig, ["background={a: 1}"], r"^command line: 'background' is a list, not a section; give it as \["),
    (EditConfig, ["cameras.up[0]=3"], r"^command line: 'cameras.up' is a list, not a section"),
    (FinetuneConfig, ["validation.prompts={a: b}"], r"^command line: 'validation.prompts' is a list"),
    # a nested config's own check (__post_init__) named no dotted key, sometimes no key at all
    (EditConfig, ["segment.galp.sh_degree=9"], r"^command line: segment.galp.sh_degree: SH degree must be 0, 1, 2 "
                                               r"or 3, got 9$"),
    (EditConfig, ["anchors.slamp.t_s=99"], r"^command line: anchors.slamp.t_s: t_s must be in \[0, num_steps=28\]"),
    # a value YAML cannot read (a control character): a raw yaml.ReaderError traceback
    (EditConfig, ["prompt=a\x1fb"], r"^command line: bad value for 'prompt': unacceptable character #x001f"),
    # overrides that clash: a ValueError naming no key ("invalid literal for int()"), or a traceback
    (EditConfig, ["anchors=[]", "anchors.x=1"], r"^command line: bad value for 'anchors.x': "),
    (EditConfig, ["anchors=${x}", "anchors.x=1"], r"^command line: bad value for 'anchors.x': "),
    # an unknown guidance kind: a KeyError naming no key
    (EditConfig, ["guidance.kind=zzz"], r"^config guidance.kind: must be one of \('auto', "),
    # a device torch does not know passed, then `gendistill edit` died with torch's RuntimeError
    (EditConfig, ["device=gpu"], r"^config device: must be cpu, cuda, cuda:N or null"),
    # an override without a key: "unknown key ''"
    (EditConfig, ["=3"], r"^overrides must look like key=value, got =3$"),
])
def test_bad_overrides_fail_in_one_line_naming_the_key(cls, given, match):
    with pytest.raises(ValueError, match=match) as err:
        load(next(k for k, c in CLASSES.items() if c is cls), None, [*EDIT_REQUIRED * (cls is EditConfig), *given])
    assert not isinstance(err.value, OmegaConfBaseException) and "\n" not in str(err.value)


@pytest.mark.parametrize("text, match", [
    ("- 1\n- 2\n", r"c.yaml: expected `key: value` lines at the top level, got a list$"),  # was a bare TypeError
    ("steps: [1\n", r"c.yaml: not valid YAML \(expected `key: value` lines\): .* \(line 2, column 1\)$"),  # 3 lines
    ("prompt: ${a.b}\n", r"c.yaml \+ command line: bad value for 'prompt': Interpolation key 'a.b' not found$"),
    ("background: {a: 1}\n", r"c.yaml: 'background' is a list, not a section"),
])
def test_bad_files_fail_in_one_line_naming_the_file_and_key(text, match, tmp_path):
    with pytest.raises(ConfigError, match=match) as err:
        load_edit_config(write(tmp_path, text), EDIT_REQUIRED)
    assert "\n" not in str(err.value)


def _one_line_error(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"gendistill {argv[0]}: error: "), err
    return err


def test_bad_files_and_devices_on_the_command_line(tmp_path, capsys, monkeypatch):
    """`plan` read a broken or list --config itself (raw yaml / OmegaConf tracebacks); a device name torch
    does not know was a RuntimeError traceback; an undecodable or broken --prompts file named no file."""
    monkeypatch.chdir(tmp_path)
    for text in ("steps: [1\n", "- 1\n"):
        broken = write(tmp_path, text, "broken.yaml")
        assert str(broken) in _one_line_error(["plan", "--config", str(broken)], capsys)
    scene = ROOT / "assets" / "scenes" / "snowman.ply"
    err = _one_line_error(["render", str(scene), "--out", str(tmp_path), "--device", "gpu"], capsys)
    assert "--device must be cpu, cuda or cuda:N, got 'gpu'" in err
    (tmp_path / "p.txt").write_bytes(b"\xff\xfe")
    (tmp_path / "p.json").write_text('["a ball", ')
    for prompts in ("p.txt", "p.json"):
        err = _one_line_error(["generate", "--model", "m", "--prompts", prompts, "--out", "o"], capsys)
        assert f"--prompts {prompts}: " in err
