"""The coefficient vectors behind a sweep's evaluations, drawn again.

A sweep stores losses and accuracies, not the ``d`` coefficients of each combined model: they are
drawn from a stream seeded by the sweep's seed, the parameter value's index, the sample and the
sampler's name (:func:`combinability.sweeps.sample_seed`), so they can be drawn again exactly.
:func:`sweep_coefficients` does, for the pair the sweep evaluated: the combined model of a cell is
then ``(1 − v) ⊙ θ_A + v ⊙ θ_B`` (``pair.theta_a``, ``pair.theta_b``), which a user can load into their
own model, inspect per layer or evaluate elsewhere.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from combinability.errors import ConfigurationError, IncompatibleModelsError

if TYPE_CHECKING:
    import xarray as xr

    from combinability.sets import ModelSet

__all__ = ["sweep_coefficients"]


def sweep_coefficients(pair: ModelSet, result: xr.Dataset, value: float, sample: int = 0) -> Any:
    """The coefficients ``v`` with which a sweep combined ``pair`` at one parameter value and sample.

    Parameters
    ----------
    pair : ModelPair
        The pair the sweep evaluated (the same end vectors: its fingerprints are checked), on the
        backend and device the sweep drew on.
    result : xarray.Dataset
        The sweep's result (:func:`combinability.sweep`, or a file read by :func:`combinability.open_results`).
    value : float
        A value of the sweep's parameter (its coordinate, e.g. ``s`` of :class:`~combinability.Uniform`).
    sample : int
        The sample at that value.

    Returns
    -------
    numpy.ndarray, float32 ``(d,)``
        ``v``, B's weight per parameter; for a three-model sweep (:class:`~combinability.Triangle`) the
        pair ``(v_b, v_c)``.

    Raises
    ------
    ConfigurationError
        If ``result`` is not a sweep's, ``value`` or ``sample`` is not one of its coordinates, or the pair
        is on another backend or device than the sweep drew on.
    IncompatibleModelsError
        If the pair's end vectors are not the sweep's.

    Examples
    --------
    >>> import combinability as cb
    >>> a, b = (cb.train("mlp", "digits", seed=s, epochs=1, width=0.125) for s in (0, 1))
    >>> pair = cb.ModelPair(a, b)
    >>> ds = cb.sweep(pair, cb.Uniform(), data="digits", values=[0.25], samples=2, splits=["test"])
    >>> v = cb.sweep_coefficients(pair, ds, 0.25, sample=1)
    >>> bool(v.min() >= 0.25 and v.max() <= 0.75), v.shape == pair.theta_a.shape
    (True, True)
    """
    from combinability.samplers import get_sampler
    from combinability.samplers.base import DrawContext
    from combinability.sweeps import sample_seed

    attrs = result.attrs
    if attrs.get("combinability_format") != "sweep":
        raise ConfigurationError(f"not a sweep's result (format {attrs.get('combinability_format')!r}): only a "
                                 "sweep's evaluations are drawn from a seeded stream of coefficients")
    stored = json.loads(attrs["fingerprints"]) if isinstance(attrs.get("fingerprints"), str) else {}
    ours = pair.fingerprints()
    differ = [k for k, v in stored.items() if ours.get(k) != v]
    if differ:
        raise IncompatibleModelsError(f"the pair's end vectors are not the sweep's ({', '.join(differ)} differ): "
                                      "give the pair the sweep evaluated, aligned as it was")
    be = pair.backend_obj
    for what, theirs, now in (("backend", attrs.get("backend"), be.name), ("device", attrs.get("device"), be.device())):
        if theirs is not None and str(theirs) != str(now):
            raise ConfigurationError(f"the sweep drew its coefficients on {what} {theirs!r} and the pair is on "
                                     f"{now!r}: each {what} has its own random stream; give the pair on {theirs!r}")
    settings = dict(json.loads(attrs["sampler_settings"]))
    name = settings.pop("sampler")
    sampler = get_sampler(name, **{k: v for k, v in settings.items() if v is not None})
    three = "point" in result.dims
    grid = (np.stack([result[p].values for p in json.loads(attrs["parameter"])], axis=1) if three
            else result[attrs["parameter"]].values)
    wanted = np.atleast_1d(np.asarray(value, dtype=np.float64))
    hits = np.flatnonzero(np.all(np.isclose(np.reshape(grid, (len(grid), -1)), wanted, rtol=0, atol=1e-12),
                                 axis=1))
    if not len(hits):
        shown = ", ".join(f"{g:g}" for g in np.ravel(grid)[:12]) if not three else f"{len(grid)} points"
        raise ConfigurationError(f"{value!r} is not a value of the sweep's parameter {attrs['parameter']!r}; "
                                 f"valid: {shown}")
    samples = result["sample"].values.tolist()
    if sample not in samples:
        raise ConfigurationError(f"sample {sample!r} is not one of the sweep's samples 0..{len(samples) - 1}")
    index = int(hits[0])
    point = tuple(float(g) for g in grid[index]) if three else grid[index].item()
    theta_a, theta_b = be.asarray(pair.thetas[0]), be.asarray(pair.thetas[1])
    rng = be.random(sample_seed(int(attrs["seed"]), index, int(sample), sampler.name))
    drawn = sampler.draw(point, DrawContext(pair.layout, rng, theta_a=theta_a, theta_b=theta_b))
    if three:
        return tuple(np.asarray(be.to_numpy(v), dtype=np.float32) for v in drawn)
    return np.asarray(be.to_numpy(drawn), dtype=np.float32)
