"""Build-time helpers of the docs site (mkdocs.yml names this file twice: as an MkDocs hook and as a
griffe extension of mkdocstrings).

- The README is the home page: it is added as ``index.md`` with its ``docs/...`` links made relative
  to the site; a link to a repository file outside docs/ becomes the file's path in code (the site
  has no copy of it); a link to a file that does not exist is left for ``--strict`` to report.
- Docstrings use reST roles (``:class:`Composer```, ``:meth:`~x.y```): they become code, linked
  when the target is on a page of the site; a reST ``text::`` before a literal block loses a colon.
- A method that overrides a documented one without a docstring of its own shows the inherited one.
- Every public module, class, function and property that an API page renders (``::: name``
  directives in docs/api/) must have a docstring: one without is a warning, so ``--strict`` fails.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import griffe
import yaml

log = logging.getLogger("mkdocs.hooks.cirlab")

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"(?P<bang>!?)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?P<title>\s+\"[^\"]*\")?\)")
LITERAL = re.compile(r"(\S) ?::$", re.MULTILINE)
ROLE = re.compile(r":(?:py:)?(?:meth|func|class|mod|data|attr|exc|obj|const):`(?P<tilde>~?)(?P<name>[^`]+)`")


# -- the README as the home page ----------------------------------------------------------------------
def _site_link(match: re.Match) -> str:
    target = match["target"]
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):  # a URL, mailto:, an anchor
        return match[0]
    path, _, anchor = target.partition("#")
    if path.startswith("docs/") and (ROOT / path).is_dir() and not (ROOT / path / "index.md").is_file():
        return f"{match['text']} (`{path}`)"  # a folder of files (figures): no page of the site
    if path.startswith("docs/"):
        new = path.removeprefix("docs/") or "./"
        return f"{match['bang']}[{match['text']}]({new}{'#' + anchor if anchor else ''}{match['title'] or ''})"
    if (ROOT / path).exists() and not match["bang"]:
        text = match["text"]
        plain = text.strip("`")
        return f"`{path}`" if plain in (path, path.rstrip("/"), Path(path).name) else f"{text} (`{path}`)"
    return match[0]  # a missing file: --strict reports it


def readme_as_home(markdown: str) -> str:
    """The README's text with its links pointing where the site has them."""
    out, fenced = [], False
    for line in markdown.splitlines(keepends=True):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        out.append(line if fenced else LINK.sub(_site_link, line))
    return "".join(out)


def on_files(files, config, **kwargs):
    from mkdocs.structure.files import File

    if files.get_file_from_path("index.md") is None:
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        files.append(File.generated(config, "index.md", content=readme_as_home(readme)))
    return files


# -- docstrings: reST roles, inherited docstrings -----------------------------------------------------
def _role(obj: griffe.Object, match: re.Match) -> str:
    name = match["name"].strip()
    shown = name.rsplit(".", 1)[-1] if match["tilde"] else name
    full = name
    scope = obj if obj.is_class or obj.is_module else obj.parent
    try:  # a name relative to the docstring's scope (a method, a class of the module, an import)
        full = scope.resolve(name.split(".", 1)[0]) + ("." + name.split(".", 1)[1] if "." in name else "")
    except Exception:  # noqa: BLE001 - an unresolvable name stays as written
        pass
    return f'<autoref identifier="{full}" optional><code>{shown}</code></autoref>'


class CirlabDocstrings(griffe.Extension):
    """reST roles in docstrings as (optionally linked) code; overriding methods inherit docstrings.
    Both once the package is loaded, when every name of it can be resolved."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        objects = list(_objects(pkg))
        for obj in objects:
            if obj.docstring is not None and ":" in obj.docstring.value:
                value = ROLE.sub(lambda m, obj=obj: _role(obj, m), obj.docstring.value)
                obj.docstring.value = LITERAL.sub(r"\1:", value)  # reST "layout::" + indented block
        for cls in (o for o in objects if o.is_class):
            for name, member in cls.members.items():
                if member.is_alias or member.docstring is not None:
                    continue
                for base in _mro(cls):
                    inherited = base.members.get(name)
                    if inherited is not None and not inherited.is_alias and inherited.docstring is not None:
                        member.docstring = griffe.Docstring(inherited.docstring.value, parent=member)
                        break


def _objects(obj: griffe.Object):
    """``obj`` and every object defined in it (imports left out), depth first."""
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)


def _mro(cls: griffe.Class) -> list[griffe.Class]:
    try:
        return list(cls.mro())
    except Exception:  # noqa: BLE001 - a base outside the package (torch.nn.Module, ABC)
        return []


# -- every rendered public API member has a docstring -------------------------------------------------
_loader: griffe.GriffeLoader | None = None
DIRECTIVE = re.compile(r"^::: *(?P<name>[\w.]+) *\n(?P<options>(?:[ \t]+.*\n?)*)", re.MULTILINE)


def on_pre_build(config, **kwargs):
    global _loader
    _loader = None  # `mkdocs serve` rebuilds after an edit: read the sources again


def _load(name: str) -> griffe.Object:
    global _loader
    if _loader is None:
        _loader = griffe.GriffeLoader(search_paths=[str(ROOT / "src")],
                                      extensions=griffe.load_extensions(CirlabDocstrings))
    package = name.split(".", 1)[0]
    if package not in _loader.modules_collection:
        _loader.load(package)
        _loader.resolve_aliases(implicit=False, external=False)
    return _loader.modules_collection[name]


def undocumented(obj: griffe.Object, members: list[str] | None = None) -> list[str]:
    """The paths of the public objects under ``obj`` (as mkdocstrings renders them with
    ``filters: ["!^_"]``) that have no docstring: modules, classes, functions and properties."""
    if obj.is_alias:
        obj = obj.final_target
    missing = [] if obj.docstring is not None or obj.is_attribute and "property" not in obj.labels else [obj.path]
    if not (obj.is_module or obj.is_class):
        return missing
    for name, member in obj.members.items():
        if members is not None and name not in members:
            continue
        if members is None and (name.startswith("_") or member.is_alias):  # imports are not rendered
            continue
        if member.is_attribute and "property" not in member.labels:
            continue
        missing += undocumented(member)
    return missing


def on_page_markdown(markdown: str, page, config, files, **kwargs):
    for match in DIRECTIVE.finditer(markdown):
        options = (yaml.safe_load(match["options"]) or {}).get("options", {}) if match["options"].strip() else {}
        try:
            obj = _load(match["name"])
        except (KeyError, griffe.AliasResolutionError, ImportError):
            continue  # mkdocstrings reports it
        missing = undocumented(obj, options.get("members"))
        for path in missing:
            log.warning(f"{page.file.src_path}: {path} has no docstring (say what it is for, in a line)")
    return markdown
