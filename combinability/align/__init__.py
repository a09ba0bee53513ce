"""Aligners: procedures that find the permutation re-basing one model onto another.

An aligner is a function ``aligner(task, **options) -> Permutation`` taking an
:class:`AlignTask`. The built-ins (``"weight"``, ``"activation"``, ``"identity"``, in
:mod:`combinability.align.builtin`) and those of plugins are registered through the
``combinability_register_aligners`` hook and used by name with :func:`align`. Each
declares the symmetry kinds it handles (``kinds=`` of
:class:`~combinability.plugins.AlignerRegistration`; a plain registration handles neuron
permutations only); :func:`align` refuses a spec with any other kind before it runs.

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
from combinability.errors import ConfigurationError, PermutationSpecError, PluginError
from combinability.kinds import Blocks, Dual, Invertible, Orthogonal
from combinability.permutation import Permutation, PermutationSpec, check_permutation
from combinability.plugins import SYMMETRY_KINDS, aligner_kinds, get_aligner, get_registration, list_aligners

__all__ = ["AlignTask", "Aligner", "Features", "align", "get_aligner", "list_aligners", "ALL_KINDS", "spec_kinds",
           "check_kinds", "check_aligner"]

#: The capability of an aligner that handles every symmetry kind (``kinds=ALL_KINDS`` when registering).
ALL_KINDS = frozenset(SYMMETRY_KINDS)
#: Every kind but invertible maps inside heads (what the learned and many-model aligners handle).
PERMUTING_KINDS = ALL_KINDS - {"invertible"}

_SHOWN = {"blocks": "Blocks (attention heads, experts, GroupNorm groups)",
          "orthogonal": "Orthogonal (a residual stream)",
          "packed": "packed axes (stacked query/key/value rows, concatenated channels)",
          "invertible": "Invertible (general invertible maps inside attention heads)"}


def spec_kinds(spec: PermutationSpec) -> frozenset[str]:
    """The symmetry kinds of ``spec`` (names of :data:`~combinability.plugins.SYMMETRY_KINDS`).

    Examples
    --------
    >>> from combinability.kinds import Blocks
    >>> spec = PermutationSpec({"w": (("qk", "qk", "vo"), None), "o": (None, "vo")},
    ...                        kinds={"qk": Blocks("h", 2, 3), "vo": Blocks("h", 2, 3)})
    >>> sorted(spec_kinds(spec))
    ['blocks', 'neuron', 'packed']
    """
    out = {"neuron"}
    for kind in spec.kinds.values():
        out.add("blocks" if isinstance(kind, Blocks) else "orthogonal" if isinstance(kind, Orthogonal)
                else "invertible" if isinstance(kind, Invertible | Dual) else "neuron")
    if spec.segments:
        out.add("packed")
    return frozenset(out)


def _handles(kinds: frozenset[str]) -> str:
    shown = (("blocks", "block permutations (heads, experts, GroupNorm groups)"), ("orthogonal", "orthogonal maps"),
             ("invertible", "invertible maps"))
    what = ["neuron permutations"] + [t for k, t in shown if k in kinds]
    return " and ".join(what) + " only" + (" (also on packed axes)" if "packed" in kinds else "")


def check_kinds(label: str, handles: frozenset[str], spec: PermutationSpec, *,
                alternatives: list[str] | None = None, what: str = "aligner") -> None:
    """Refuse ``spec`` when it has a symmetry kind outside ``handles``, before any work.

    Parameters
    ----------
    label : str
        The aligner's (or method's) name, for the message.
    handles : frozenset of str
        The kinds it handles (:func:`~combinability.plugins.aligner_kinds`).
    spec : PermutationSpec
    alternatives : list of str, optional
        Names that handle every kind of ``spec`` (default: the registered aligners that do, but
        the ``"identity"`` baseline).
    what : str
        ``"aligner"`` or ``"align_many method"``, for the message.

    Raises
    ------
    ConfigurationError
        Naming the aligner, the kinds of the spec, what to use instead, and
        ``symmetries="permutation"`` where a permutation of the residual stream would do.
    """
    present = spec_kinds(spec)
    if present <= handles:
        return
    if alternatives is None:
        alternatives = [n for n in list_aligners() if n != "identity" and present <= aligner_kinds(n)
                        and _has_work(n, present)]
    shown = ", ".join(_SHOWN[k] for k in SYMMETRY_KINDS if k in present and k != "neuron")
    names = [repr(a) for a in alternatives]
    joined = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    instead = f"use {joined} instead" if names else f"no installed {what} handles them"
    if "invertible" in present and spec_kinds(spec.without_invertible()) <= handles:
        instead += ", or align with symmetries='all' (permutations inside heads instead of invertible maps)"
    elif "orthogonal" in present and spec_kinds(spec.permutations_only()) <= handles:
        instead += ", or align with symmetries='permutation' (the residual stream permuted instead of rotated)"
    raise ConfigurationError(
        f"{what} {label!r} aligns {_handles(handles)}, but this model's symmetries include {shown}; {instead}")


def _has_work(name: str, present: frozenset[str]) -> bool:
    """Whether aligner ``name`` has work on a spec of the kinds ``present`` (its ``acts_on``, if any)."""
    acts_on = getattr(get_registration("aligners", name), "acts_on", ())
    return not acts_on or bool(present & set(acts_on))


def _task_kinds(name: str | Aligner, task: AlignTask) -> frozenset[str]:
    """The kinds aligner ``name`` handles on ``task``: when it reads units at feature points, without
    block permutations if one has no point or observation, nor orthogonal maps if one has no observation."""
    handles = aligner_kinds(name)
    registration = get_registration("aligners", name) if isinstance(name, str) else name
    invertible = any(isinstance(k, Invertible | Dual) for k in task.spec.kinds.values())  # refused for that alone
    if getattr(registration, "reads_points", False) and not invertible:
        if task.blocks_without_points():
            handles -= {"blocks"}
        if any(isinstance(k, Orthogonal) and p not in task.observations for p, k in task.spec.kinds.items()):
            handles -= {"orthogonal"}
    return handles


def check_aligner(name: str | Aligner, task: AlignTask) -> None:
    """Refuse aligner ``name`` on ``task`` when the spec has a symmetry kind it does not handle there
    (:func:`check_kinds`; block permutations without a feature point for one reading units at them).

    Only ``task.spec`` and ``task.feature_points`` are read: a task without parameters checks
    an aligner before any work.
    """
    label = name if isinstance(name, str) else getattr(name, "__name__", repr(name))
    present = spec_kinds(task.spec)
    alternatives = [n for n in list_aligners() if n != "identity" and present <= _task_kinds(n, task)
                    and _has_work(n, present)]
    handles = _task_kinds(name, task)
    try:
        check_kinds(label, handles, task.spec, alternatives=alternatives)
    except ConfigurationError as exc:
        if any(isinstance(k, Invertible | Dual) for k in task.spec.kinds.values()):
            raise
        unseen = [p for p in task.blocks_without_points() if "blocks" in aligner_kinds(name)]
        unseen += [p for p, k in task.spec.kinds.items() if isinstance(k, Orthogonal) and p not in task.observations
                   and "orthogonal" in aligner_kinds(name)]
        if not unseen:
            raise
        raise ConfigurationError(
            f"{exc}. It reads units in the models' activations, and no output of these models shows the units of "
            f"{', '.join(map(repr, unseen[:3]))}{' and others' if len(unseen) > 3 else ''} (experts held as modules "
            "or parameters of their own, each computing on the tokens routed to it; units computed inside a module "
            "the backend does not open; or models given without example_input)") from None


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
        One value per transformation of ``task.spec`` (an index array, or an orthogonal
        matrix for an orthogonal name); its ``method`` is the aligner's name when the
        aligner left it empty.

    Raises
    ------
    UnknownNameError
        If no aligner is registered as ``name``; the message lists the installed ones.
    ConfigurationError
        If the spec has a symmetry kind (block permutations, orthogonal maps, packed axes)
        that the aligner does not declare it handles (:class:`~combinability.plugins.AlignerRegistration`),
        or block permutations with no feature point for an aligner that reads them there;
        checked before the aligner runs.
    PluginError
        If the aligner returns something other than a :class:`Permutation` of the spec's
        permutations and sizes; the message names the aligner.
    """
    sizes = task.sizes()
    aligner = get_aligner(name)
    label = name if isinstance(name, str) else getattr(name, "__name__", repr(name))
    check_aligner(name, task)
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
