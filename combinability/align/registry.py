"""The built-in aligners, registered as a plugin like any third-party aligner.

Declared in ``pyproject.toml`` under ``[project.entry-points."combinability.plugins"]``
as ``aligners = "combinability.align.registry"``. The targets are strings, so listing
the aligners imports neither :mod:`combinability.align.builtin` nor scipy.
"""

from __future__ import annotations

from combinability.hookspecs import Registration, hookimpl

__all__ = ["BUILTIN_ALIGNERS", "combinability_register_aligners"]

#: The aligners this library ships.
BUILTIN_ALIGNERS: tuple[Registration, ...] = (
    Registration("weight", "combinability.align.builtin:weight",
                 "Git Re-Basin weight matching (permutation coordinate descent)", needs=()),
    Registration("activation", "combinability.align.builtin:activation",
                 "activation matching: correlation of the two models' activations on data", needs=("data",)),
    Registration("identity", "combinability.align.builtin:identity",
                 "no alignment: the identity permutation (naive baseline)", needs=()),
    Registration("ste", "combinability.align.ste:ste",
                 "learned matching, straight-through estimator (loss of combinations drawn by a sampler)",
                 needs=("data", "model")),
    Registration("sinkhorn", "combinability.align.sinkhorn:sinkhorn_align",
                 "Sinkhorn re-basin: soft permutations learned on the loss of combinations, then hardened",
                 needs=("data", "model")),
)


@hookimpl
def combinability_register_aligners() -> list[Registration]:
    """The built-in aligners of :mod:`combinability.align.builtin`."""
    return list(BUILTIN_ALIGNERS)
