"""The core never imports a framework."""

import subprocess
import sys


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def test_import_combinability_imports_no_framework():
    out = _run("import sys, combinability; print(sorted(m for m in ('torch','jax','flax') if m in sys.modules))")
    assert out == "[]"


def test_listing_plugins_imports_no_framework():
    code = (
        "import sys, combinability as cb; b = cb.list_backends(); a = cb.list_architectures(); "
        "d = cb.list_datasets(); s = cb.list_samplers(); "
        "print(sorted(m for m in ('torch','jax','flax') if m in sys.modules), 'torch' in b, 'mlp' in a)"
    )
    assert _run(code) == "[] True True"


def test_project_files_users_look_for():
    """LICENSE (the MIT text pyproject declares), CITATION.cff citing the paper, CHANGELOG.md, py.typed."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert "MIT License" in (root / "LICENSE").read_text()
    assert 'license = { text = "MIT" }' in (root / "pyproject.toml").read_text()
    citation = (root / "CITATION.cff").read_text()
    assert "cff-version: 1.2.0" in citation
    assert "Mode Combinability: Exploring Convex Combinations of Permutation Aligned Models" in citation
    assert (root / "CHANGELOG.md").read_text().startswith("# Changelog")
    assert (root / "combinability" / "py.typed").exists()
