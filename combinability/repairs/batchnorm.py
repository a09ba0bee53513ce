"""BatchNorm reset and REPAIR: re-normalise a combined model on data, on the device.

Two built-in repairs (registered by :mod:`combinability.repairs.registry`), each a small
frozen object with ``__call__(theta, context) -> theta`` and ``validate(context)``:

``reset`` (:class:`Reset`)
    Recompute the BatchNorm running statistics of the combined vector on the repair data.
``repair`` (:class:`Renormalize`)
    REPAIR (Jordan et al., "REPAIR: REnormalizing Permuted Activations for Interpolation
    Repair", ICLR 2023): give every channel of every normalisation layer's output the mean
    and standard deviation interpolated from the end models', by rescaling the layer's
    affine weight and bias.

Everything runs in the core with the array API on the backend's device: the only
framework call is the backend's feature tap (:meth:`~combinability.backend.Prepared.features`).
Vectors are rebuilt by concatenating layout segments (no in-place writes), so the same
code runs on torch and jax arrays. See ``docs/repairs.md`` for the choices made.

Examples
--------
>>> import combinability as cb  # doctest: +SKIP
>>> ds = cb.sweep(pair, cb.Linear(), data="digits", repair="repair", repair_data="digits")  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from combinability.errors import ConfigurationError, LayoutError
from combinability.repairs.statistics import (
    _KEY,
    _batchnorms,
    _check_data,
    _check_entries,
    _replace,
    _reset_stats,
    _sources,
    _table,
    _vector,
    _waves,
    channel_moments,
)

if TYPE_CHECKING:
    from combinability.layers import Node
    from combinability.repairs import RepairContext

__all__ = ["Reset", "Renormalize", "reset", "repair", "channel_moments", "channel_weights", "repair_sites"]

#: Floor of the combined model's per-channel variance in REPAIR's ratio ``σ_t / σ_c``.
_VAR_FLOOR = 1e-12


# -- reset ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reset:
    """Recompute the BatchNorm running statistics of a combined vector on ``repair_data``.

    For each BatchNorm node in forward order, the node's *input* features are computed over
    all of the repair data (in batches of ``batch_size``), with the vector whose earlier
    BatchNorms are already reset, and its ``running_mean`` / ``running_var`` become the
    exact mean and the **unbiased** variance of each channel (torch's convention for the
    buffer, which evaluation reads as it is; a user's flax model keeps the biased variance, as
    flax's ``BatchNorm`` does). While a later BatchNorm is measured, the
    earlier ones normalise with the *biased* variance, as they do in torch's training-mode
    pass. Nodes that do not depend on one another are measured in the same pass.

    This equals the usual "reset the running statistics with ``momentum=None`` and run the
    training-mode model over the data" up to using exact statistics over all of the data
    rather than an average of per-batch statistics (with the data in one batch the two are
    the same). The integer ``num_batches_tracked`` counter is not part of flat vectors and
    is left as it is.

    Parameters
    ----------
    batch_size : int
        Examples per forward pass.
    """

    batch_size: int = 500
    name: str = "reset"

    def validate(self, ctx: RepairContext) -> None:
        """Check the model and the repair data before any combination is evaluated.

        Raises
        ------
        ConfigurationError
            If the model has no BatchNorm (or no layer table), or no repair data is given.
        DatasetError
            If the repair data's inputs do not have the models' input shape.
        """
        table = _table(ctx, self.name)
        nodes = _batchnorms(table)
        if not nodes:
            kinds = sorted({n.norm for n in table.norm_nodes()})
            has = f"its norm layers are {', '.join(kinds)}" if kinds else "it has no normalisation layers"
            raise ConfigurationError(f"repair='reset' recomputes BatchNorm statistics, but the {table.name!r} model "
                                     f"has no BatchNorm ({has}); repair='repair' (REPAIR) works with LayerNorm and "
                                     "GroupNorm too, and on the hidden layers of networks without norms")
        _check_data(ctx, self.name, table)
        _check_entries(ctx, [k for n in nodes for k in (f"{n.name}.running_mean", f"{n.name}.running_var")],
                       self.name)

    def __call__(self, theta: Any, ctx: RepairContext) -> Any:
        """The combined vector ``theta`` (device array ``(d,)``) with reset BatchNorm statistics."""
        self.validate(ctx)
        xp = ctx.backend.xp()
        theta = _vector(ctx, theta)
        table = ctx.table
        stored: dict[str, Any] = {}
        nodes = _batchnorms(table)
        source = {name: inputs[0] for name, inputs in _sources(table).items()}
        taps = [source[n.name] for n in nodes]
        for wave in _waves(table, nodes):
            stats = channel_moments(ctx, theta, [source[n.name] for n in wave], batch_size=self.batch_size, taps=taps)
            new: dict[str, Any] = {}
            for node in wave:
                mean, var, count = stats[source[node.name]]
                final = _reset_stats(node, mean, var, count, table)
                stored[f"{node.name}.running_var"] = final[f"{node.name}.running_var"]
                # while later layers are measured, this one normalises with the biased variance, as in training mode
                new.update({f"{node.name}.running_mean": mean, f"{node.name}.running_var": var})
            theta = _replace(xp, theta, ctx.layout, new)
        return _replace(xp, theta, ctx.layout, stored)


# -- REPAIR --------------------------------------------------------------------------------------------
def channel_weights(ctx: RepairContext, node: Node, v: Any) -> Any:
    """The weight of model B in each channel of a norm node's output, from the coefficients ``v``.

    The mean of ``v`` over the parameters that make the channel: the output row of the
    weight of the dense or conv layer whose output the norm normalises (a transposed conv's
    output column, axis 1 of its ``(in, out, *kernel)`` weight) and its bias entry
    (:meth:`~combinability.layers.LayerTable.producers`: after a concatenation, each part's
    channels from the layer that made them). A scalar ``v`` (the linear path) is returned as
    it is. Without a producer (a norm reading the input or a flattened image), the norm's
    own weight and bias entries of the channel are used (a BatchNorm without them: its
    running statistics).
    """
    xp = ctx.backend.xp()
    if len(getattr(v, "shape", ())) == 0:
        return v
    layout, table = ctx.layout, ctx.table
    leaves = [leaf for leaf in ("weight", "bias") if f"{node.name}.{leaf}" in layout] or ["running_mean",
                                                                                        "running_var"]
    channels = layout[f"{node.name}.{leaves[0]}"].shape[0]
    parts, start = [], 0
    for producer, count in table.producers(node.name):
        names = [f"{producer.name}.weight", f"{producer.name}.bias"] if producer is not None else []
        names = [n for n in names if n in layout]
        out_axis = 1 if producer is not None and producer.op == "conv_transpose" else 0
        if names and layout[names[0]].shape[out_axis] == count:
            parts.append(_row_means(xp, v, [(layout[n], out_axis if n.endswith(".weight") else 0, 0, count)
                                            for n in names], count))
        else:  # the norm's own entries of these channels
            own = [(layout[f"{node.name}.{leaf}"], 0, start, start + count) for leaf in leaves]
            parts.append(_row_means(xp, v, own, count))
        start += count
    if start != channels:  # the table and the layout disagree: the norm's own entries throughout
        return _row_means(xp, v, [(layout[f"{node.name}.{leaf}"], 0, 0, channels) for leaf in leaves], channels)
    return parts[0] if len(parts) == 1 else xp.concat(parts)


def _layer_weights(ctx: RepairContext, node: Node, v: Any) -> Any:
    """B's weight in each output channel of a dense or conv layer REPAIR corrects itself (no norm after it):
    the mean of ``v`` over the channel's weight row (all of the unit's incoming weights) and bias entry."""
    if len(getattr(v, "shape", ())) == 0:
        return v
    layout = ctx.layout
    axis = _out_axis(node)
    count = layout[f"{node.name}.weight"].shape[axis]
    return _row_means(ctx.backend.xp(), v, [(layout[f"{node.name}.weight"], axis, 0, count),
                                            (layout[f"{node.name}.bias"], 0, 0, count)], count)


def _out_axis(node: Node) -> int:
    """The output-channel axis of a dense or conv layer's weight (a transposed conv's is 1: ``(in, out, ...)``)."""
    return 1 if node.op == "conv_transpose" else 0


def _row_means(xp: Any, v: Any, entries: list[tuple[Any, int, int, int]], rows: int) -> Any:
    """The mean of ``v`` per channel over channels ``[a, b)`` of each layout entry ``(entry, axis, a, b)``:
    the channels along axis 0 (the entry read as ``(channels, -1)``) or axis 1 (``(in, channels, -1)``)."""
    total, count = 0, 0
    for e, axis, a, b in entries:
        if axis == 0:
            block = xp.reshape(v[e.offset : e.stop], (e.shape[0], -1))[a:b]
            total = total + xp.sum(block, axis=1)
            count += block.shape[1]
        else:
            block = xp.reshape(v[e.offset : e.stop], (e.shape[0], e.shape[1], -1))[:, a:b]
            total = total + xp.sum(block, axis=(0, 2))
            count += block.shape[0] * block.shape[2]
    return total / count


def _end_stats(ctx: RepairContext, nodes: Sequence[Node], batch_size: int,
               taps: Sequence[str]) -> list[dict[str, tuple[Any, Any]]]:
    """Per end model: ``{norm: (mean, std)}`` of every norm's output, computed once per sweep."""
    key = (_KEY, "ends", tuple(id(e) for e in ctx.ends), id(ctx.data), batch_size)
    if key not in ctx.cache:
        xp = ctx.backend.xp()
        out = []
        for end in ctx.ends:
            moments = channel_moments(ctx, _vector(ctx, end), [n.name for n in nodes], batch_size=batch_size,
                                      taps=taps)
            out.append({p: (mean, xp.sqrt(var)) for p, (mean, var, _) in moments.items()})
        ctx.cache[key] = out
    return ctx.cache[key]


def _coefficients(ctx: RepairContext) -> list[Any]:
    """The coefficients of models B (and C) of the combination."""
    v = ctx.coefficients
    if v is None:
        raise ConfigurationError("repair='repair' needs the combination's coefficients (context.coefficients); "
                                 "it runs inside cb.sweep, which passes them")
    vs = list(v) if isinstance(v, tuple | list) else [v]
    if len(vs) != len(ctx.ends) - 1:
        raise ConfigurationError(f"repair='repair': {len(vs)} coefficient vector(s) for {len(ctx.ends)} end models")
    for c in vs:
        shape = tuple(getattr(c, "shape", ()))
        if shape not in ((), (ctx.layout.size,)):
            raise LayoutError(f"repair='repair': a coefficient has shape {shape}; expected a scalar or "
                              f"({ctx.layout.size},)")
    return vs


@dataclass(frozen=True)
class Renormalize:
    """REPAIR: give every hidden layer's output channels the interpolated statistics of the end models.

    The places corrected (:func:`repair_sites`), in forward order: the output of every
    normalisation node (BatchNorm, LayerNorm, GroupNorm) with a learned scale and shift, of
    every BatchNorm without one (its running statistics carry the correction), and of every
    hidden dense or conv layer with a bias that no norm normalises (REPAIR's own case, a
    network without norms: the correction is fused into the layer's weight rows and bias, as
    the paper fuses its added BatchNorm into the conv). Each channel is given the mean and
    standard deviation

    ``μ_t = (1 − w) μ_A + w μ_B``,  ``σ_t = (1 − w) σ_A + w σ_B``

    (three models: ``(1 − w_B − w_C) μ_A + w_B μ_B + w_C μ_C``), where ``μ_A, σ_A, ...``
    are the end models' statistics at that place on the repair data (computed once per sweep)
    and ``w`` is the channel's weight of B (:func:`channel_weights`; a layer's own weight
    row and bias entry for a layer). With ``μ_c``, ``σ_c`` the combined model's statistics
    there, measured with the earlier places already repaired (``σ_c`` floored at 1e-6;
    ``σ_t`` at 0, which extrapolation could cross), the affine map ``a x + c`` that the
    place applies last per channel (a norm's weight and bias, a layer's weight row and bias)
    becomes ``a σ_t / σ_c`` and ``(c − μ_c) σ_t / σ_c + μ_t``.

    For a BatchNorm node, its running statistics are first reset on the repair data (as
    :class:`Reset` does, with the earlier places already repaired), as REPAIR does for
    BatchNorm networks; then ``μ_c = b`` and ``σ_c = |w| σ_in / sqrt(var + eps)`` follow
    exactly from the measured input statistics. A BatchNorm without weight and bias gets
    ``running_var = σ_in² / σ_t² − eps`` (at least 0) and ``running_mean = μ_in − μ_t
    sqrt(running_var + eps)``. Places that do not depend on one another are measured in the
    same pass over the data.

    Parameters
    ----------
    batch_size : int
        Examples per forward pass.
    """

    batch_size: int = 500
    name: str = "repair"

    def validate(self, ctx: RepairContext) -> None:
        """Check the model and the repair data before any combination is evaluated.

        Raises
        ------
        ConfigurationError
            If the model has nothing REPAIR can correct (or no layer table), or no repair data is given.
        DatasetError
            If the repair data's inputs do not have the models' input shape.
        """
        table = _table(ctx, self.name)
        nodes = repair_sites(table)
        if not nodes:
            raise ConfigurationError(f"repair='repair' (REPAIR) rescales the output channels of normalisation "
                                     f"layers with a learned scale and shift (or BatchNorm's running statistics) "
                                     f"and of hidden dense and conv layers with a bias that no norm follows, but "
                                     f"the {table.name!r} model has none of them: nothing to repair")
        _check_data(ctx, self.name, table)
        names = [f"{n.name}.{p}" for n in nodes if n.op != "norm" or n.affine for p in ("weight", "bias")]
        names += [f"{n.name}.{p}" for n in _batchnorms(table) for p in ("running_mean", "running_var")]
        _check_entries(ctx, names, self.name)

    def __call__(self, theta: Any, ctx: RepairContext) -> Any:
        """The repaired combined vector (device array ``(d,)``)."""
        self.validate(ctx)
        vs = _coefficients(ctx)
        xp = ctx.backend.xp()
        theta = _vector(ctx, theta)
        table, layout = ctx.table, ctx.layout
        nodes = repair_sites(table)
        source = {name: inputs[0] for name, inputs in _sources(table).items()}
        taps = [n.name for n in nodes] + [source[n.name] for n in nodes if n.op == "norm"]
        ends = _end_stats(ctx, nodes, self.batch_size, taps)
        for wave in _waves(table, nodes):
            points = [source[n.name] if n.op == "norm" and n.norm == "batchnorm" else n.name for n in wave]
            stats = channel_moments(ctx, theta, points, batch_size=self.batch_size, taps=taps)
            new: dict[str, Any] = {}
            for node, point in zip(wave, points, strict=True):
                mean, var, count = stats[point]
                weigh = channel_weights if node.op == "norm" else _layer_weights
                ws = [weigh(ctx, node, v) for v in vs]
                shares = [1 - sum(ws), *ws]
                mu_t = sum(s * e[node.name][0] for s, e in zip(shares, ends, strict=True))
                sigma_t = sum(s * e[node.name][1] for s, e in zip(shares, ends, strict=True))
                sigma_t = xp.where(sigma_t > 0, sigma_t, 0 * sigma_t)  # extrapolation (w > 1) may go below 0
                if node.op == "norm" and not node.affine:  # a BatchNorm's running statistics carry it all
                    floor = sigma_t * sigma_t + _VAR_FLOOR
                    kept = xp.where(var / floor > node.eps, var / floor - node.eps, 0 * var)
                    new[f"{node.name}.running_var"] = kept
                    new[f"{node.name}.running_mean"] = mean - mu_t * xp.sqrt(kept + node.eps)
                    continue
                weight, bias = theta[layout.slice(f"{node.name}.weight")], theta[layout.slice(f"{node.name}.bias")]
                if node.op != "norm":
                    mu_c, sigma_c = mean, xp.sqrt(var)
                elif node.norm == "batchnorm":
                    reset = _reset_stats(node, mean, var, count, table)
                    new.update(reset)
                    mu_c = bias
                    sigma_c = xp.abs(weight) * xp.sqrt(var / (reset[f"{node.name}.running_var"] + node.eps))
                else:
                    mu_c, sigma_c = mean, xp.sqrt(var)
                ratio = sigma_t / xp.sqrt(sigma_c * sigma_c + _VAR_FLOOR)
                new[f"{node.name}.weight"] = _scale_rows(xp, weight, layout[f"{node.name}.weight"].shape,
                                                         _out_axis(node) if node.op != "norm" else 0, ratio)
                # one shift per channel; a LayerNorm over the whole map has one per value, channels first
                rows = layout[f"{node.name}.bias"].shape[0]
                new[f"{node.name}.bias"] = xp.reshape((xp.reshape(bias, (rows, -1)) - xp.reshape(mu_c, (rows, 1)))
                                                      * xp.reshape(ratio, (rows, 1)) + xp.reshape(mu_t, (rows, 1)),
                                                      (-1,))
            theta = _replace(xp, theta, layout, new)
        return theta


#: The built-in ``"reset"`` repair.
reset = Reset()
#: The built-in ``"repair"`` repair (REPAIR).
repair = Renormalize()


def _scale_rows(xp: Any, flat: Any, shape: tuple[int, ...], axis: int, ratio: Any) -> Any:
    """A flat array of ``shape`` with every slice along ``axis`` multiplied by its entry of ``ratio``."""
    if len(shape) == 1:
        return flat * ratio
    lead = math.prod(shape[:axis])
    block = xp.reshape(flat, (lead, shape[axis], -1))
    return xp.reshape(block * xp.reshape(ratio, (1, -1, 1)), (-1,))


_LAYERS = ("dense", "conv", "conv_transpose")


def repair_sites(table: Any) -> list[Any]:
    """The nodes whose outputs REPAIR corrects, in forward order.

    * Every norm node with a learned scale and shift (``affine``), and every BatchNorm
      without one (its running statistics are rewritten).
    * Every hidden dense or conv layer (``conv_transpose`` too) with a bias and without frozen
      entries, that no norm normalises and that does not make the logits: walking forward
      from it through the nodes without parameters (activations, pooling, additions, ...),
      neither a norm nor the network's output is reached before another such layer.

    Norms without a scale and shift other than BatchNorm (torch's default ``InstanceNorm2d``),
    norms with a scale alone (RMSNorm, ``LayerNorm(C, bias=False)``) and layers without a bias
    are left as they are: nothing there can carry the correction of the channels' means. A
    LayerNorm over the whole map (``"layernorm_map"``, torch's ``LayerNorm([C, H, W])``) is
    corrected per channel as the others: each channel's mean and standard deviation over the
    examples and positions, its ``(C, H, W)`` weight and bias rescaled and shifted channel by
    channel (the same affine map of each channel, so the positions' pattern within a channel stays).
    """
    nodes = table.nodes
    readers: dict[str, list[Any]] = {}
    for node in nodes:
        for src in table.inputs_of(node):
            readers.setdefault(src, []).append(node)
    last = nodes[-1].name

    def reaches_norm_or_output(name: str) -> bool:
        stack, seen = [name], set()
        while stack:
            current = stack.pop()
            if current == last:
                return True
            for reader in readers.get(current, ()):
                if reader.name in seen:
                    continue
                seen.add(reader.name)
                if reader.op == "norm":
                    return True
                if reader.op not in _LAYERS:
                    stack.append(reader.name)
        return False

    out = []
    for node in nodes:
        if node.op == "norm" and ("bias" in node.norm_leaves() or node.norm == "batchnorm"):
            out.append(node)
        elif node.op in _LAYERS and node.bias and not node.fixed and not reaches_norm_or_output(node.name):
            out.append(node)
    return out
