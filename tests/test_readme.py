"""The README's shell blocks are commands a user copies: each must be one they can run.

* every ``cirlab <subcommand> ...`` line of a ```bash block parses with cirlab's own parser (nothing runs);
* every ``configs/...`` path the README names exists (``configs`` is the shipped configs' folder);
* every ``make`` target it names is a target of the Makefile;
* after ``make demo`` (``runs/demo`` present; skipped otherwise): the queries it shows are real triplets of
  the demo's test split, and its ``cirlab index build`` + ``cirlab search`` example, run as written (the
  index and the picture go to a temporary folder), ranks the triplet's target in the top 5.

The search example runs in this process with the user's feature cache (as typing the README's commands
would): after ``make demo`` the gallery's features are cached and both commands take a few seconds; with
a cold cache the index build encodes the 4,800 small images, about a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest

from cirlab.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEMO = ROOT / "runs" / "demo"
DEMO_CAPTIONS = DEMO / "shapes" / "captions" / "cap.shapes.test.json"
# read at import, before conftest's session fixture points CIRLAB_CACHE at a temporary folder
USER_CACHE = os.environ.get("CIRLAB_CACHE")


def bash_commands(text: str) -> list[list[str]]:
    """Each command line of the ```bash blocks, split as the shell would (comments dropped)."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append(argv)
    return commands


COMMANDS = bash_commands(README.read_text(encoding="utf-8"))
CIRLAB = [argv for argv in COMMANDS if argv[0] == "cirlab"]


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_readme_has_commands():
    assert CIRLAB, "no cirlab command in the README's bash blocks"
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 150


@pytest.mark.parametrize("argv", CIRLAB, ids=[" ".join(a[:3]) for a in CIRLAB])
def test_cirlab_command_parses(argv):
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv[1:])
    except SystemExit as e:  # argparse reports the error on stderr and exits 2
        pytest.fail(f"`{shlex.join(argv)}` does not parse (exit {e.code})")
    # only a pass-through command (cirlab import) takes arguments its parser does not know
    assert not extra or hasattr(args, "argv"), f"`{shlex.join(argv)}`: unrecognized {extra}"


def test_config_paths_exist():
    paths = set(re.findall(r"(?<![\w/])configs/[\w./-]*[\w/]", README.read_text(encoding="utf-8")))
    assert paths, "the README names no config"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"the README names configs that do not exist: {missing}"


def test_make_targets_exist():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    named = {argv[1] for argv in COMMANDS if argv[0] == "make" and len(argv) > 1}
    assert named and named <= targets, f"make targets not in the Makefile: {sorted(named - targets)}"


def demo_triplets() -> dict[tuple[str, str], dict]:
    records = json.loads(DEMO_CAPTIONS.read_text())
    return {(r["reference"], r["caption"]): r for r in records}


needs_demo = pytest.mark.skipif(not (DEMO_CAPTIONS.is_file() and (DEMO / "bi-text" / "model").is_dir()),
                                reason="runs/demo is absent (run `make demo`)")


@needs_demo
def test_readme_queries_are_demo_triplets():
    """Every (reference id, text) the README queries with, in the shell and in Python, is a triplet of the
    demo's test split: a text the benchmark asks, with a target in the gallery."""
    text = README.read_text(encoding="utf-8")
    shown = [(option(a, "--id"), option(a, "--text")) for a in CIRLAB if a[1] == "search" and "--id" in a]
    python = "\n".join(re.findall(r"^```python\n(.*?)^```", text, re.S | re.M))
    compile(python, "README.md", "exec")
    caption = re.search(r'^text = "([^"]+)"', python, re.M)
    shown += [(ref, caption[1]) for ref in re.findall(r'id="([^"]+)"', python)] if caption else []
    assert len(shown) >= 2, shown
    triplets = demo_triplets()
    unknown = [q for q in shown if q not in triplets]
    assert not unknown, f"not queries of the demo's test split: {unknown}"


@needs_demo
def test_search_example_ranks_its_target(tmp_path, monkeypatch, capsys):
    search = next(a for a in CIRLAB if a[1] == "search" and "--id" in a)
    index = option(search, "--index")
    build = next(a for a in CIRLAB if a[1:3] == ["index", "build"] and option(a, "--out") == index)
    target = demo_triplets()[option(search, "--id"), option(search, "--text")]
    hits_ok = {target["target_hard"], *target.get("target_soft", {})}
    monkeypatch.chdir(ROOT)  # the README's paths are relative to the clone
    if USER_CACHE:
        monkeypatch.setenv("CIRLAB_CACHE", USER_CACHE)
    else:
        monkeypatch.delenv("CIRLAB_CACHE", raising=False)

    def run(argv: list[str]) -> str:  # in this process: one start-up instead of two
        capsys.readouterr()
        code = main(argv[1:])
        out, err = capsys.readouterr()
        assert code == 0, f"`{shlex.join(argv)}` failed ({code}):\n{err[-2000:]}"
        return out

    def replace(argv: list[str], name: str, value: str) -> list[str]:
        argv = list(argv)
        argv[argv.index(name) + 1] = value
        return argv

    run(replace(build, "--out", str(tmp_path / "index")))
    query = replace(search, "--index", str(tmp_path / "index"))
    if "--grid" in query:
        query = replace(query, "--grid", str(tmp_path / "grid.png"))
    out = run(query + ["--json"])
    hits = json.loads(next(line for line in out.splitlines() if line.startswith("[")))
    ids = [h["id"] for h in hits]
    assert option(search, "--id") not in ids, "the reference is not left out"
    assert hits_ok & set(ids[:5]), f"target {target['target_hard']} not in the top 5: {ids}"
    if "--grid" in query:
        assert (tmp_path / "grid.png").is_file()
