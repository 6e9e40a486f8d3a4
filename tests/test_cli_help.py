"""A CLI that explains itself: every option of every command has help (and states its default),
no reST markup in any help text, ``cirlab --version``, ``data check`` naming the right root,
plain progress lines in logs and no transformers loading bar."""

import argparse
import inspect
import json
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from PIL import Image

from cirlab.cli import build_parser, main
from cirlab.cli import evaluate as eval_cli
from cirlab.cli import importing

REST = re.compile(r"``|:[a-z]+:`")  # ``literal``, :class:`x`, :func:`~a.b`


def parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """Every parser of the ``cirlab`` command, sub-commands at any depth, ``cirlab import``'s
    own (parsed only once that command runs) included."""
    found = []

    def walk(parser: argparse.ArgumentParser) -> None:
        found.append((parser.prog, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(build_parser())
    walk(importing.parser())
    return found


def options() -> list[tuple[str, argparse.ArgumentParser, argparse.Action]]:
    return [(prog, parser, action) for prog, parser in parsers() for action in parser._actions
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))]


def name(action: argparse.Action) -> str:
    return action.option_strings[-1] if action.option_strings else action.dest


def expanded_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return parser._get_formatter()._expand_help(action)  # %(default)s and friends filled in


def test_the_walk_reaches_every_level():
    progs = {prog for prog, _ in parsers()}
    assert {"cirlab", "cirlab data synth", "cirlab data check", "cirlab index build", "cirlab spn generate",
            "cirlab train", "cirlab import", "cirlab import blip"} <= progs


def test_every_option_of_every_command_has_help():
    missing = {(prog, name(a)) for prog, _, a in options() if not (a.help or "").strip() or a.help == argparse.SUPPRESS}
    assert missing == set(), "options without help"


def test_every_option_with_a_default_states_it():
    unstated = set()
    for prog, parser, a in options():
        if a.default is None or a.default is False or a.default == [] or a.default == argparse.SUPPRESS:
            continue  # nothing to state (``in`` would also skip 0, which equals False)
        if isinstance(a, argparse._VersionAction):
            continue
        if not a.help or str(a.default) not in expanded_help(parser, a):
            unstated.add((prog, name(a)))
    assert unstated == set(), "options whose help does not state their default"


def test_no_rest_markup_in_any_help_text():
    found = []
    for prog, parser in parsers():
        texts = [parser.description or "", parser.epilog or "", parser.format_help()]
        texts += [a.help for a in parser._actions if a.help and a.help != argparse.SUPPRESS]
        found += [(prog, m.group()) for text in texts for m in REST.finditer(text)]
    assert found == []


def test_top_level_help_is_plain_and_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "composed image retrieval" in out and "cirlab demo --quick" in out
    assert "``" not in out and "dispatcher" not in out  # the module docstring is for developers
    for command in ("data", "train", "eval", "index", "search", "serve", "import"):
        assert re.search(rf"^\s+{command}\s+\S", out, re.M), command


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"cirlab {version('cirlab')}\n"


def test_train_help_says_where_the_model_goes_and_how_the_device_is_chosen(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "<run-dir>/model" in out and "runs/<name>-" in out
    assert "CIRLAB_DEVICE=cpu" in out and "CUDA" in out and "torchrun" in out
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "<run-dir>/backbone" in capsys.readouterr().out


def test_data_synth_defaults_are_the_generators():
    from cirlab.data.shapes import synthesize

    synth = next(p for prog, p in parsers() if prog == "cirlab data synth")
    args = synth.parse_args(["--out", "x"])
    for key, param in inspect.signature(synthesize).parameters.items():
        if key in vars(args) and param.default is not param.empty:
            assert getattr(args, key) == param.default, key
    assert args.no_holdout is not inspect.signature(synthesize).parameters["holdout"].default


# --- data check: the right root ------------------------------------------------------------------


def cirr_layout(root: Path, annotations: Path) -> Path:
    """A 6-image CIRR val split: images under ``root/dev``, annotations under ``annotations``."""
    names = [f"dev-{i}" for i in range(6)]
    for sub, obj in (("image_splits/split.rc2.val.json", {n: f"./dev/{n}.png" for n in names}),
                     ("captions/cap.rc2.val.json",
                      [{"pairid": p, "reference": names[r], "target_hard": names[r + 1], "target_soft": {},
                        "caption": "c", "img_set": {"id": 0, "members": names}} for p, r in ((1, 0), (2, 2))])):
        (annotations / sub).parent.mkdir(parents=True, exist_ok=True)
        (annotations / sub).write_text(json.dumps(obj))
    for n in names:
        (root / "dev").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (200, 10, 10)).save(root / "dev" / f"{n}.png")
    return root


def check(root: Path, *extra: str) -> int:
    return main(["data", "check", "--dataset", "cirr", "--root", str(root), "--split", "val", *extra])


def test_data_check_on_the_right_root_suggests_nothing(tmp_path, capsys):
    root = cirr_layout(tmp_path / "cirr_dataset", tmp_path / "cirr_dataset" / "cirr")
    assert check(root) == 0
    assert "try --root" not in capsys.readouterr().out
    assert check(root, "--json") == 0
    assert json.loads(capsys.readouterr().out)["suggested_root"] is None


def test_data_check_one_level_too_deep_names_the_parent(tmp_path, capsys):
    root = cirr_layout(tmp_path / "cirr_dataset", tmp_path / "cirr_dataset" / "cirr")
    # root/cirr holds captions/ and image_splits/ (annotations found there) but no image
    assert check(root / "cirr") == 1
    out = capsys.readouterr().out
    assert "6 of 6 referenced images missing" in out
    assert out.rstrip().splitlines()[-1] == (f"every referenced image is missing, but they are under {root}: "
                                             f"try --root {root}")
    assert check(root / "cirr", "--json") == 1
    assert json.loads(capsys.readouterr().out)["suggested_root"] == str(root)


def test_data_check_one_level_too_shallow_names_the_subfolder(tmp_path, capsys):
    # everything in one folder named cirr: from its parent the annotations are found
    # (<parent>/cirr/captions) and every image is looked for in <parent>/dev
    root = cirr_layout(tmp_path / "data" / "cirr", tmp_path / "data" / "cirr")
    (tmp_path / "data" / "other").mkdir()
    assert check(tmp_path / "data") == 1
    assert f"they are under {root}: try --root {root}" in capsys.readouterr().out


def test_data_check_too_shallow_without_annotations_names_the_folder_that_has_them(tmp_path, capsys):
    root = cirr_layout(tmp_path / "cirr_dataset", tmp_path / "cirr_dataset" / "cirr")
    assert check(tmp_path) == 2  # no annotations under tmp_path: an error, with the way out
    err = capsys.readouterr().err
    assert "cap.rc2.val.json not found" in err and err.rstrip().endswith(f"{root} has them: try --root {root}")


def test_data_check_with_images_nowhere_suggests_nothing(tmp_path, capsys):
    root = cirr_layout(tmp_path / "cirr_dataset", tmp_path / "cirr_dataset" / "cirr")
    for path in (root / "dev").iterdir():
        path.unlink()
    assert check(root) == 1
    assert "try --root" not in capsys.readouterr().out


def test_eval_with_a_root_one_level_too_deep_names_the_parent(tmp_path):
    root = cirr_layout(tmp_path / "cirr_dataset", tmp_path / "cirr_dataset" / "cirr")
    with pytest.raises(ValueError, match=f"nothing left to evaluate.*The images are under {re.escape(str(root))}"):
        eval_cli._splits("cirr", root / "cirr", "val", None)


# --- progress lines in a log, no transformers bar ------------------------------------------------


def test_progress_in_a_log_file_writes_plain_lines(tmp_path, monkeypatch):
    from cirlab.utils.progress import progress

    log = tmp_path / "log.txt"
    with log.open("w") as f:
        monkeypatch.setattr(sys, "stderr", f)
        for _ in progress(range(4), desc="encoding", mininterval=0):  # a line on each update
            pass
        bar = progress(None, desc="steps", unit="batch", mininterval=0)  # no total
        bar.update(3)
        bar.close()
        for _ in progress(range(1000), desc="quick"):  # under 30 s: the final line only
            pass
        monkeypatch.undo()
    text = log.read_text()
    assert "\r" not in text and "\x1b" not in text and "█" not in text
    lines = text.splitlines()
    assert [line.split(" [")[0] for line in lines] == [
        "encoding:  25% 1/4", "encoding:  50% 2/4", "encoding:  75% 3/4", "encoding: 100% 4/4",
        "steps: 3batch", "quick: 100% 1000/1000"]
    assert text.endswith("\n")


def test_progress_redirected_by_the_shell_writes_plain_lines(tmp_path):
    """The real thing: a process whose stderr is a file, tqdm's default 30 s interval."""
    log = tmp_path / "stderr.txt"
    code = "from cirlab.utils.progress import progress\nfor _ in progress(range(50), desc='loop'): pass\n"
    with log.open("w") as f:
        subprocess.run([sys.executable, "-c", code], stderr=f, check=True, timeout=120)
    lines = log.read_text().splitlines(keepends=True)
    assert len(lines) == 1 and lines[0].startswith("loop: 100% 50/50 [") and "\r" not in lines[0]


def test_loading_a_backbone_prints_no_loading_bar(tiny_random_blip, capfd):
    from transformers.utils import logging as hf_logging

    from cirlab.models.loading import load_backbone

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # as in a fresh process (cirlab's main() turns it off with an env var)
    try:
        capfd.readouterr()
        load_backbone(tiny_random_blip)
        err = capfd.readouterr().err
        assert "Loading weights" not in err and "\r" not in err
        assert hf_logging.is_progress_bar_enabled()  # a library user's setting is left as it was
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
