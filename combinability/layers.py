"""Layer tables: one framework-neutral description per architecture.

A :class:`LayerTable` lists the nodes of a network in forward order — dense and conv
layers, normalisations, activations, pooling, flatten and residual additions — as a
small dataflow graph. Everything the library needs to know about an architecture is
derived from it, once, in the core:

* the named parameters and buffers with their shapes (:meth:`LayerTable.parameters`),
  in the reference (torch) naming and axis convention;
* the permutation spec (:meth:`LayerTable.spec`), found by following which nodes share
  a channel space (a residual addition ties its inputs' spaces together);
* the layer map of stitching and per-layer plots (:meth:`LayerTable.layers`);
* the feature points (:meth:`LayerTable.feature_points`) and the point whose units each
  permutation reorders (:meth:`LayerTable.activation_points`);
* the torch ⇄ flax conversion of names and axes (:meth:`LayerTable.to_flax`);
* the frozen arrays of the asymmetric layers (:meth:`LayerTable.frozen_weights`,
  :meth:`LayerTable.gate_matrix`), drawn from seeds stored in the nodes.

Asymmetric networks (Lim et al., 2024, "The empirical impact of neural parameter
symmetries") are tables too. A dense or conv node with ``fixed=k`` is *W-Asymmetric*:
``k`` entries of each output unit's fan-in are frozen at random values, so the layer
computes with ``where(mask, frozen, weight)`` and no two units are interchangeable. A
``"gate"`` node is *σ-Asymmetric*: ``x * sigmoid(G x)`` with a frozen random ``G`` mixing the
channels (FiGLU). Both break the permutation symmetry of the channel spaces they touch,
and :meth:`LayerTable.spec` leaves those spaces without a permutation.

Backends build a module from a table with one generic builder (an interpreter of the
nodes), so adding an architecture is writing a table.

Examples
--------
>>> t = LayerTable("tiny", (4,), 3, (Node("fc1", "dense", units=5), Node("act1", "relu"),
...                                   Node("fc2", "dense", units=3)))
>>> dict(t.spec().axes_to_perm)
{'fc1.weight': ('P_fc1', None), 'fc1.bias': ('P_fc1',), 'fc2.weight': (None, 'P_fc1'), 'fc2.bias': (None,)}
>>> t.activation_points()
{'P_fc1': 'act1'}
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from combinability.errors import ConfigurationError, LayoutError
from combinability.kinds import Blocks
from combinability.layer_nodes import ACTIVATIONS, NORMS, OPS, TRACED_ELEMENTWISE, ConvGeometry, Node, _node_rng
from combinability.permutation import Entry, PermutationSpec, Repeat

__all__ = ["Node", "ConvGeometry", "LayerTable", "OPS", "NORMS", "ACTIVATIONS", "input_layout"]


def input_layout(model: str, reads: Mapping[tuple[int, ...], str], hint: str = "") -> tuple[int, ...] | None:
    """The one layout of a traced model's input that its first layers read (a flat batch reshaped to images:
    the images' shape), from ``reads``, each layout to the first node reading it; None when none was seen.

    Raises
    ------
    TracingError
        If the model reads its input in two layouts or more: a layer table has one input.
    """
    from combinability.errors import TracingError

    if len(reads) > 1:
        raise TracingError(f"{model} reads its input in {len(reads)} layouts ("
                           + ", ".join(f"{s} by node {r!r}" for s, r in reads.items())
                           + "); a layer table has one input" + hint)
    return next(iter(reads), None)

_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _is_point(spatial: tuple[int, ...] | None) -> bool:
    """Whether a feature map has one position (``1 x 1``): it broadcasts like a vector."""
    return spatial is not None and all(s == 1 for s in spatial)


def _ndim(shape: _Shape) -> int | None:
    """The spatial axes of a node output (None for a vector)."""
    return None if shape.spatial is None else len(shape.spatial)


@dataclass(frozen=True)
class _Shape:
    """Inferred output of a node: channels (or features), spatial size (None: a vector)."""

    channels: int
    spatial: tuple[int, ...] | None


@dataclass(frozen=True)
class LayerTable:
    """A network as an ordered graph of :class:`Node` values.

    Parameters
    ----------
    name : str
        Architecture name.
    input_shape : tuple of int
        Channels-first input shape without the batch axis: ``(c, h, w)`` or ``(features,)``.
    num_classes : int
        Outputs of the last node: its units, or its channels when it gives a map (a dense
        prediction, one per position: a segmentation network's).
    nodes : tuple of Node
        In forward order; the last node's output is the logits.
    config : mapping
        The configuration the table was made from (``width`` ...), kept for checkpoints.
    flax_sep : str
        What the dots of a node's name become in its flax module path (:meth:`flax_names`):
        ``"_"`` for the library's modules (``stage0_block0``), ``"/"`` for a traced user
        module, whose ``Block_0.Dense_1`` is the submodule ``Dense_1`` of ``Block_0``.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    nodes: tuple[Node, ...]
    config: Mapping[str, Any] = field(default_factory=dict, compare=False)
    flax_sep: str = field(default="_", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        names = [n.name for n in self.nodes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigurationError(f"layer table {self.name!r}: node names used twice: {dup}")
        if not self.nodes:
            raise ConfigurationError(f"layer table {self.name!r} has no nodes")
        shapes = self.shapes()  # validates the graph
        last = shapes[self.nodes[-1].name]
        if last.channels != self.num_classes:  # a map (dense prediction) holds its logits as channels
            raise ConfigurationError(
                f"layer table {self.name!r}: the last node gives {last}, expected {self.num_classes} logits"
            )

    # -- graph -------------------------------------------------------------------------
    @property
    def data_shape(self) -> tuple[int, ...]:
        """The shape of one example as the model takes it (a traced flax model: channels-last)."""
        return tuple(self.config.get("data_shape", self.input_shape))

    def inputs_of(self, node: Node) -> tuple[str, ...]:
        """The names a node reads (``"<input>"`` is the network's input)."""
        if node.inputs:
            return node.inputs
        i = self.nodes.index(node)
        return (self.nodes[i - 1].name,) if i else ("<input>",)

    @functools.cached_property
    def schedule(self) -> tuple[tuple[Node, tuple[str, ...], tuple[str, ...]], ...]:
        """The forward pass as ``(node, names it reads, names no later node reads)`` in order.

        An interpreter may drop the values of the third entry once the node has run, so
        that a batch holds a few activations at a time rather than every layer's (the
        network's output is never dropped). Computed once per table.
        """
        reads = []
        for i, node in enumerate(self.nodes):
            reads.append(node.inputs or ((self.nodes[i - 1].name,) if i else ("<input>",)))
        last = {name: k for k, ins in enumerate(reads) for name in ins}
        output = self.nodes[-1].name
        return tuple((node, ins, tuple(n for n in dict.fromkeys(ins) if last[n] == k and n != output))
                     for k, (node, ins) in enumerate(zip(self.nodes, reads, strict=True)))

    def shapes(self) -> dict[str, _Shape]:
        """Output shape of every node (and of ``"<input>"``), inferred in order.

        Raises
        ------
        ConfigurationError
            If a node reads an unknown or later node, or the shapes do not fit.
        """
        if 2 <= len(self.input_shape) <= 4:
            out = {"<input>": _Shape(self.input_shape[0], self.input_shape[1:])}
        elif len(self.input_shape) == 1:
            out = {"<input>": _Shape(self.input_shape[0], None)}
        else:
            raise ConfigurationError(
                f"layer table {self.name!r}: input_shape must be (features,), or channels first then one to three "
                f"spatial axes: (c, length), (c, h, w) or (c, d, h, w); got {self.input_shape}"
            )
        for node in self.nodes:
            ins = []
            for name in self.inputs_of(node):
                if name not in out:
                    raise ConfigurationError(f"node {node.name!r} reads {name!r}, which is not an earlier node")
                ins.append(out[name])
            x = ins[0]
            where = f"layer table {self.name!r}, node {node.name!r}"
            if node.op == "conv" and x.channels % node.groups:
                raise ConfigurationError(f"{where}: {x.channels} input channels do not split into "
                                         f"groups={node.groups}")
            if node.op in ("dense", "conv") and node.fixed:
                fan_in = (x.channels // node.groups * math.prod(node.conv_geometry(_ndim(x)).kernel)
                          if node.op == "conv" else x.channels)
                if node.fixed > fan_in:
                    raise ConfigurationError(f"{where}: fixed={node.fixed} frozen entries per unit exceed the fan-in "
                                             f"of {fan_in}; valid: 0 to {fan_in}")
            if node.op == "dense":  # on an image: the channels of each position
                out[node.name] = _Shape(node.units, x.spatial)
            elif node.op in ("conv", "conv_transpose"):
                if x.spatial is None:
                    raise ConfigurationError(f"{where}: a {node.op} layer needs an image, got a vector")
                geometry = node.conv_geometry(len(x.spatial))
                size = (geometry.output(x.spatial) if node.op == "conv" else
                        geometry.transposed_output(x.spatial, node.output_paddings(len(x.spatial))))
                if min(size) < 1:
                    raise ConfigurationError(f"{where}: the image {x.spatial} is too small for the kernel")
                out[node.name] = _Shape(node.units, size)
            elif node.op == "upsample":
                if x.spatial is None or len(node.output_size) != len(x.spatial):
                    raise ConfigurationError(f"{where}: an upsample node resizes a map of {len(node.output_size)} "
                                             f"spatial axes to {node.output_size}, got {x}")
                out[node.name] = _Shape(x.channels, node.output_size)
            elif node.op == "pad":
                if x.spatial is None or (node.spatial_dims or len(x.spatial)) != len(x.spatial):
                    raise ConfigurationError(f"{where}: a pad node pads the spatial axes of a map, got {x}")
                size = tuple(s + b + a for s, (b, a) in zip(x.spatial, node.paddings(len(x.spatial)), strict=True))
                if min(size) < 1:
                    raise ConfigurationError(f"{where}: padding {node.paddings(len(x.spatial))} crops the map "
                                             f"{x.spatial} to nothing; a crop keeps at least one position per axis")
                out[node.name] = _Shape(x.channels + sum(node.channel_padding), size)
            elif node.op == "slice":
                start, stop = node.channel_range
                if stop > x.channels:
                    raise ConfigurationError(f"{where}: channels {start}:{stop} of an input of {x.channels} channels")
                out[node.name] = _Shape(stop - start, x.spatial)
            elif node.op == "flatten":
                size = x.channels * (math.prod(x.spatial) if x.spatial else 1)
                out[node.name] = _Shape(size, None)
            elif node.op == "avgpool":
                if (node.keepdims or node.output_size) and x.spatial is None:
                    raise ConfigurationError(f"{where}: pooling a vector to an image (keepdims, output_size)")
                if node.output_size and len(node.output_size) != len(x.spatial):
                    raise ConfigurationError(f"{where}: output_size {node.output_size} names {len(node.output_size)} "
                                             f"spatial axes, the input has {len(x.spatial)} ({x.spatial})")
                out[node.name] = _Shape(x.channels, node.output_size or (
                    (1,) * len(x.spatial) if node.keepdims else None))
            elif node.op == "maxpool":
                if x.spatial is None:
                    raise ConfigurationError(f"{where}: max pooling needs an image")
                k, st, pads = node.kernel, max(1, node.stride), node.paddings(len(x.spatial))
                sp = x.spatial if min(x.spatial) < k else tuple((s + lo + hi - k) // st + 1
                                                                for s, (lo, hi) in zip(x.spatial, pads, strict=True))
                out[node.name] = _Shape(x.channels, sp)
            elif node.op == "add":
                if len(ins) < 2 or any(s != x for s in ins):
                    raise ConfigurationError(f"{where}: an addition needs two or more inputs of one shape, got {ins}")
                out[node.name] = x
            elif node.op == "mul":
                full = [s for s in ins if s.spatial is not None and not _is_point(s.spatial)]
                channels = max(s.channels for s in ins)
                if len(ins) < 2 or any(s.channels not in (channels, 1) for s in ins) or \
                        len({s.spatial for s in full}) > 1:
                    raise ConfigurationError(f"{where}: a product needs two or more inputs of as many channels (or "
                                             f"one channel, spread over the others), each an image of one size, a "
                                             f"1 x 1 image or a vector, got {ins}")
                points = [s.spatial for s in ins if _is_point(s.spatial)]
                out[node.name] = _Shape(channels, full[0].spatial if full else points[0] if points else None)
            elif node.op == "channel_reduce":
                out[node.name] = _Shape(1, x.spatial)
            elif node.op in ("scale", "shift") and (node.units not in (1, x.channels) or
                                                     (node.keepdims and x.spatial is None)):
                raise ConfigurationError(f"{where}: a {node.op} node has one parameter per channel or one for all: "
                                         f"units {x.channels} or 1, got {node.units}"
                                         + (" (keepdims needs an image)" if node.keepdims else ""))
            elif node.op == "prelu" and node.units not in (1, x.channels):
                raise ConfigurationError(f"{where}: a prelu node has one slope or one per channel: units 1 or "
                                         f"{x.channels}, got {node.units}")
            elif node.op == "concat":
                if len(ins) < 2 or any(s.spatial != x.spatial for s in ins):
                    raise ConfigurationError(f"{where}: a concatenation needs two or more inputs of one spatial size "
                                             f"(or vectors), got {ins}")
                out[node.name] = _Shape(sum(s.channels for s in ins), x.spatial)
            elif node.op == "norm" and node.norm == "layernorm_map" and (x.spatial is None or not x.spatial):
                raise ConfigurationError(f"{where}: a layernorm_map node normalises a map (c, *positions) as a whole; "
                                         f"on a vector it is a layernorm node, got {x}")
            else:  # norm, relu
                out[node.name] = x
        return out

    # -- parameters ----------------------------------------------------------------------
    def parameters(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Every parameter and buffer: ``{name: (shape, dtype)}`` in the reference convention.

        Dense ``weight`` is ``(out, in)``, conv ``weight`` is ``(out, in / groups, kh, kw)`` (one
        kernel axis per spatial axis: ``(out, in / groups, k)`` on sequences); a BatchNorm
        has ``weight``, ``bias``, ``running_mean``, ``running_var`` and an int64 0-d
        ``num_batches_tracked`` counter.
        """
        shapes = self.shapes()
        params: dict[str, tuple[tuple[int, ...], str]] = {}
        for node in self.nodes:
            src = shapes[self.inputs_of(node)[0]]
            c_in = src.channels
            if node.op == "dense":
                params[f"{node.name}.weight"] = ((node.units, c_in), "float32")
            elif node.op == "conv":
                kernel = node.conv_geometry(_ndim(src)).kernel
                params[f"{node.name}.weight"] = ((node.units, c_in // node.groups, *kernel), "float32")
            elif node.op == "conv_transpose":  # torch's layout: (in, out, *kernel)
                params[f"{node.name}.weight"] = ((c_in, node.units, *node.conv_geometry(_ndim(src)).kernel), "float32")
            elif node.op == "norm":
                # one entry per channel; a LayerNorm over the whole map has one per value, channels first
                shape = (c_in, *(src.spatial or ())) if node.norm == "layernorm_map" else (c_in,)
                for leaf in node.norm_leaves():
                    params[f"{node.name}.{leaf}"] = (shape, "float32")
                if node.norm == "batchnorm":
                    params[f"{node.name}.running_mean"] = ((c_in,), "float32")
                    params[f"{node.name}.running_var"] = ((c_in,), "float32")
                    params[f"{node.name}.num_batches_tracked"] = ((), "int64")
                continue
            elif node.op == "prelu":
                params[f"{node.name}.weight"] = ((node.units,), "float32")
                continue
            elif node.op in ("scale", "shift"):
                trailing = (1,) * len(src.spatial or ()) if node.keepdims else ()
                leading = (1,) if node.batch_axis else ()
                params[node.parameter_name()] = ((*leading, node.units, *trailing), "float32")
                continue
            else:
                continue
            if node.bias:
                params[f"{node.name}.bias"] = ((node.units,), "float32")
        for name, (shape, _) in self.input_constants.items():
            params[name] = (tuple(shape), "float32")
        return params

    @property
    def input_constants(self) -> dict[str, tuple[tuple[int, ...], bool]]:
        """State entries of a traced model that only normalise its input (``(x - self.mean) / self.std``):
        ``{name: (shape, is a buffer)}``; no permutation acts on them."""
        return dict(getattr(self, "config", {}).get("input_constants", {}))

    def buffers(self) -> tuple[str, ...]:
        """Names of the entries of :meth:`parameters` that are not trained by gradient."""
        return tuple(f"{n.name}.{b}" for n in self.nodes if n.op == "norm" and n.norm == "batchnorm"
                     for b in _BN_BUFFERS) + tuple(k for k, (_, buffer) in self.input_constants.items() if buffer)

    def check_buildable(self) -> None:
        """Raise :class:`ConfigurationError` if a backend cannot build this table: it describes a traced
        model whose own code computes an element-wise function the table does not name
        (:data:`~combinability.layer_nodes.TRACED_ELEMENTWISE`)."""
        unnamed = [n.name for n in self.nodes if n.op == "act" and n.fn == TRACED_ELEMENTWISE]
        if unnamed:
            raise ConfigurationError(f"layer table {self.name!r} describes a traced model: nodes {unnamed[:4]} are "
                                     "element-wise functions of its own code, which the table does not name; use "
                                     "the model itself, or name each function (Node(op='act', fn=...) with fn in "
                                     f"{', '.join(ACTIVATIONS)})")

    def check_state(self, state: Mapping[str, Any], what: str = "state") -> None:
        """Raise :class:`LayoutError` unless ``state`` has exactly this table's names and shapes."""
        from combinability.layout import check_names

        check_names({k: shape for k, (shape, _) in self.parameters().items()},
                    {k: np.shape(v) for k, v in state.items()}, f"{what} does not fit the {self.name!r} layer table")

    # -- channel spaces and the permutation spec ----------------------------------------
    def _spaces(self) -> tuple[dict[str, tuple[int, ...]], dict[int, Entry | None],
                               dict[str, tuple[str, int, int]], dict[int, int]]:
        """Channel spaces of every node's output, each space's spec entry (None: fixed), the
        ``(group name, groups, channels)`` of each permutation that moves blocks of channels, and
        the channels of each space.

        A node's output is a tuple of spaces: one, or the parts of a concatenation in order.
        A dense or conv node opens a new space; norms, activations, pooling and depthwise
        convs keep their input's; an addition merges its inputs' spaces (union-find), part
        by part when they are concatenations split alike; a concatenation joins its inputs'
        parts. An image flattened for dense layers keeps its channels' space (:meth:`_repeats`;
        the entry repeats it over the positions).

        Groups move channels in blocks. A space that GroupNorm normalises in ``G`` groups,
        and the output of a conv with ``G`` groups (other than depthwise), is a block
        permutation (:class:`~combinability.kinds.Blocks`): groups move whole, as the group
        permutation ``<P>/groups`` moves them, and channels move within their group. The
        input of such a conv moves whole blocks only, in the same order as its output's
        (``Repeat(<group>, channels // G)``): the weight's input axis runs within a group.

        Fixed (not permutable): the network's input and the logits, an image flattened
        otherwise (a concatenation's, or read by other nodes), every part of a concatenation
        one of whose parts is fixed (a packed axis moves all its segments), a space split
        into groups of two sizes or packed into a concatenation, and every space whose
        blocks move with a fixed one's.

        A sum of concatenations whose parts meet at other channels (the zero channels that an
        option-A shortcut puts around the stream, added to a convolution's output) cuts each
        part where another input's parts meet: the pieces are spaces of their own, and a space
        cut so is cut wherever it appears.
        """
        parent: dict[int, int] = {}

        def find(a: int) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        def new() -> int:
            parent[len(parent)] = len(parent)
            return len(parent) - 1

        shapes = self.shapes()
        repeats = self._repeats()

        def src_channels(node: Node) -> int:
            return shapes[self.inputs_of(node)[0]].channels

        fixed = {new()}
        size = {0: shapes["<input>"].channels}  # channels of each space
        # (space, groups, group variable, rigid) of each GroupNorm and grouped conv: the space moves
        # as blocks (GroupNorm, a grouped conv's output) or whole blocks only (rigid: a grouped conv's input)
        grouped: list[tuple[int, int, int, bool]] = []
        space: dict[str, tuple[int, ...]] = {"<input>": (0,)}
        opened: dict[int, str] = {}

        def opens(node: Node) -> tuple[int, ...]:
            s = new()
            opened[s], size[s] = node.name, node.units
            return (s,)

        def fixed_space(channels: int) -> tuple[int, ...]:
            s = new()
            fixed.add(s)
            size[s] = channels
            return (s,)

        refined: dict[int, tuple[int, ...]] = {}  # a space split into parts, by a sum with parts cut elsewhere

        def expand(parts: tuple[int, ...]) -> tuple[int, ...]:
            """``parts`` as their current roots, each split space as its parts."""
            out: list[int] = []
            for p in parts:
                r = find(p)
                out.extend(expand(refined[r]) if r in refined else (r,))
            return tuple(out)

        def cut(parts: tuple[int, ...], cuts: set[int]) -> tuple[int, ...]:
            """``parts`` split at the channel offsets ``cuts`` (a part cut inside is refined into pieces)."""
            out: list[int] = []
            start = 0
            for p in parts:
                inner = sorted(c - start for c in cuts if start < c < start + size[p])
                if inner:
                    base = next((opened[t] for t in sorted(parent) if find(t) == p and t in opened), "split")
                    pieces = []
                    for a, b in zip([0, *inner], [*inner, size[p]], strict=True):
                        t = new()
                        size[t], opened[t] = b - a, f"{base}.{a}-{b}"
                        pieces.append(t)
                    refined[p] = tuple(pieces)
                    out.extend(pieces)
                else:
                    out.append(p)
                start += size[p]
            return tuple(out)

        for node in self.nodes:
            ins = [space[i] for i in self.inputs_of(node)]
            if node.op == "conv" and node.depthwise(src_channels(node)):
                s = ins[0]
                if node.fixed:
                    fixed.update(s)
            elif node.op in ("dense", "conv", "conv_transpose"):
                s = opens(node)
                if node.fixed or (node.op == "conv" and node.groups > 1 and len(ins[0]) > 1):
                    # frozen entries at fixed rows and columns, or groups straddling a concatenation's parts
                    fixed.update((*s, *ins[0]))
                elif node.op == "conv" and node.groups > 1:
                    # group k reads input block k and writes output block k: blocks move together; the
                    # weight's input axis runs within a group, so input blocks keep their channels' order
                    grouped += [(ins[0][0], node.groups, len(grouped), True), (s[0], node.groups, len(grouped), False)]
            elif node.op == "gate":
                s = ins[0]
                fixed.update(s)  # G mixes the channels: only permutations commuting with it keep the function
            elif node.op == "flatten":
                src = shapes[self.inputs_of(node)[0]]
                if src.spatial is None or _is_point(src.spatial) or node.name in repeats:
                    s = ins[0]  # a flattened feature map read by dense layers: its channels' entries move together
                else:
                    s = fixed_space(shapes[node.name].channels)
                    fixed.update(ins[0])
            elif node.op == "norm" and node.norm == "groupnorm" and node.groups not in (1, src_channels(node)):
                s = ins[0]
                if len(s) == 1:  # channels move within their group, and groups move whole: blocks
                    grouped.append((s[0], node.groups, len(grouped), False))
                else:  # a concatenation's parts split by the groups: fixed
                    fixed.update(s)
            elif node.op == "concat":
                s = tuple(part for parts in ins for part in parts)
            elif node.op == "channel_reduce":  # every channel read alike: one channel of its own, fixed
                s = fixed_space(1)
            elif node.op in ("add", "mul"):  # a sum or product of several spaces: one permutation moves them
                if node.op == "mul" and len({shapes[i].channels for i in self.inputs_of(node)}) > 1:
                    # a map of one channel spread over the channels of the others: they alone are one space
                    ins = [parts for i, parts in zip(self.inputs_of(node), ins, strict=True) if shapes[i].channels > 1]
                ins = [expand(parts) for parts in ins]
                blocked_roots = {find(g[0]) for g in grouped}
                if not any(p in blocked_roots for parts in ins for p in parts):
                    # concatenations split differently (a shortcut's zero channels around the stream): each part
                    # cut where another input's parts meet, until pieces of one size meet (a space cut for one
                    # input is cut in the others too, which may cut further)
                    while any([size[p] for p in parts] != [size[p] for p in ins[0]] for parts in ins[1:]):
                        offsets = {o for parts in ins for o in itertools.accumulate(size[p] for p in parts)}
                        for k in range(len(ins)):
                            ins[k] = cut(expand(ins[k]), offsets)
                        ins = [expand(parts) for parts in ins]
                s = ins[0]
                if all([size[p] for p in other] == [size[p] for p in s] for other in ins[1:]):
                    for other in ins[1:]:
                        for pa, pb in zip(s, other, strict=True):
                            ra, rb = find(pa), find(pb)
                            if ra != rb:
                                parent[max(ra, rb)] = min(ra, rb)
                else:  # blocks of a grouped space cut elsewhere: no permutation of the parts keeps the sum
                    fixed.update(p for parts in ins for p in parts)
                    s = fixed_space(shapes[node.name].channels)
            elif node.op == "slice":  # the input cut at the slice's ends: the pieces between them
                start, stop = node.channel_range
                pieces = cut(expand(ins[0]), {start, stop})
                offsets = [0, *itertools.accumulate(size[p] for p in pieces)]
                s = tuple(p for p, a in zip(pieces, offsets, strict=False) if start <= a < stop)
            elif node.op == "pad" and any(node.channel_padding):  # zero channels around the input's: own parts
                before, after = node.channel_padding
                s = ins[0]
                for n_zero, where in ((before, "before"), (after, "after")):
                    if n_zero:
                        z = new()
                        size[z], opened[z] = n_zero, f"{node.name}.{where}"
                        s = (z, *s) if where == "before" else (*s, z)
            else:
                s = ins[0]
            space[node.name] = s
        space = {k: expand(v) for k, v in space.items()}  # split spaces as their parts
        for node in self.nodes:  # a feature map flattened for dense layers whose space was cut: fixed (as a
            if node.op == "flatten" and node.name in repeats and len(space[node.name]) > 1:  # concatenation's)
                fixed.update(space[node.name])
        fixed.update(space[self.nodes[-1].name])
        fixed_roots = {p for s in fixed for p in expand((s,))}
        blocked: dict[int, list[tuple[int, int, bool]]] = {}  # root -> (groups, variable, rigid)
        for s, g, var, rigid in grouped:
            blocked.setdefault(find(s), []).append((g, var, rigid))
        group_of = {var: var for _, _, var, _ in grouped}  # union-find of group variables

        def group(v: int) -> int:
            while group_of[v] != v:
                v = group_of[v]
            return v

        packed = {find(p) for parts in space.values() if len(parts) > 1 for p in parts}
        flattened = {find(p) for node in self.nodes if node.op == "flatten" and node.name in repeats
                     for p in space[self.inputs_of(node)[0]]}
        for root, recs in blocked.items():
            counts = {g for g, _, _ in recs}
            # groups of two sizes on one space, a grouped space packed into a concatenation, or whole
            # blocks flattened for a dense layer (a repeat within a repeat): fixed
            if len(counts) > 1 or root in packed or (
                    root in flattened and any(rigid for _, _, rigid in recs) and size[root] > recs[0][0]):
                fixed_roots.add(root)
            for _, var, _ in recs[1:]:
                group_of[group(var)] = group(recs[0][1])
        changed = True
        while changed:  # a concatenation moves all its parts or none; blocks of one group move together
            changed = False
            for parts in space.values():
                roots = {find(p) for p in parts}
                if len(roots) > 1 and not roots.isdisjoint(fixed_roots) and not roots <= fixed_roots:
                    fixed_roots |= roots
                    changed = True
            held = {group(var) for root, recs in blocked.items() if root in fixed_roots for _, var, _ in recs}
            for root, recs in blocked.items():
                if root not in fixed_roots and any(group(var) in held for _, var, _ in recs):
                    fixed_roots.add(root)
                    changed = True
        names: dict[int, Entry | None] = {}
        for s in sorted(parent):
            root = find(s)
            if root in fixed_roots:
                names[s] = None
            else:
                first = min(t for t in parent if find(t) == root and t in opened)
                names[s] = f"P_{opened[first]}"
        group_names: dict[int, str] = {}
        for root in sorted(blocked, key=lambda r: (all(rigid for _, _, rigid in blocked[r]), r)):
            if root not in fixed_roots:
                group_names.setdefault(group(blocked[root][0][1]), f"{names[root]}/groups")
        blocks: dict[str, tuple[str, int, int]] = {}
        for root, recs in blocked.items():
            if root in fixed_roots:
                continue
            g, name = recs[0][0], group_names[group(recs[0][1])]
            if any(rigid for _, _, rigid in recs):  # whole blocks: the group permutation on each block's channels
                entry: Entry = name if size[root] == g else Repeat(name, size[root] // g)
                names.update({s: entry for s in parent if find(s) == root})
            else:
                blocks[str(names[root])] = (name, g, size[root])
        return {k: tuple(find(p) for p in v) for k, v in space.items()}, names, blocks, size

    def _repeats(self) -> dict[str, int]:
        """Flatten nodes of a feature map larger than 1 x 1, of one layer's channels, read by dense
        layers only: each to the entries per channel (``h * w``) of its output."""
        shapes = self.shapes()
        readers: dict[str, list[Node]] = {}
        for node in self.nodes:
            for name in self.inputs_of(node):
                readers.setdefault(name, []).append(node)
        out: dict[str, int] = {}
        for node in self.nodes:
            if node.op != "flatten":
                continue
            src = self.inputs_of(node)[0]
            spatial = shapes[src].spatial
            if spatial is None or _is_point(spatial) or src == "<input>" or node is self.nodes[-1]:
                continue
            if self.node(src).op == "concat" or not all(r.op == "dense" for r in readers.get(node.name, [])):
                continue
            out[node.name] = math.prod(spatial)
        return out

    def _entries(self, spaces: tuple[Any, ...] | None = None) -> dict[str, Entry]:
        """Every node's output channels as a spec entry: a permutation name, None, the names of
        a concatenation's parts (the segments of a packed axis), or for a flattened feature map
        its channels' permutation repeated over the positions (:class:`~combinability.Repeat`).
        ``spaces``: :meth:`_spaces`, when the caller has it."""
        space, names, *_ = self._spaces() if spaces is None else spaces
        repeats = self._repeats()
        out: dict[str, Entry] = {}
        for node_name, parts in space.items():
            named = tuple(names[p] for p in parts)
            out[node_name] = named[0] if len(named) == 1 else None if named[0] is None else named
            if node_name in repeats and isinstance(out[node_name], str):
                out[node_name] = Repeat(out[node_name], repeats[node_name], self.node(node_name).channels_last)
        return out

    def spec(self) -> PermutationSpec:
        """The permutation spec of the table's parameters (reference convention).

        A layer reading a concatenation binds that axis to its parts' permutations, as the
        segments of a packed axis (see :class:`~combinability.PermutationSpec`); one reading a
        flattened image, to the image's channel permutation repeated over the positions
        (:class:`~combinability.Repeat`).
        """
        spaces = self._spaces()
        entry = self._entries(spaces)
        shapes = self.shapes()
        axes: dict[str, tuple[Any, ...]] = {}
        for node in self.nodes:
            p_in = entry[self.inputs_of(node)[0]]
            p_out = entry[node.name]
            if node.op == "dense":
                axes[f"{node.name}.weight"] = (p_out, p_in)
            elif node.op == "conv":  # grouped: the input axis runs within a group (depthwise: length 1)
                kernel_axes = len(shapes[self.inputs_of(node)[0]].spatial or (0, 0))
                axes[f"{node.name}.weight"] = (p_out, p_in if node.groups == 1 else None, *(None,) * kernel_axes)
            elif node.op == "conv_transpose":  # (in, out, *kernel)
                kernel_axes = len(shapes[self.inputs_of(node)[0]].spatial or ())
                axes[f"{node.name}.weight"] = (p_in, p_out, *(None,) * kernel_axes)
            elif node.op == "norm":
                trailing = len(shapes[self.inputs_of(node)[0]].spatial or ()) if node.norm == "layernorm_map" else 0
                for leaf in node.norm_leaves():  # a LayerNorm over the whole map: its positions stay
                    axes[f"{node.name}.{leaf}"] = (p_out, *(None,) * trailing)
                if node.norm == "batchnorm":
                    axes[f"{node.name}.running_mean"] = (p_out,)
                    axes[f"{node.name}.running_var"] = (p_out,)  # the counter is left alone
                continue
            elif node.op == "prelu":  # one slope per channel moves with the channels; a shared one stays
                axes[f"{node.name}.weight"] = (p_out if node.units > 1 else None,)
                continue
            elif node.op in ("scale", "shift"):  # the factors (offsets) move with their channels; a shared one stays
                trailing = len(shapes[self.inputs_of(node)[0]].spatial or ()) if node.keepdims else 0
                shared = node.units == 1 and shapes[self.inputs_of(node)[0]].channels != 1
                axes[node.parameter_name()] = ((None,) * node.batch_axis + (None if shared else p_out,)
                                               + (None,) * trailing)
                continue
            else:
                continue
            if node.bias:
                axes[f"{node.name}.bias"] = (p_out,)
        kinds = {p: Blocks(group, groups, channels // groups) for p, (group, groups, channels) in spaces[2].items()}
        return PermutationSpec(axes, kinds)

    def feature_points(self) -> tuple[str, ...]:
        """Every node whose output is a set of hidden features (all but the logits)."""
        return tuple(n.name for n in self.nodes[:-1] if n.op != "flatten")

    def activation_parts(self) -> dict[str, tuple[str, int, int]]:
        """For each permutation that moves only a part of every feature point's channels (a piece of
        a stream between an option-A shortcut's zero channels), ``(point, start, stop)``: the
        point and its channels ``start:stop`` that it reorders (the last activation output holding
        it, else the last node).
        """
        space, names, _, size = self._spaces()
        whole = set(self.activation_points())
        multipliers = self._multipliers()
        parts: dict[str, tuple[str, int, int]] = {}
        relu: dict[str, tuple[str, int, int]] = {}
        for node in self.nodes[:-1]:
            if node.op == "flatten" or len(space[node.name]) < 2:
                continue
            start = 0
            for piece in space[node.name]:
                name = names[piece]
                if isinstance(name, str) and name not in whole:
                    parts[name] = (node.name, start, start + size[piece])
                    if node.op in ("relu", "act", "gate") and node.name not in multipliers:
                        relu[name] = parts[name]
                start += size[piece]
        return {p: relu.get(p, pt) for p, pt in parts.items()}

    def activation_points(self) -> dict[str, str]:
        """For each permutation, the feature point whose units it reorders.

        The last activation output in the permutation's space (for a residual stream: the
        output of its last block); the last node in that space when it has no activation. An
        activation that only multiplies other values (a squeeze-and-excitation gate ``x * σ(s)``,
        the gate of a gated unit) is not read: its units are functions of the gate's few inputs and
        barely tell the channels apart; the product is.
        """
        entry = self._entries()
        points: dict[str, str] = {}
        for node in self.nodes[:-1]:
            p = entry[node.name]
            if isinstance(p, str) and node.op != "flatten":  # not fixed, nor a concatenation of several
                points[p] = node.name
        activations = self._activations_by_space()
        return {p: activations[p][-1] if p in activations else pt for p, pt in points.items()}

    def activation_observations(self) -> dict[str, tuple[str, ...]]:
        """For each permutation whose space has more than one activation output, every one of them in order
        (a residual stream's: the stem's and each block's output), gates that only multiply left out as in
        :meth:`activation_points`.

        The units of a residual stream keep their identity through every block: activation matching
        reads them at each of these points and sums their correlations, so that a channel silent at one
        point (a dead ReLU at the last block) is still told apart by the others.
        """
        return {p: tuple(pts) for p, pts in self._activations_by_space().items() if len(pts) > 1}

    def _activations_by_space(self) -> dict[str, list[str]]:
        """The activation outputs of each permutation's space, in order, gates that only multiply left out."""
        entry, multipliers = self._entries(), self._multipliers()
        out: dict[str, list[str]] = {}
        for node in self.nodes[:-1]:
            p = entry[node.name]
            if isinstance(p, str) and node.op in ("relu", "act", "gate") and node.name not in multipliers:
                out.setdefault(p, []).append(node.name)
        return out

    def _multipliers(self) -> set[str]:
        """The nodes whose every reader is a ``mul`` node (gates); the output node is read by none."""
        readers: dict[str, list[str]] = {}
        for node, reads, _ in self.schedule:
            for source in reads:
                readers.setdefault(source, []).append(node.op)
        return {name for name, ops in readers.items() if all(op == "mul" for op in ops)}

    # -- asymmetric layers: frozen arrays ------------------------------------------------
    def frozen_weights(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The frozen entries of every W-Asymmetric weight: ``{name: (mask, values)}``.

        Reference convention and the weight's shape; ``mask`` is boolean, ``values`` float32
        (0 off the mask). The layer computes with ``where(mask, values, weight)``: the stored
        weight's entries under the mask are never used (training keeps them at ``values``).
        Each node draws from ``numpy.random.default_rng([node.seed, crc32(node.name)])``:
        first ``u = rng.random((units, fan_in))``, each unit freezing the ``fixed`` positions of
        its fan-in (flattened ``in x kernel x kernel``) with the smallest ``u``; then
        ``rng.standard_normal((units, fixed)) * node.scale`` for them, in increasing position order.

        Examples
        --------
        >>> t = LayerTable("w", (6,), 2, (Node("fc", "dense", units=3, fixed=2, seed=1), Node("out", "dense", units=2)))
        >>> mask, values = t.frozen_weights()["fc.weight"]
        >>> mask.sum(axis=1).tolist(), bool(np.all(values[~mask] == 0))
        ([2, 2, 2], True)
        """
        params = self.parameters()
        out = {}
        for node in self.nodes:
            if not node.fixed:
                continue
            shape = params[f"{node.name}.weight"][0]
            units, fan_in = shape[0], int(np.prod(shape[1:]))
            rng = _node_rng(node)
            chosen = np.sort(np.argsort(rng.random((units, fan_in)), axis=1, kind="stable")[:, : node.fixed], axis=1)
            mask = np.zeros((units, fan_in), dtype=bool)
            np.put_along_axis(mask, chosen, True, axis=1)
            values = np.zeros((units, fan_in), dtype=np.float64)
            np.put_along_axis(values, chosen, rng.standard_normal((units, node.fixed)) * node.scale, axis=1)
            out[f"{node.name}.weight"] = (mask.reshape(shape), values.astype(np.float32).reshape(shape))
        return out

    def gate_matrix(self, name: str) -> np.ndarray:
        """The frozen ``(c, c)`` float32 matrix ``G`` of the ``"gate"`` node ``name``: ``x * sigmoid(G x)``.

        Drawn as ``default_rng([node.seed, crc32(node.name)]).standard_normal((c, c)) * node.scale``
        (rows: output channels).

        Raises
        ------
        ConfigurationError
            If ``name`` is not a gate node (the error lists the gate nodes).
        """
        gates = [n.name for n in self.nodes if n.op == "gate"]
        if name not in gates:
            raise ConfigurationError(f"layer table {self.name!r}: {name!r} is not a gate node; gate nodes: {gates}")
        node = self.node(name)
        c = self.shapes()[self.inputs_of(node)[0]].channels
        return (_node_rng(node).standard_normal((c, c)) * node.scale).astype(np.float32)

    @property
    def asymmetric(self) -> bool:
        """Whether any node is W- or σ-Asymmetric."""
        return any(n.asymmetric for n in self.nodes)

    # -- layers (stitching, per-layer plots) ---------------------------------------------
    def _node_layers(self) -> dict[str, str]:
        current = ""
        out = {}
        for node in self.nodes:
            if node.layer:
                current = node.layer
            elif node.op in ("dense", "conv", "conv_transpose"):
                current = node.name
            out[node.name] = current or node.name
        return out

    def layer_names(self) -> list[str]:
        """Names of the ordered layers (groups of parametrised nodes)."""
        names: list[str] = []
        node_layer = self._node_layers()
        for node in self.nodes:
            if node.op in ("dense", "conv", "conv_transpose", "norm", "prelu", "scale", "shift") \
                    and node_layer[node.name] not in names:
                names.append(node_layer[node.name])
        return names

    def layers(self) -> dict[str, int]:
        """Layer index (0-based, forward order) of every parameter and buffer."""
        order = {name: i for i, name in enumerate(self.layer_names())}
        node_layer = self._node_layers()
        constants = self.input_constants  # read before the first layer: its layer's
        return {p: 0 if p in constants else order[node_layer[self.node_of(p).name]] for p in self.parameters()}

    # -- torch <-> flax --------------------------------------------------------------------
    def flax_names(self) -> dict[str, str]:
        """Reference name -> flax name (``"collection/module/leaf"``, module dots become :attr:`flax_sep`)."""
        out = {}
        constants = self.input_constants  # a traced torch model's: flax models hold none
        for ref in self.parameters():
            if ref in constants:
                continue
            node = self.node_of(ref)
            module, leaf = (node.name, node.leaf) if node.op in ("scale", "shift") else ref.rsplit(".", 1)
            mod = module.replace(".", self.flax_sep)
            if node.op == "norm":
                flax_leaf = {"weight": "params/scale", "bias": "params/bias", "running_mean": "batch_stats/mean",
                             "running_var": "batch_stats/var", "num_batches_tracked": "counters/count"}[leaf]
            elif node.op == "prelu":
                flax_leaf = "params/negative_slope"
            elif node.op in ("scale", "shift"):
                flax_leaf = f"params/{leaf}"
            else:
                flax_leaf = {"weight": "params/kernel", "bias": "params/bias"}[leaf]
            collection, leaf_name = flax_leaf.split("/")
            out[ref] = f"{collection}/{mod}/{leaf_name}"
        return out

    def norm_nodes(self) -> list[Node]:
        """The normalisation nodes, in forward order."""
        return [n for n in self.nodes if n.op == "norm"]

    def producer(self, name: str) -> Node | None:
        """The dense or conv node whose output channels reach node ``name`` (None: the input).

        Walks back through channel-keeping nodes; for an addition, the first input; None
        through a concatenation.
        """
        node = self.node(name)
        while True:
            src = self.inputs_of(node)[0]
            if src == "<input>":
                return None
            node = self.node(src)
            if node.op in ("dense", "conv", "conv_transpose"):
                return node
            if node.op in ("flatten", "concat"):  # a concatenation's channels come from several layers
                return None

    def producers(self, name: str) -> list[tuple[Node | None, int]]:
        """The layers whose output channels reach node ``name``, as ``(producer, channels)`` in channel order.

        One entry (:meth:`producer`), or one per part of a concatenation on the way (each part
        walked back in turn).

        Examples
        --------
        >>> t = LayerTable("c", (3,), 2, (Node("a", "dense", units=4), Node("b", "dense", ("<input>",), units=2),
        ...                               Node("ab", "concat", ("a", "b")), Node("n", "norm"),
        ...                               Node("o", "dense", units=2)))
        >>> [(p.name, c) for p, c in t.producers("n")]
        [('a', 4), ('b', 2)]
        """
        shapes = self.shapes()

        def walk(src: str) -> list[tuple[Node | None, int]]:
            while src != "<input>":
                node = self.node(src)
                if node.op in ("dense", "conv", "conv_transpose"):
                    return [(node, shapes[src].channels)]
                if node.op == "flatten":
                    break
                if node.op == "concat":
                    return [part for i in self.inputs_of(node) for part in walk(i)]
                src = self.inputs_of(node)[0]
            return [(None, shapes[src].channels)]

        return walk(self.inputs_of(self.node(name))[0])

    def node(self, name: str) -> Node:
        """The node called ``name``."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def node_of(self, parameter: str) -> Node:
        """The node holding ``parameter`` (a scale or shift node's :meth:`~Node.parameter_name`, else the node
        named by all but its last part)."""
        for n in self.nodes:
            if n.op in ("scale", "shift") and n.parameter_name() == parameter:
                return n
        return self.node(parameter.rsplit(".", 1)[0])

    def to_flax(self, params: Mapping[str, Any], xp: Any = np) -> dict[str, Any]:
        """Reference-convention arrays to flax names and axes (dense and conv kernels transposed)."""
        names = self.flax_names()
        out = {}
        for ref, value in params.items():
            op = self.node_of(ref).op
            if ref.endswith(".weight") and op == "dense":
                value = xp.permute_dims(value, (1, 0)) if xp is not np else np.transpose(value)
            elif ref.endswith(".weight") and op == "conv":  # (out, in, *kernel) -> (*kernel, in, out)
                order = (*range(2, len(value.shape)), 1, 0)
                value = xp.permute_dims(value, order) if xp is not np else np.transpose(value, order)
            elif ref.endswith(".weight") and op == "conv_transpose":
                # (in, out, *kernel) -> (*kernel, in, out), the kernel reversed: flax's ConvTranspose
                # (transpose_kernel=False) correlates the stride-dilated input with its kernel as it is
                order = (*range(2, len(value.shape)), 0, 1)
                spatial = tuple(range(len(value.shape) - 2))
                value = (xp.flip(xp.permute_dims(value, order), axis=spatial) if xp is not np
                         else np.flip(np.transpose(value, order), axis=spatial))
            elif op in ("scale", "shift"):  # (units, 1, 1) -> (units,): flax broadcasts over the last (channel) axis
                value = xp.reshape(value, (-1,)) if xp is not np else np.reshape(value, -1)
            elif op == "norm" and len(value.shape) > 1:  # a LayerNorm over the map: (C, H, W) -> (H, W, C)
                order = (*range(1, len(value.shape)), 0)
                value = xp.permute_dims(value, order) if xp is not np else np.transpose(value, order)
            out[names[ref]] = value
        return out

    def from_flax(self, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Inverse of :meth:`to_flax` (numpy arrays)."""
        back = {v: k for k, v in self.flax_names().items()}
        unknown = [k for k in params if k not in back]
        if unknown:
            raise LayoutError(f"flax arrays {unknown[:8]} are not in the {self.name!r} layer table")
        out, shapes = {}, self.parameters()
        for key, value in params.items():
            ref = back[key]
            op = self.node_of(ref).op
            value = np.asarray(value)
            if ref.endswith(".weight") and op == "dense":
                value = value.T
            elif ref.endswith(".weight") and op == "conv":  # (*kernel, in, out) -> (out, in, *kernel)
                value = np.transpose(value, (value.ndim - 1, value.ndim - 2, *range(value.ndim - 2)))
            elif ref.endswith(".weight") and op == "conv_transpose":  # reversed (*kernel, in, out) -> (in, out, *k)
                spatial = tuple(range(value.ndim - 2))
                value = np.transpose(np.flip(value, axis=spatial), (value.ndim - 2, value.ndim - 1, *spatial))
            elif op in ("scale", "shift"):
                value = value.reshape(shapes[ref][0])
            elif op == "norm" and value.ndim > 1:  # (H, W, C) -> (C, H, W)
                value = np.moveaxis(value, -1, 0)
            out[ref] = value
        return {k: out[k] for k in shapes if k in out}
