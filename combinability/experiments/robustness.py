"""§6.3 (fig 14): robustness of the combination to corrupted unit pairings.

For one permutation (layer) at a time, the ``k`` unit pairs with the lowest activation
correlation are re-matched by a random derangement, and the linear path between A and
the re-permuted B is measured. Re-permuting B leaves it functionally identical, so the
end models are unchanged; only the pairing used by the combination is corrupted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from combinability.analysis.llfc import resolve_data
from combinability.combination import combine
from combinability.errors import ConfigurationError, IncompatibleModelsError
from combinability.evaluation import CrossMoments, Evaluator
from combinability.experiments.compare import reuse_or_run
from combinability.matching import perturb_permutation
from combinability.permutation import apply_permutation, compose_permutations, invert_permutation
from combinability.results import data_digest, provenance

if TYPE_CHECKING:
    from combinability.data.base import ArrayDataset
    from combinability.pair import ModelPair

__all__ = ["alignment_robustness", "check_settings"]


def check_settings(*, steps: int, lambdas: Sequence[float], examples: int, limit: int | None = None,
                   prefix: str = "") -> None:
    """Check the experiment's settings before any work.

    Parameters
    ----------
    steps, lambdas, examples, limit
        As :func:`alignment_robustness` takes them.
    prefix : str
        Put before each setting's name in the message (``"--"`` names the command line's options).

    Raises
    ------
    ConfigurationError
        If ``steps`` or ``limit`` is below 1, ``examples`` below 2 (a correlation needs two), or
        ``lambdas`` is empty or holds a point outside the linear path ``[0, 1]`` (§6.3 measures the
        barrier between A and the re-permuted B, not beyond them).
    """
    for name, value, least in (("steps", steps, 1), ("examples", examples, 2), ("limit", limit, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | np.integer)
                                  or value < least):
            raise ConfigurationError(f"{prefix}{name} must be an integer >= {least}, got {value!r}")
    outside = [float(x) for x in lambdas if not 0.0 <= float(x) <= 1.0]
    if not len(lambdas) or outside:
        raise ConfigurationError(f"{prefix}lambdas must be points of the linear path between A and B, in [0, 1] "
                                 f"(e.g. 0.25,0.5,0.75), got {[float(x) for x in lambdas]}")


def pair_scores(moments: CrossMoments) -> tuple[np.ndarray, np.ndarray]:
    """The score of each matched pair (A's unit ``j`` and B's aligned unit ``j``), lowest re-matched first, and
    which pairs are silent.

    A pair's score is its activation correlation. Where both units are constant on the data (dead ReLUs: their
    correlation is undefined, and re-pairing them among themselves moves nothing the data sees), the pair is
    *silent* and scores ``+inf``: re-matched last, once ``k`` passes the pairs that were observed. A pair with
    one constant unit scores 0 (:meth:`CrossMoments.correlation`).
    """
    still_a, still_b = moments.constant()
    still = still_a & still_b
    return np.where(still, np.inf, np.diag(moments.correlation())), still


def alignment_robustness(
    pair: ModelPair,
    data: str | tuple[Any, Any] | ArrayDataset,
    *,
    permutations: Sequence[str] | None = None,
    steps: int = 8,
    lambdas: Sequence[float] = (0.25, 0.5, 0.75),
    split: str = "test",
    limit: int | None = None,
    examples: int = 2000,
    seed: int = 0,
    batch_size: int = 1000,
    out: str | Path | None = None,
    overwrite: bool = False,
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Barriers of the linear path after re-matching the ``k`` weakest pairs of one layer.

    Parameters
    ----------
    pair : ModelPair
        A pair aligned with a permutation (``pair.align(...)``).
    data : str, (x, y) or ArrayDataset
        Dataset name (``split`` is evaluated; the train split gives the activations)
        or the evaluation data itself, as arrays or a dataset (then also used for the
        activations).
    permutations : sequence of str, optional
        Which permutations (layers) to perturb; default all.
    steps : int
        Number of ``k`` values per layer, equidistant from 2 to the layer's unit count N.
    lambdas : sequence of float
        Interior points of the linear path where the barrier is measured, in ``[0, 1]``.
    examples : int
        Training examples whose activations order the pairs.
    out : path, optional
        Write the result there; an existing result of the same settings is returned as
        is, another file is refused unless ``overwrite=True``.
    attrs : mapping, optional
        Extra attributes stored in the result.

    Returns
    -------
    xarray.Dataset
        ``loss_barrier`` and ``accuracy_barrier`` with dims ``(permutation, step)`` and
        coordinate ``k`` (pairs re-matched, NaN-free int; ``units`` per permutation);
        ``baseline_*`` hold the unperturbed barriers; ``silent_pairs`` per permutation the pairs
        whose two units are both constant on the activation data (dead), which are re-matched
        last (:func:`pair_scores`).

    Raises
    ------
    ConfigurationError
        For settings out of range (:func:`check_settings`), before any work.
    IncompatibleModelsError
        If the pair is not aligned with a permutation, or ``permutations`` names an unknown one.
    """
    check_settings(steps=steps, lambdas=lambdas, examples=examples, limit=limit)
    if pair.permutation is None:
        raise IncompatibleModelsError("align the pair first: the experiment perturbs its permutation")
    eval_data = resolve_data(pair, data, split, limit)  # a name's split, (x, y) or a dataset, checked
    key = {"experiment": "robustness", "models": pair.fingerprints(), "permutations": permutations,
           "steps": steps, "lambdas": [float(x) for x in lambdas], "split": split,
           "data": {"name": eval_data.name, "examples": len(eval_data),
                    "sha256": data_digest(eval_data.x, eval_data.y)},
           "examples": examples, "seed": seed, "order": "correlation, silent pairs last",
           "batch_size": batch_size, "evaluation": repr(pair.backend_obj)}

    def run(o: Path | None) -> xr.Dataset:
        be = pair.backend_obj
        points = pair.feature_points
        names = list(permutations) if permutations is not None else list(points)
        unknown = [p for p in names if p not in points]
        if unknown:
            raise IncompatibleModelsError(f"unknown permutation(s) {unknown}; valid: {', '.join(points)}")
        act_data = resolve_data(pair, data, "train").subset(examples, seed=0) if isinstance(data, str) \
            else resolve_data(pair, data, split)  # the data given, whole
        wanted = list(dict.fromkeys(points[p] for p in names))
        layout = pair.layout
        evaluator = Evaluator(be, pair.template, layout, batch_size=batch_size)
        # streamed: B as aligned, so its unit j pairs with A's unit j; no activations are held
        moments = evaluator.moments(pair.theta_a, pair.theta_b, act_data, wanted)
        # a perturbed alignment as a move of B *as aligned* (undo the alignment's permutation, take the
        # perturbed one), in the aligned pair's own parameters (a transformer's are norm-folded), by permutations
        by_permutation = pair.spec.permutations_only()
        aligned_b = pair.params("b")
        undo = invert_permutation(pair.permutation)
        ta = be.asarray(pair.theta_a)
        ends = evaluator.evaluate([ta, be.asarray(pair.theta_b)], eval_data)
        ref_loss = 0.5 * (ends[0].loss + ends[1].loss)
        ref_acc = 0.5 * (ends[0].accuracy + ends[1].accuracy)

        def path_barriers(theta_b: np.ndarray) -> tuple[float, float]:
            tb = be.asarray(theta_b)
            evs = evaluator.evaluate([combine(ta, tb, float(lam)) for lam in lambdas], eval_data)
            # numpy's max and min: a NaN (diverged) combination makes the barrier NaN wherever it is on the
            # path (Python's max keeps or drops a NaN depending on its position)
            losses = np.asarray([e.loss for e in evs], dtype=np.float64)
            accs = np.asarray([e.accuracy for e in evs], dtype=np.float64)
            return float(np.max(losses)) - ref_loss, ref_acc - float(np.min(accs))

        base_loss, base_acc = path_barriers(pair.theta_b)
        rng = np.random.default_rng(seed)
        units = {p: len(pair.permutation[p]) for p in names}
        ks = {p: np.unique(np.round(np.linspace(2, units[p], steps)).astype(int)) for p in names}
        width = max(len(v) for v in ks.values())
        loss_b = np.full((len(names), width), np.nan)
        acc_b = np.full((len(names), width), np.nan)
        k_coord = np.full((len(names), width), -1, dtype=np.int64)
        silent = np.zeros(len(names), dtype=np.int64)
        for r, p in enumerate(names):
            scores, still = pair_scores(moments[points[p]])
            silent[r] = int(still.sum())
            for c, k in enumerate(ks[p]):
                perturbed = perturb_permutation(pair.permutation, p, scores, int(k), seed=rng)
                move = compose_permutations(undo, perturbed)
                theta_b = layout.flatten(apply_permutation(by_permutation, move, aligned_b))
                loss_b[r, c], acc_b[r, c] = path_barriers(theta_b)
                k_coord[r, c] = k
        ds = xr.Dataset(
            {
                "loss_barrier": (("permutation", "step"), loss_b),
                "accuracy_barrier": (("permutation", "step"), acc_b),
                "baseline_loss_barrier": ((), base_loss),
                "baseline_accuracy_barrier": ((), base_acc),
                "silent_pairs": ("permutation", silent),
            },
            coords={"permutation": names, "step": np.arange(width), "k": (("permutation", "step"), k_coord),
                    "units": ("permutation", [units[p] for p in names])},
            attrs=provenance(combinability_format="robustness", architecture=pair.architecture,
                             width=float(pair.width), backend=pair.backend, split=split, seed=seed,
                             lambdas=[float(x) for x in lambdas], alignment=pair.alignment,
                             fingerprints=pair.fingerprints(), **dict(attrs or {})),
        )
        return ds

    return reuse_or_run(out, key, run, overwrite=overwrite)
