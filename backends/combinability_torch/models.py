"""The generic torch builder: one :class:`TableNet` module interprets any layer table.

Submodules sit at the table's node paths (``stage0_block0.conv1``), so the state names
are the table's reference names. LayerNorm normalises the channel axis at every
position (:class:`ChannelLayerNorm`); inputs are channels-first.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from combinability.layers import LayerTable, Node

__all__ = ["ChannelLayerNorm", "TableNet"]


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis (axis 1) at every position of an ``(n, c, ...)`` tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_channels, self.eps = num_channels, eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.movedim(1, -1), (self.num_channels,), self.weight, self.bias, self.eps).movedim(-1, 1)


def _module(node: Node, c_in: int, rank: int) -> nn.Module | None:
    if node.op == "dense":
        return nn.Linear(c_in, node.units, bias=node.bias)
    if node.op == "conv":
        return nn.Conv2d(c_in, node.units, node.kernel, stride=node.stride, padding=node.padding, bias=node.bias)
    if node.op == "norm" and node.norm == "batchnorm":
        return (nn.BatchNorm2d if rank == 4 else nn.BatchNorm1d)(c_in, eps=node.eps)
    if node.op == "norm" and node.norm == "groupnorm":
        return nn.GroupNorm(node.groups, c_in, eps=node.eps)
    if node.op == "norm":
        return ChannelLayerNorm(c_in, node.eps)
    return None


class TableNet(nn.Module):
    """A torch network interpreting a :class:`~combinability.layers.LayerTable`.

    ``forward(x, taps=None)``: when ``taps`` is a dict whose keys are node names, the
    outputs of those nodes are stored into it (the library's feature taps).
    """

    def __init__(self, table: LayerTable) -> None:
        super().__init__()
        self.table = table
        shapes = table.shapes()
        for node in table.nodes:
            src = shapes[table.inputs_of(node)[0]]
            module = _module(node, src.channels, 4 if src.spatial is not None else 2)
            if module is not None:
                parent = self
                *path, leaf = node.name.split(".")
                for part in path:
                    if not hasattr(parent, part):
                        parent.add_module(part, nn.Module())
                    parent = getattr(parent, part)
                parent.add_module(leaf, module)
        self._modules_by_node = {n.name: self.get_submodule(n.name) for n in table.nodes
                                 if n.op in ("dense", "conv", "norm")}

    def forward(self, x: torch.Tensor, taps: dict[str, Any] | None = None) -> torch.Tensor:
        values: dict[str, torch.Tensor] = {"<input>": x}
        table = self.table
        for node in table.nodes:
            ins = [values[i] for i in table.inputs_of(node)]
            h = ins[0]
            if node.op in ("dense", "conv", "norm"):
                h = self._modules_by_node[node.name](h)
            elif node.op == "relu":
                h = F.relu(h)
            elif node.op == "act":
                h = getattr(F, node.fn)(h)
            elif node.op == "flatten":
                h = h.flatten(1)
            elif node.op == "avgpool":
                h = h.mean(dim=(2, 3))
            elif node.op == "maxpool":
                if min(h.shape[-2:]) >= node.kernel:
                    pool = F.avg_pool2d if node.fn == "avg" else F.max_pool2d
                    h = pool(h, node.kernel, max(1, node.stride), node.padding)
            elif node.op == "add":
                h = ins[0]
                for other in ins[1:]:
                    h = h + other
            values[node.name] = h
            if taps is not None and node.name in taps:
                taps[node.name] = h
        return h
