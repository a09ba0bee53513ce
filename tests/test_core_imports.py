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
