"""The built-in aligners, registered as a plugin like any third-party aligner.

Declared in ``pyproject.toml`` under ``[project.entry-points."combinability.plugins"]``
as ``aligners = "combinability.align.registry"``. The targets are strings, so listing
the aligners imports neither :mod:`combinability.align.builtin` nor scipy.

Each declares the symmetry kinds it handles (``kinds=``, checked by
:func:`combinability.align.align` before it runs): weight matching, the identity and STE
(whose projection step is weight matching) handle every kind — block permutations of heads
and experts, orthogonal maps of a residual stream, packed axes; activation matching handles
neuron and block permutations, packed axes and orthogonal maps (read where the model's outputs
show them: :mod:`combinability.observation`), Sinkhorn neuron permutations only.
"""

from __future__ import annotations

from combinability.hookspecs import Registration, hookimpl
from combinability.plugins import SYMMETRY_KINDS, AlignerRegistration

__all__ = ["BUILTIN_ALIGNERS", "combinability_register_aligners"]

#: The aligners this library ships.
BUILTIN_ALIGNERS: tuple[Registration, ...] = (
    AlignerRegistration("weight", "combinability.align.builtin:weight",
                        "Git Re-Basin weight matching (permutation coordinate descent)", needs=(),
                        kinds=SYMMETRY_KINDS),
    AlignerRegistration("activation", "combinability.align.builtin:activation",
                        "activation matching: correlation of the two models' activations on data",
                        needs=("data",), kinds=("neuron", "packed", "blocks", "orthogonal"), reads_points=True),
    AlignerRegistration("identity", "combinability.align.builtin:identity",
                        "no alignment: the identity permutation (naive baseline)", needs=(), kinds=SYMMETRY_KINDS),
    AlignerRegistration("ste", "combinability.align.ste:ste",
                        "learned matching, straight-through estimator (loss of combinations drawn by a sampler)",
                        needs=("data", "model"), kinds=("neuron", "blocks", "orthogonal", "packed")),
    AlignerRegistration("maps", "combinability.align.maps:maps",
                        "learned continuous maps: weight matching, then its residual-stream rotations and invertible "
                        "maps inside heads trained on the loss of combinations", needs=("data", "model"),
                        kinds=SYMMETRY_KINDS, acts_on=("orthogonal", "invertible")),
    AlignerRegistration("sinkhorn", "combinability.align.sinkhorn:sinkhorn_align",
                        "Sinkhorn re-basin: soft permutations learned on the loss of combinations, then hardened",
                        needs=("data", "model"), kinds=("neuron",)),
)


@hookimpl
def combinability_register_aligners() -> list[Registration]:
    """The built-in aligners of :mod:`combinability.align.builtin`."""
    return list(BUILTIN_ALIGNERS)
