"""The documentation's code runs, and every ``combinability`` name it mentions exists.

* Every ```` ```python ```` block of ``README.md`` and ``docs/**/*.md`` is executed, page by
  page in one namespace (like a notebook), in a temporary working directory. Not run: blocks
  preceded by ``<!-- skip-test -->`` (signatures, examples that need CIFAR-10 or a GPU) and
  blocks that include a file with ``--8<--`` (the example plugin's sources, tested by
  ``test_plugin_example.py``). To keep the suite fast, the examples run exactly as written
  except that (1) every dataset split is cut to its first :data:`EXAMPLES` examples and
  (2) ``cb.train`` reuses the checkpoint of an identical model trained by another page (the
  library's own ``checkpoint=`` mechanism).
* Every dotted name the docs mention (``combinability.x.y``, ``cb.x``, ``ex.x`` for the
  experiments, ``plots.x``) must resolve, so that a renamed function cannot leave the docs
  silently wrong.

The strict mkdocs build (broken links, bad docstrings) is part of ``make test``.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "examples" not in p.relative_to(DOCS).parts)
EXAMPLES = 300
BLOCK = re.compile(r"(<!--\s*skip-test\s*-->\s*\n)?^```python\n(.*?)^```", re.S | re.M)


def _blocks(path: Path) -> list[str]:
    """The page's python blocks to run: not marked skip-test, not a snippet include (``--8<--``)."""
    return [code for skip, code in BLOCK.findall(path.read_text()) if not skip and "--8<--" not in code]


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


RUNNABLE = [p for p in [ROOT / "README.md", *PAGES] if _blocks(p)]


def _user_guide_results(folder: Path) -> None:
    """What the user guide reads from ``results/demo``: a small sweep written by the library."""
    import combinability as cb
    from combinability import experiments as ex

    a, b = (cb.train("mlp", "digits", seed=s, epochs=5) for s in (0, 1))
    pair = cb.ModelPair(a, b).align("weight", seed=0)
    ex.hypercube(pair, samplers=(cb.Uniform(),), out_dir=folder, data="digits", samples=1)


#: What a page assumes exists: files the docs tell the reader to produce first (e.g. with
#: ``make demo``), or variables the text describes. Each returns extra names for the namespace.
SETUP = {"user-guide.md": _user_guide_results}


@pytest.fixture
def docs_env(tmp_path, monkeypatch, tmp_path_factory):
    """A temporary working directory, small datasets and a shared cache of trained models."""
    import combinability.models as models
    from combinability.data.registry import DatasetSpec

    cache = tmp_path_factory.getbasetemp() / "docs-models"
    cache.mkdir(exist_ok=True)
    original_train = models.train
    original_load = DatasetSpec.load

    def cached_train(architecture, data, **kwargs):
        if kwargs.get("checkpoint") is None and kwargs.get("recipe") is None and isinstance(data, str):
            key = repr((architecture, data, sorted(kwargs.items())))
            kwargs["checkpoint"] = cache / f"{hashlib.sha1(key.encode()).hexdigest()}.ckpt"
        return original_train(architecture, data, **kwargs)

    def small_load(self, split, root=None, *, limit=None, download=False):
        limit = EXAMPLES if limit is None else min(limit, EXAMPLES)
        return original_load(self, split, root, limit=limit, download=download)

    import combinability as cb

    monkeypatch.setattr(models, "train", cached_train)
    monkeypatch.setitem(cb.__dict__, "train", cached_train)
    for module in ("combinability.experiments.width",):
        monkeypatch.setattr(importlib.import_module(module), "train", cached_train)
    monkeypatch.setattr(DatasetSpec, "load", small_load)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    from combinability.samplers import SAMPLERS

    samplers = dict(SAMPLERS)
    yield tmp_path
    # pages register plugins and samplers: leave the process as it was for the other tests
    SAMPLERS.clear()
    SAMPLERS.update(samplers)
    cb.plugins.reset_plugins()


def _example_plugin_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.value == "combinability_example_plugin.plugin" for ep in entry_points(group="combinability.plugins"))


#: Pages whose examples need something ``make test`` installs.
REQUIRES = {"plugins.md": (_example_plugin_installed, "docs/examples/combinability_example_plugin not installed")}


@pytest.mark.parametrize("path", RUNNABLE, ids=_id)
def test_code_blocks_run(path, docs_env):
    check, reason = REQUIRES.get(path.name, (lambda: True, ""))
    if not check():
        pytest.skip(reason)
    namespace: dict = {"__name__": "__docs__"}
    setup = SETUP.get(path.name)
    if setup is not None:
        namespace.update(setup(docs_env / "results" / "demo") or {})
    for i, code in enumerate(_blocks(path)):
        try:
            exec(compile(code, f"{_id(path)} [block {i + 1}]", "exec", dont_inherit=True), namespace)
        except Exception as exc:  # name the block in the failure
            raise AssertionError(f"{_id(path)}, python block {i + 1} failed: {type(exc).__name__}: {exc}\n"
                                 f"{code}") from exc


#: Prefixes the docs use for the library's namespaces.
ALIASES = {"combinability": "combinability", "cb": "combinability", "ex": "combinability.experiments",
           "plots": "combinability.plots"}
NAME = re.compile(r"(?<![\w/.-])(combinability|cb|ex|plots)((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
FILE_SUFFIXES = ("nc", "png", "ckpt", "md", "py", "toml", "yml", "txt")


def _resolve(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("path", [ROOT / "README.md", *PAGES], ids=_id)
def test_mentioned_names_exist(path):
    missing = set()
    for match in NAME.finditer(path.read_text()):
        if path.read_text()[match.end():match.end() + 1] in "-/":
            continue  # a path or a package name, not a Python name
        tail = match.group(2).split(".")[1:]
        if tail[-1] in FILE_SUFFIXES:
            continue  # a file name such as subcube.nc
        dotted = ".".join([ALIASES[match.group(1)], *tail])
        if not _resolve(dotted):
            missing.add(match.group(0))
    assert not missing, f"{_id(path)} mentions names that do not exist: {sorted(missing)}"


def test_docs_config_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    """``mkdocs build -f /path/to/mkdocs.yml`` from any folder: every path it names is found."""
    import os

    from mkdocs.config import load_config

    monkeypatch.chdir(tmp_path)
    config = load_config(str(ROOT / "mkdocs.yml"))
    bases = [Path(os.fspath(p)).resolve() for p in config["mdx_configs"]["pymdownx.snippets"]["base_path"]]
    assert bases == [ROOT]
    includes = [m.group(1) for page in PAGES for m in re.finditer(r'--8<--\s*"([^"]+)"', page.read_text())]
    assert includes and all((ROOT / name).is_file() for name in includes)
    # mkdocstrings reads its paths and extensions relative to the config file
    options = config["plugins"]["mkdocstrings"].config["handlers"]["python"]
    assert all((ROOT / p).is_dir() for p in options["paths"])
    assert all((ROOT / ext.split(":")[0]).is_file() for ext in options["options"]["extensions"])


def test_reproduction_report_gives_loss_and_accuracy_verdicts_and_names_machine_specific_numbers():
    """Issue 10, item 14: every claim has a verdict for the loss and one for the accuracy, and the report says
    which numbers depend on the machine."""
    text = (DOCS / "reproduction.md").read_text(encoding="utf-8")
    assert "## Which numbers are machine-specific" in text
    section = text.split("## Which numbers are machine-specific", 1)[1].split("\n## ", 1)[0]
    assert "bitwise" in section and "CPU" in section and "GPU" in section
    table = text.split("## Summary", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header[-2:] == ["verdict: loss", "verdict: accuracy"]
    claims = [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]
    assert len(claims) >= 15
    for cells in claims:
        assert len(cells) == len(header) and cells[-1] and cells[-2], cells[0]
    extrapolation = next(c for c in claims if c[0].startswith("aligned pairs degrade more slowly"))
    assert "acc" in extrapolation[2] and "does not hold" in extrapolation[-1]
