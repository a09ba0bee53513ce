"""§6.2 (fig 13): the edge lengths ``|θ_A − π(θ_B)|`` of the hyperrectangle."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from combinability import metrics
from combinability.experiments.compare import reuse_or_run
from combinability.results import provenance

if TYPE_CHECKING:
    from combinability.pair import ModelPair

__all__ = ["edge_lengths"]


def edge_lengths(pair: ModelPair, *, bins: int = 80, quantile: float = 0.999,
                 out: str | Path | None = None, overwrite: bool = False,
                 attrs: Mapping[str, Any] | None = None) -> xr.Dataset:
    """Histograms of ``|θ_A − θ_B|`` per layer, naive and aligned, on shared bins.

    Parameters
    ----------
    pair : ModelPair
        An aligned pair (its ``naive`` twin is measured too).
    bins : int
        Number of equal-width bins from 0 to the ``quantile`` of the aligned lengths
        (longer edges fall in the last bin, and are also counted in ``overflow``).
    out : path, optional
        Write the Dataset there (netCDF, atomically); an existing result of the same
        settings is returned as is, another file is refused unless ``overwrite=True``.
    attrs : mapping, optional
        Extra attributes stored in the result.

    Returns
    -------
    xarray.Dataset
        ``count`` with dims ``(alignment, layer, bin)``, ``bin_edges``, summary
        statistics per layer (``mean``, ``median``, ``fraction_below``: share of edges
        shorter than 1% of the layer's mean absolute weight).
    """
    key = {"experiment": "edge_lengths", "models": pair.fingerprints(), "bins": bins, "quantile": quantile,
           "naive_models": (pair.naive or pair).fingerprints()}
    return reuse_or_run(out, key, lambda o: _edge_lengths(pair, bins, quantile, attrs), overwrite=overwrite)


def _edge_lengths(pair: ModelPair, bins: int, quantile: float, attrs: Mapping[str, Any] | None) -> xr.Dataset:
    pairs = {"naive": pair.naive or pair, "aligned": pair}
    layer_idx = pair.layout.layer_index()
    n_layers = pair.layout.num_layers
    aligned_len = metrics.edge_lengths(pair.theta_a, pair.theta_b)
    top = float(np.quantile(aligned_len, quantile)) or 1.0
    edges = np.linspace(0.0, top, bins + 1)
    count = np.zeros((len(pairs), n_layers, bins), dtype=np.int64)
    overflow = np.zeros((len(pairs), n_layers), dtype=np.int64)
    stats = {k: np.zeros((len(pairs), n_layers)) for k in ("mean", "median", "fraction_below")}
    for a, p in enumerate(pairs.values()):
        count[a] = metrics.edge_length_histogram(p.theta_a, p.theta_b, bins=edges, layout=pair.layout).counts
        length = metrics.edge_lengths(p.theta_a, p.theta_b).astype(np.float64)
        for layer in range(n_layers):
            sel = length[layer_idx == layer]
            scale = np.mean(np.abs(p.theta_a[layer_idx == layer])) if sel.size else 1.0
            overflow[a, layer] = int(np.sum(sel > top))
            stats["mean"][a, layer] = sel.mean() if sel.size else np.nan
            stats["median"][a, layer] = np.median(sel) if sel.size else np.nan
            stats["fraction_below"][a, layer] = np.mean(sel < 0.01 * scale) if sel.size else np.nan
        count[a, :, -1] += overflow[a]  # edges longer than the last bin edge are drawn in the last bin
    names = pair.layer_names if len(pair.layer_names) == n_layers else [str(i) for i in range(n_layers)]
    ds = xr.Dataset(
        {
            "count": (("alignment", "layer", "bin"), count, {"long_name": "number of weights per edge-length bin"}),
            "overflow": (("alignment", "layer"), overflow, {"long_name": "edges longer than the last bin edge"}),
            "bin_edges": (("bin_edge",), edges),
            **{k: (("alignment", "layer"), v) for k, v in stats.items()},
        },
        coords={"alignment": list(pairs), "layer": np.arange(n_layers), "layer_name": ("layer", names)},
        attrs=provenance(combinability_format="edge_lengths", architecture=pair.architecture,
                         width=float(pair.width), backend=pair.backend, parameters=int(pair.layout.size),
                         fingerprints=pair.fingerprints(), **dict(attrs or {})),
    )
    return ds
