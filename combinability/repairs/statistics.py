"""What both normalisation repairs need: the data on the device, exact channel statistics, vectors.

Framework-free helpers of :mod:`combinability.repairs.batchnorm` (``reset`` and REPAIR):
the repair data checked and kept on the device, one prepared model per sweep, exact
per-channel moments of feature points (:func:`channel_moments`), BatchNorm nodes grouped into
passes that do not depend on each other, and flat vectors rebuilt without in-place writes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from combinability.data.base import input_dtype
from combinability.errors import ConfigurationError, DatasetError, LayoutError

if TYPE_CHECKING:
    from combinability.layers import LayerTable, Node
    from combinability.repairs import RepairContext

__all__ = ["channel_moments"]

_KEY = "combinability.repairs.batchnorm"


# -- what every repair here needs: table, data, prepared model ---------------------------------
def _table(ctx: RepairContext, what: str) -> LayerTable:
    if ctx.table is None:
        names = list(getattr(ctx.layout, "names", ()) or ())
        statistics = [n for n in names if n.endswith(("running_mean", "running_var", "/mean", "/var"))]
        if names and not statistics and what == "reset":  # a transformer traced by its feature spaces
            raise ConfigurationError(
                "repair='reset' recomputes BatchNorm running statistics, and these models hold none: their norms "
                "(LayerNorm, RMSNorm, GroupNorm) normalise each example by its own statistics, so there is nothing "
                "to reset; sweep them without repair=")
        raise ConfigurationError(f"repair={what!r} needs the models' layer table to find their normalisation layers; "
                                 "these models have none: use library-built models (cb.train, cb.build_model) or "
                                 "models traced into a layer table")
    return ctx.table


def _host_inputs(data: Any) -> np.ndarray | Any:
    """The inputs of ``repair_data``: an ArrayDataset's ``x``, the first of ``(x, y)``, or the array."""
    if hasattr(data, "x"):
        return data.x
    if isinstance(data, tuple | list):
        return data[0]
    return data


def _check_data(ctx: RepairContext, what: str, table: LayerTable) -> None:
    if ctx.data is None:
        raise ConfigurationError(f"repair={what!r} computes statistics on data: pass repair_data= to the sweep "
                                 "(a dataset name, whose training split is used, or (x, y) arrays)")
    x = _host_inputs(ctx.data)
    shape = tuple(int(s) for s in getattr(x, "shape", ()))
    if len(shape) < 2 or shape[1:] != tuple(table.data_shape):
        raise DatasetError(f"repair_data has inputs of shape {shape[1:] if shape else shape} per example, but the "
                           f"models take {tuple(table.data_shape)}: pass repair data of the models' input shape")
    if shape[0] == 0:
        raise DatasetError("repair_data is empty: pass at least one example (a few thousand are usual)")


def _prepared(ctx: RepairContext) -> Any:
    """The backend's prepared model of the context's template and layout, cached per sweep."""
    prepared = ctx.cache.get((_KEY, "prepared"))
    if prepared is None:
        prepared = ctx.cache[(_KEY, "prepared")] = ctx.backend.prepare(ctx.template, ctx.layout)
    return prepared


def _device_inputs(ctx: RepairContext) -> Any:
    """The repair data's inputs on the device (float32, or int64 token ids), cached."""
    if hasattr(ctx.data, "x") and hasattr(ctx.data, "y"):
        from combinability.evaluation import device_data

        return device_data(ctx.backend)(ctx.data)[0]
    key = (_KEY, "inputs", id(ctx.data))
    if key not in ctx.cache:
        inputs = _host_inputs(ctx.data)
        ctx.cache[key] = ctx.backend.asarray(np.ascontiguousarray(inputs, dtype=input_dtype(inputs)))
    return ctx.cache[key]


def _check_entries(ctx: RepairContext, names: Sequence[str], what: str) -> None:
    missing = [n for n in names if n not in ctx.layout]
    if missing:
        raise LayoutError(f"repair={what!r} rewrites {missing[:6]}, which the flat vectors leave out")


# -- statistics ------------------------------------------------------------------------------------
def channel_moments(ctx: RepairContext, theta: Any, points: Sequence[str], *, batch_size: int = 500,
                    taps: Sequence[str] | None = None) -> dict[str, tuple[Any, Any, int]]:
    """Exact per-channel mean and (biased) variance of feature points over all of ``ctx.data``.

    One pass over the data in batches of ``batch_size``, all ``points`` at once; a channel's
    statistics run over examples and positions (axes ``0, 2, 3, ...`` of a channels-first
    output). Batches are merged with Chan et al.'s pairwise update of (mean, sum of squared
    deviations), so float32 accumulates without the cancellation of ``E[x²] − E[x]²``.

    Parameters
    ----------
    ctx : RepairContext
    theta : device array ``(d,)``
    points : sequence of str
        Node names, or ``"<input>"`` for the network's input.
    batch_size : int
    taps : sequence of str, optional
        The points asked of the backend, a superset of ``points`` (default: ``points``).
        Asking for the same ones on every call lets a compiling backend (jax) compile once.

    Returns
    -------
    dict
        ``{point: (mean, variance, count)}``: device arrays ``(channels,)`` and the number
        of values per channel.
    """
    xp = ctx.backend.xp()
    prepared = _prepared(ctx)
    x = _device_inputs(ctx)
    taps = list(dict.fromkeys(p for p in (points if taps is None else taps) if p != "<input>"))
    acc: dict[str, tuple[Any, Any, int]] = {}
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size, ...]
        feats = dict(prepared.features(theta, xb, taps)) if taps else {}
        feats["<input>"] = xb
        for p in dict.fromkeys(points):
            f = feats[p]
            axes = (0, *range(2, f.ndim))
            m = int(f.shape[0]) * math.prod(int(s) for s in f.shape[2:])
            mean_b = xp.mean(f, axis=axes)
            dev = f - xp.reshape(mean_b, (1, -1) + (1,) * (f.ndim - 2))
            m2_b = xp.sum(dev * dev, axis=axes)
            if p not in acc:
                acc[p] = (mean_b, m2_b, m)
                continue
            mean, m2, n = acc[p]
            delta = mean_b - mean
            total = n + m
            acc[p] = (mean + delta * (m / total), m2 + m2_b + delta * delta * (n * m / total), total)
    return {p: (mean, m2 / n, n) for p, (mean, m2, n) in acc.items()}


def _sources(table: LayerTable) -> dict[str, tuple[str, ...]]:
    """``{node name: names it reads}`` (``table.inputs_of`` of every node, in one pass)."""
    out: dict[str, tuple[str, ...]] = {}
    previous = "<input>"
    for node in table.nodes:
        out[node.name] = node.inputs or (previous,)
        previous = node.name
    return out


def _waves(table: LayerTable, nodes: Sequence[Node]) -> list[list[Node]]:
    """``nodes`` (norms, forward order) grouped so that none depends on another of its group or a later one.

    A norm depends on the norms of ``nodes`` upstream of its input; each group (one pass
    over the data) holds the norms whose dependencies are all in earlier groups.
    """
    chosen = {n.name for n in nodes}
    sources = _sources(table)
    upstream: dict[str, frozenset[str]] = {"<input>": frozenset()}
    for node in table.nodes:
        ups: set[str] = set()
        for src in sources[node.name]:
            ups |= upstream[src] | ({src} if src in chosen else set())
        upstream[node.name] = frozenset(ups)
    waves: list[list[Node]] = []
    done: set[str] = set()
    pending = list(nodes)
    while pending:
        wave = [n for n in pending if upstream[n.name] <= done]
        waves.append(wave)
        done |= {n.name for n in wave}
        pending = [n for n in pending if n.name not in done]
    return waves


def _replace(xp: Any, theta: Any, layout: Any, new: Mapping[str, Any]) -> Any:
    """``theta`` with the named arrays of ``new`` put in, built by concatenation (no in-place write)."""
    parts, pos = [], 0
    for name in sorted(new, key=lambda k: layout[k].offset):
        entry = layout[name]
        if entry.offset > pos:
            parts.append(theta[pos : entry.offset])
        parts.append(xp.astype(xp.reshape(new[name], (-1,)), theta.dtype))
        pos = entry.stop
    if pos < theta.shape[0]:
        parts.append(theta[pos:])
    return xp.concat(parts)


def _vector(ctx: RepairContext, theta: Any) -> Any:
    theta = ctx.backend.asarray(theta, np.dtype(ctx.layout.dtype))
    if tuple(theta.shape) != (ctx.layout.size,):
        raise LayoutError(f"the combined vector has shape {tuple(theta.shape)}; the layout expects "
                          f"({ctx.layout.size},)")
    return theta


def _batchnorms(table: LayerTable) -> list[Node]:
    return [n for n in table.norm_nodes() if n.norm == "batchnorm"]


def _reset_stats(node: Node, mean: Any, var: Any, count: int, table: LayerTable) -> dict[str, Any]:
    """Running statistics of one BatchNorm: the exact mean, and the variance as the model's framework keeps it:
    unbiased (torch's convention, which the library's own models follow on every backend), or the biased
    variance ``var`` itself for a user's flax model (flax's ``BatchNorm`` keeps the batch's biased variance)."""
    kept = var if table.config.get("framework") == "flax" else var * (count / max(count - 1, 1))
    return {f"{node.name}.running_mean": mean, f"{node.name}.running_var": kept}
