"""Three models: transitivity (§5.3, fig 11a) and the triangle of combinations (§5.4, fig 11b)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from combinability.errors import IncompatibleModelsError
from combinability.samplers import Linear, Triangle
from combinability.sweeps import sweep_pairs

if TYPE_CHECKING:
    from combinability.pair import ModelPair

__all__ = ["transitivity", "three_models", "best_point"]


def _require_three(pair: ModelPair) -> None:
    if pair.theta_c is None:
        raise IncompatibleModelsError("this experiment needs three models: cb.ModelPair(a, b, model_c=c).align()")
    if not pair.is_aligned:
        raise IncompatibleModelsError("align the three models to A first: pair.align('weight')")


def transitivity(pair: ModelPair, *, out: str | Path | None = None, seed: int = 0,
                 attrs: Mapping[str, Any] | None = None, **sweep_kwargs: Any) -> xr.Dataset:
    """§5.3: interpolate between ``π_B(θ_B)`` and ``π_C(θ_C)``, both re-based to a third model A.

    Three pairs are swept along the linear path (``lam = 0`` is B, ``lam = 1`` is C):
    ``naive`` (B and C as trained), ``transitive`` (both re-based to A, never to each
    other) and ``direct`` (C aligned to B itself, the usual Git Re-Basin baseline).
    """
    _require_three(pair)
    naive_bc = pair.naive.select(1, 2)
    transitive = pair.select(1, 2)._replace(alignment="transitive", naive=naive_bc)
    direct = naive_bc.align(pair.permutation.method if pair.permutation is not None else "weight", seed=seed)

    # the labels go into the file too: its figure names the ends B and C, not A and B
    labels = {"models": "lam=0: model B, lam=1: model C; transitive: both re-based to model A", **dict(attrs or {})}
    return sweep_pairs({"naive": naive_bc, "transitive": transitive, "direct": direct}, Linear(), out=out,
                       attrs=labels, **sweep_kwargs)


def three_models(pair: ModelPair, *, resolution: int = 10, out: str | Path | None = None,
                 **sweep_kwargs: Any) -> xr.Dataset:
    """§5.4: ``(1 − λ_B − λ_C) θ_A + λ_B π_B(θ_B) + λ_C π_C(θ_C)`` over the triangle.

    Sweeps the aligned triple and the naive one along an ``alignment`` dim; the points
    are on the ``point`` dim with coordinates ``lam_b`` and ``lam_c``. See
    :func:`best_point` for the best combination.
    """
    _require_three(pair)
    return sweep_pairs({"naive": pair.naive, "aligned": pair}, Triangle(resolution=resolution), out=out,
                       **sweep_kwargs)


def best_point(ds: xr.Dataset, *, split: str = "test", alignment: str = "aligned") -> dict[str, Any]:
    """The best-accuracy point of a :func:`three_models` result.

    Returns
    -------
    dict
        ``lam_b``, ``lam_c``, ``accuracy``, ``interior`` (strictly inside the triangle),
        ``beats_all_ends`` (better than A, B and C) and the ends' accuracies.
    """
    sel = ds.sel(split=split)
    if "alignment" in sel.dims:
        sel = sel.sel(alignment=alignment)
    acc = sel["accuracy"].mean("sample")
    i = int(np.nanargmax(acc.values))
    lam_b = float(sel["lam_b"].values[i])
    lam_c = float(sel["lam_c"].values[i])
    ends = {m: float(sel[f"accuracy_{m}"]) for m in ("a", "b", "c")}
    best = float(acc.values[i])
    eps = 1e-9
    return {
        "lam_b": lam_b,
        "lam_c": lam_c,
        "accuracy": best,
        "interior": bool(lam_b > eps and lam_c > eps and lam_b + lam_c < 1 - eps),
        "beats_all_ends": bool(best > max(ends.values())),
        **{f"accuracy_{m}": v for m, v in ends.items()},
    }
