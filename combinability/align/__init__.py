"""Aligners: procedures that find the permutation re-basing one model onto another.

An aligner is a function ``aligner(task, **options) -> Permutation`` taking an
:class:`AlignTask`. The built-ins (``"weight"``, ``"activation"``, ``"identity"``, in
:mod:`combinability.align.builtin`) and those of plugins are registered through the
``combinability_register_aligners`` hook and used by name with :func:`align`.

Example
-------
>>> import numpy as np
>>> from combinability import PermutationSpec
>>> from combinability.align import AlignTask, align
>>> spec = PermutationSpec({"w1": ("P", None), "w2": (None, "P")})
>>> rng = np.random.default_rng(0)
>>> a = {"w1": rng.normal(size=(4, 3)), "w2": rng.normal(size=(2, 4))}
>>> b = {"w1": a["w1"][[2, 0, 3, 1]], "w2": a["w2"][:, [2, 0, 3, 1]]}
>>> align("weight", AlignTask(spec, a, b))["P"].tolist()
[1, 3, 0, 2]
"""

from __future__ import annotations

from typing import Any

from combinability.align.base import Aligner, AlignTask, Features
from combinability.errors import PermutationSpecError, PluginError
from combinability.permutation import Permutation, check_permutation
from combinability.plugins import get_aligner, list_aligners

__all__ = ["AlignTask", "Aligner", "Features", "align", "get_aligner", "list_aligners", "ALL_KINDS"]

#: Aligners that handle every symmetry kind (block permutations, orthogonal maps, packed axes).
ALL_KINDS = frozenset({"weight", "identity"})


def align(name: str | Aligner, task: AlignTask, **options: Any) -> Permutation:
    """Run the aligner ``name`` on ``task`` and check what it returns.

    Parameters
    ----------
    name : str or callable
        A registered aligner name (see :func:`list_aligners`) or an aligner itself.
    task : AlignTask
    **options
        Passed to the aligner (e.g. ``restarts=2`` for ``"weight"``); aligners ignore
        options they do not know.

    Returns
    -------
    Permutation
        One index array per permutation of ``task.spec``; its ``method`` is the aligner's
        name when the aligner left it empty.

    Raises
    ------
    UnknownNameError
        If no aligner is registered as ``name``; the message lists the installed ones.
    PluginError
        If the aligner returns something other than a :class:`Permutation` of the spec's
        permutations and sizes; the message names the aligner.
    """
    sizes = task.sizes()
    aligner = get_aligner(name)
    label = name if isinstance(name, str) else getattr(name, "__name__", repr(name))
    if not task.spec.is_plain and label not in ALL_KINDS:
        from combinability.errors import ConfigurationError

        kinds = sorted({type(k).__name__ for k in task.spec.kinds.values()} | ({"packed axes"} if task.spec.segments
                                                                               else set()))
        raise ConfigurationError(
            f"aligner {label!r} aligns neuron permutations only, but this model's symmetries include "
            f"{', '.join(kinds)} (attention heads, experts, a residual stream); use one of {sorted(ALL_KINDS)}")
    perm = aligner(task, **options)
    if not isinstance(perm, Permutation):
        raise PluginError(f"aligner {label!r} returned {type(perm).__name__}, not a combinability.Permutation")
    try:
        check_permutation(perm, sizes, task.spec)
    except PermutationSpecError as exc:
        raise PluginError(f"aligner {label!r} returned an invalid permutation: {exc}") from exc
    if not perm.method:
        perm.method = label
    return perm
