"""Learned matching with the straight-through estimator (STE), and the loop learned aligners share.

STE matching (Ainsworth et al., *Git Re-Basin*, ICLR 2023, §3.3) trains a copy ``θ̃`` of
the reference. Each step projects it onto the nearest permutation of the other model by
weight matching, warm-started from the previous step's permutation,
``π = argmax_π ⟨θ̃, π(θ_B)⟩``, and evaluates the loss of the combination
``(1 − v) ⊙ θ_A + v ⊙ π(θ_B)``; the gradient reaches ``θ̃`` straight through the
projection (``∂π(θ_B)/∂θ̃ := I``). The reference trains on the midpoint ``v = ½``; here
``sampler=`` trains on combinations drawn from any of the library's samplers, so the
alignment can be learned for a whole family of combinations.

:func:`learn` is the loop shared with Sinkhorn re-basin (:mod:`combinability.align.sinkhorn`):
a seeded batch order per epoch, one sampler draw per step, the backend's ``value_and_grad``
at the combination, an evaluation of the hard permutation after every epoch (the best one
seen is returned), a progress bar, and a state file written atomically after every epoch
and on Ctrl-C / SIGTERM, from which the same call resumes.

STE applies to every symmetry kind of a spec, because its projection is weight matching
(:func:`combinability.weight_matching`, which assigns heads and experts as blocks and fits a
residual stream's orthogonal map by Procrustes) and its gradient passes straight through
whatever transformation the projection found. The transformation's values keep their kind
throughout (index arrays for permutations, float matrices for orthogonal maps: in the state
file too), and the norms an orthogonal map needs folded (its ``requires``) are held fixed in
the trainable copy, so every projection sees a folded model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from combinability.align.base import AlignTask
from combinability.data.base import IGNORE_INDEX
from combinability.errors import ConfigurationError, CorruptFileError, DatasetError
from combinability.kinds import Dual, Invertible, Orthogonal
from combinability.permutation import Permutation, PermutationSpec, apply_permutation, identity_permutation
from combinability.training import batch_bounds

if TYPE_CHECKING:
    from combinability.backend import Backend
    from combinability.layout import FlatLayout

__all__ = ["LearningContext", "check_learning", "check_options", "check_settings", "learn", "start_permutation", "ste",
           "as_values"]

_STATE_VERSION = 1


@dataclass(frozen=True)
class LearningContext:
    """What a learned aligner needs besides an :class:`AlignTask`: the running models and the data.

    ``ModelSet.align`` passes it as ``context=`` to aligners registered with
    ``needs=("data", "model")``.

    Parameters
    ----------
    backend : Backend
    template : native model
        A model of the set (for the backend's ``prepare``).
    layout : FlatLayout
        Maps the task's named arrays onto flat vectors.
    data : str, (x, y), ArrayDataset, DataLoader or None
        Training data (a registered dataset's training split); None when none was given.
    input_shape : tuple of int, optional
        The shape every example must have (checked before training).
    num_classes : int, optional
        The models' number of classes (labels are checked against it).
    """

    backend: Backend
    template: Any
    layout: FlatLayout
    data: Any = None
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None


class Learner(Protocol):
    """What :func:`learn` trains: a parametrised transformation of the other model."""

    def transformed(self) -> np.ndarray:
        """The other model under the current transformation (host flat vector)."""
        ...

    def backward(self, grad_flat: np.ndarray) -> None:
        """One optimiser step from the gradient w.r.t. :meth:`transformed`'s vector."""
        ...

    def permutation(self) -> Permutation:
        """The current transformation as a hard permutation."""
        ...

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that restore the learner with :meth:`load` (references; not copied)."""
        ...

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`state` returned."""
        ...


# -- checks before training ------------------------------------------------------------------
def check_learning(name: str, task: AlignTask, context: LearningContext | None) -> LearningContext:
    """Check that a learned aligner can run, before any work: a context, data that fits, gradients.

    Returns
    -------
    LearningContext
        ``context`` with ``data`` as an :class:`~combinability.data.base.ArrayDataset`.

    Raises
    ------
    ConfigurationError
        If there is no model context or no data, or the backend gives no gradients.
    DatasetError
        If the data's examples do not have the models' input shape, its labels exceed the
        models' classes, or the model fails on it.
    """
    from combinability.data.convert import as_dataset, check_labels
    from combinability.evaluation import device_data, training_loss

    if context is None:
        raise ConfigurationError(f"aligner {name!r} trains through the models: call it as "
                                 f"pair.align({name!r}, data=(x, y)) (or ModelSet.align), which passes the models")
    if context.data is None:
        raise ConfigurationError(f"aligner {name!r} learns from data: pass data=(x, y) or a dataset name, "
                                 f"e.g. pair.align({name!r}, data='digits')")
    ds = as_dataset(context.data, "train", input_shape=context.input_shape)
    if context.num_classes is not None:
        check_labels(ds, context.num_classes)
    be = context.backend
    prepared = be.prepare(context.template, context.layout)
    if not callable(getattr(prepared, "value_and_grad", None)):
        raise ConfigurationError(f"aligner {name!r} needs gradients, but the {be.name!r} backend gives none "
                                 "(its prepared models have no value_and_grad); use 'weight' or 'activation'")
    xp = be.xp()
    x, y = device_data(be)(ds.subset(2, seed=0) if len(ds) > 2 else ds)
    flat = be.asarray(context.layout.flatten(task.reference))
    try:
        if context.num_classes is None:  # a model without a layer table: its logits tell its classes
            check_labels(ds, _classes(prepared, xp, flat, x, tuple(ds.y.shape[1:])))
        prepared.value_and_grad(flat, x, y, training_loss(xp, getattr(prepared, "classes_second", None)))
    except DatasetError:
        raise
    except NotImplementedError as exc:
        raise ConfigurationError(f"aligner {name!r} needs gradients, but the {be.name!r} backend gives none: "
                                 f"{exc}; use 'weight' or 'activation'") from None
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise DatasetError(f"aligner {name!r}: the model fails on the data (examples of shape "
                           f"{tuple(ds.x.shape[1:])}, labels up to {int(np.max(ds.y))}): {exc}") from None
    return replace(context, data=ds)


def _classes(prepared: Any, xp: Any, flat: Any, x: Any, positions: tuple[int, ...]) -> int:
    """The number of classes of a prepared model: the class axis of its logits on ``x`` (inference mode)."""
    from combinability.evaluation import logit_rows

    logits = prepared.forward(flat[None, ...], x)
    rows = logit_rows(xp, logits, (int(x.shape[0]), *positions), lead=1,
                      classes_second=getattr(prepared, "classes_second", None))
    return int(rows.shape[-1])


def as_values(spec: PermutationSpec, perm: Mapping[str, Any]) -> Permutation:
    """``perm`` with each value in its kind's type: float64 matrices for orthogonal and invertible names, int64
    index arrays else.

    Examples
    --------
    >>> from combinability.kinds import Orthogonal
    >>> spec = PermutationSpec({"w": ("R", "P")}, kinds={"R": Orthogonal()})
    >>> {p: v.dtype.name for p, v in as_values(spec, {"R": np.eye(2, dtype=np.float32), "P": [1, 0]}).items()}
    {'R': 'float64', 'P': 'int64'}
    """
    return Permutation({p: np.array(v, np.float64 if isinstance(spec.kind(p), Orthogonal | Invertible | Dual)
                                    else np.int64) for p, v in perm.items()})


def _fixed_parameters(spec: PermutationSpec) -> set[str]:
    """Parameters an orthogonal map needs at a constant (folded norms): never trained."""
    return {name for kind in spec.kinds.values() if isinstance(kind, Orthogonal) for name, _ in kind.requires}


def start_permutation(task: AlignTask, init: str = "weight", *, max_iter: int = 100) -> Permutation:
    """The permutation a learned aligner starts from: weight matching's (``"weight"``) or the identity.

    The identity has every kind's value (identity matrices for orthogonal names).
    """
    if init == "identity":
        return identity_permutation(task.sizes(), task.spec)
    from combinability.matching import weight_matching

    return weight_matching(task.spec, task.reference, task.other, seed=task.seed, max_iter=max_iter)


def check_settings(name: str, lr: Any, init: Any, inits: tuple[str, ...], matching_iter: Any) -> None:
    """Refuse a learned aligner's learning rate, start or matching sweeps before any work."""
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ConfigurationError(f"aligner {name!r}: lr must be a positive number, got {lr!r}")
    if init not in inits:
        choices = ", ".join(repr(i) for i in inits[:-1]) + f" or {inits[-1]!r}"
        raise ConfigurationError(f"aligner {name!r}: init must be {choices}, got {init!r}")
    if matching_iter < 1:
        raise ConfigurationError(f"aligner {name!r}: matching_iter must be >= 1, got {matching_iter}")


def check_options(name: str, epochs: int, batch_size: int, eval_examples: int, sampler: Any) -> Any:
    for label, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1),
                              ("eval_examples", eval_examples, 1)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
            raise ConfigurationError(f"aligner {name!r}: {label} must be an integer >= {low}, got {value!r}")
    from combinability.samplers import Linear, Sampler, get_sampler

    smp = Linear(lam=0.5) if sampler is None else get_sampler(sampler) if isinstance(sampler, str) else sampler
    if not isinstance(smp, Sampler):
        raise ConfigurationError(f"aligner {name!r}: sampler must be a sampler (cb.Uniform(), 'subcube', ...), "
                                 f"got {type(sampler).__name__}")
    if smp.models != 2:
        raise ConfigurationError(f"aligner {name!r}: the {type(smp).__name__} sampler combines {smp.models} models; "
                                 "a pair's alignment is learned from two-model samplers (Linear, Uniform, ...)")
    return smp


# -- state file ------------------------------------------------------------------------------
def _fingerprint(*arrays: np.ndarray) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _save_state(path: Path, meta: dict, position: tuple[int, int], learner_state: Mapping[str, np.ndarray],
                best: tuple[Permutation, float], history: list[float]) -> None:
    from combinability.files import atomic_path

    arrays = {f"learner/{k}": np.asarray(v) for k, v in learner_state.items()}
    arrays.update({f"best/{p}": np.asarray(v) for p, v in best[0].items()})
    arrays.update(meta=np.asarray(json.dumps(meta, sort_keys=True)), position=np.asarray(position, np.int64),
                  best_objective=np.asarray(best[1]), history=np.asarray(history, np.float64))
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def _load_state(path: Path, meta: dict) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            saved = {k: f[k] for k in f.files}
        old = json.loads(str(saved["meta"]))
    except (OSError, ValueError, KeyError) as exc:
        raise CorruptFileError(f"cannot read the alignment state file {path}: {exc}; "
                               "delete it to start afresh") from None
    differ = sorted(k for k in set(old) | set(meta) if k != "epochs" and old.get(k) != meta.get(k))
    if differ:
        raise ConfigurationError(f"the alignment state file {path} was written by another run (it differs in: "
                                 f"{', '.join(differ)}); delete it or pass another state= path")
    return saved


# -- the loop --------------------------------------------------------------------------------
@dataclass
class _Run:
    """The fixed parts of one learning run."""

    name: str
    task: AlignTask
    ctx: LearningContext
    sampler: Any
    seed: int
    batch_size: int
    eval_examples: int

    def __post_init__(self) -> None:
        from combinability.evaluation import device_data, training_loss

        be, layout = self.ctx.backend, self.ctx.layout
        self.xp = be.xp()
        self.prepared = be.prepare(self.ctx.template, layout)
        self.x, self.y = device_data(be)(self.ctx.data)
        self.theta_a = be.asarray(layout.flatten(self.task.reference))
        self.grid = np.asarray(self.sampler.grid_for(layout))
        self.loss = training_loss(self.xp, getattr(self.prepared, "classes_second", None))
        n = len(self.ctx.data)
        self.eval_host = np.random.default_rng([self.seed, 7]).permutation(n)[: self.eval_examples]
        self.eval_idx = be.asarray(self.eval_host)
        scored = np.asarray(self.ctx.data.y) != IGNORE_INDEX
        self.eval_scored = scored.reshape(n, -1).sum(axis=1)[self.eval_host]  # scored targets per example
        draws = 1 if self.sampler.deterministic and len(self.grid) == 1 else 4
        self.eval_keys = [(-1, k) for k in range(draws)]

    def draw(self, epoch: int, step: int, theta_b: Any) -> Any:
        """The coefficients of step ``(epoch, step)``: a seeded value of the grid, a seeded draw."""
        from combinability.samplers import DrawContext

        ss = np.random.SeedSequence([self.seed, epoch + 1, step])
        rng = np.random.default_rng(ss)
        value = self.grid[rng.integers(len(self.grid))] if len(self.grid) > 1 else self.grid[0]
        random = self.ctx.backend.random(int(ss.generate_state(1)[0]))
        ctx = DrawContext(self.ctx.layout, random, theta_a=self.theta_a, theta_b=theta_b)
        return self.sampler.draw(value, ctx)

    def step(self, theta_b_host: np.ndarray, idx: Any, v: Any) -> tuple[float, np.ndarray]:
        """Loss and gradient w.r.t. ``T(θ_B)`` at the combination ``v``, on the batch ``idx``."""
        be, xp = self.ctx.backend, self.xp
        theta_b = be.asarray(theta_b_host.astype(self.ctx.layout.dtype, copy=False))
        mid = self.theta_a + v * (theta_b - self.theta_a)
        xb, yb = xp.take(self.x, idx, axis=0), xp.take(self.y, idx, axis=0)
        loss, grad, _ = self.prepared.value_and_grad(mid, xb, yb, self.loss)
        return float(be.to_numpy(loss)), be.to_numpy(v * grad).astype(np.float64)

    def objective(self, perm: Permutation) -> float:
        """Mean loss of the hard permutation's combinations on the evaluation examples (fixed draws).

        The inference-mode loss, as a sweep measures it (BatchNorm by its running statistics, the
        combination's, no dropout): deterministic, and independent of how the examples are batched.
        It is the mean over every scored target (a target labelled ``IGNORE_INDEX`` is left out of
        the sum and the count), as ``F.cross_entropy(..., ignore_index=-100)`` over all of them.
        """
        be, xp, layout = self.ctx.backend, self.xp, self.ctx.layout
        other = dict(self.task.other)
        theta_b = be.asarray(layout.flatten({**other, **apply_permutation(self.task.spec, perm, other)}))
        total, count = 0.0, 0
        for key in self.eval_keys:
            v = self.draw(*key, theta_b)
            mid = self.theta_a + v * (theta_b - self.theta_a)
            for start in range(0, int(self.eval_idx.shape[0]), self.batch_size):
                idx = self.eval_idx[start : start + self.batch_size]
                scored = int(self.eval_scored[start : start + self.batch_size].sum())
                if scored == 0:
                    continue
                xb, yb = xp.take(self.x, idx, axis=0), xp.take(self.y, idx, axis=0)
                loss, _, _ = self.prepared.value_and_grad(mid, xb, yb, self.loss, train=False)
                total += float(be.to_numpy(loss)) * scored
                count += scored
        return total / count if count else float("nan")


def learn(name: str, task: AlignTask, ctx: LearningContext, make: Callable[[], Learner], *, start: Permutation,
          settings: Mapping[str, Any], epochs: int = 3, batch_size: int = 100, sampler: Any = None,
          state: str | Path | None = None, eval_examples: int = 1000, progress: bool = False,
          **_: Any) -> Permutation:
    """Train a :class:`Learner` on the loss of combinations; return the best hard permutation seen.

    Parameters
    ----------
    name : str
        The aligner's name (messages, the state file, the result's ``method``).
    task : AlignTask
    ctx : LearningContext
        As returned by :func:`check_learning` (``data`` is an ArrayDataset).
    make : callable
        ``make() -> Learner``, a fresh learner at ``start``.
    start : Permutation
        The learner's starting permutation; it is the first candidate for the best.
    settings : mapping
        The learner's settings (recorded in the state file; a resumed run must match them).
    epochs : int, default 3
        Passes over the data.
    batch_size : int, default 100
        Examples per step.
    sampler : Sampler or str, optional
        Draws the combination of each step; default ``Linear(lam=0.5)`` (the midpoint).
        A sampler without a fixed value draws a value of its grid per step (``Linear()``:
        random λ; ``Uniform()``: a random half-width, ...).
    state : path, optional
        A state file: written atomically after every epoch and on Ctrl-C / SIGTERM; when it
        exists, the run resumes from it (it must come from the same call; ``epochs`` may grow).
    eval_examples : int, default 1000
        Examples on which each epoch's permutation is evaluated.
    progress : bool, default False
        A progress bar (on a terminal), with each epoch's evaluation loss.

    Returns
    -------
    Permutation
        ``method=name``; ``objective`` the lowest evaluation loss, ``history`` the
        evaluation loss of the start and of every epoch's permutation, ``iterations`` epochs.
    """
    from combinability.files import check_writable, stop_on_sigterm
    from combinability.progress import progress_bar

    smp = check_options(name, epochs, batch_size, eval_examples, sampler)
    path = Path(state) if state is not None else None
    data = ctx.data
    meta = {"version": _STATE_VERSION, "aligner": name, "seed": task.seed, "batch_size": batch_size,
            "eval_examples": eval_examples, "sampler": json.dumps(smp.settings, sort_keys=True, default=str),
            "settings": json.dumps(dict(settings), sort_keys=True, default=str),
            "models": _fingerprint(ctx.layout.flatten(task.reference), ctx.layout.flatten(task.other)),
            "data": _fingerprint(np.asarray(data.x), np.asarray(data.y)), "epochs": epochs}
    saved = _load_state(path, meta) if path is not None else None
    if path is not None:
        check_writable(path, what="alignment state")
    run = _Run(name, task, ctx, smp, task.seed, batch_size, eval_examples)
    learner = make()
    n = len(data)
    bounds = batch_bounds(n, batch_size)
    steps = len(bounds)
    if saved is None:
        best = (start, run.objective(start))
        history, position = [best[1]], (0, 0)
    else:
        learner.load({k.removeprefix("learner/"): v for k, v in saved.items() if k.startswith("learner/")})
        best = (as_values(task.spec, {k.removeprefix("best/"): v for k, v in saved.items() if k.startswith("best/")}),
                float(saved["best_objective"]))
        history, position = [float(h) for h in saved["history"]], tuple(int(p) for p in saved["position"])
    snapshot = (position, learner.state())
    bar = progress_bar(epochs * steps, f"{name} matching", "step", progress)
    bar.update(min(epochs * steps, position[0] * steps + position[1]))
    try:
        with stop_on_sigterm():
            for epoch in range(position[0], epochs):
                order = np.random.default_rng([task.seed, epoch]).permutation(n).astype(np.int64)
                first = position[1] if epoch == position[0] else 0
                for b in range(first, steps):
                    snapshot = ((epoch, b), learner.state())
                    theta_b = learner.transformed()
                    v = run.draw(epoch, b, ctx.backend.asarray(theta_b.astype(ctx.layout.dtype)))
                    loss, grad = run.step(theta_b, ctx.backend.asarray(order[slice(*bounds[b])]), v)
                    if not math.isfinite(loss):
                        raise ConfigurationError(f"aligner {name!r}: the loss became {loss} in epoch {epoch + 1}; "
                                                 "lower the learning rate (lr=)")
                    learner.backward(grad)
                    bar.update(1)
                perm = learner.permutation()
                history.append(run.objective(perm))
                if history[-1] < best[1]:
                    best = (perm, history[-1])
                bar.set_postfix(epoch=epoch + 1, loss=f"{history[-1]:.4f}", best=f"{best[1]:.4f}")
                snapshot = ((epoch + 1, 0), learner.state())
                if path is not None:
                    _save_state(path, meta, snapshot[0], snapshot[1], best, history)
    except KeyboardInterrupt:
        if path is not None:
            _save_state(path, meta, snapshot[0], snapshot[1], best, history)
        raise
    finally:
        bar.close()
    perm, objective = best
    return Permutation(as_values(task.spec, perm), objective=objective, history=history, iterations=epochs,
                       method=name)


# -- STE ------------------------------------------------------------------------------------
class _SteLearner:
    """A trainable copy of the reference, projected onto permutations of the other model each step."""

    def __init__(self, task: AlignTask, ctx: LearningContext, start: Permutation, *, lr: float,
                 matching_iter: int) -> None:
        from combinability.training import Optimizer, TrainRecipe

        self.task, self.ctx, self.matching_iter = task, ctx, matching_iter
        layout = ctx.layout
        self.theta = layout.flatten(task.reference).astype(np.float64)
        trainable = set(ctx.backend.trainable(ctx.template)) - _fixed_parameters(task.spec)
        mask = np.zeros(layout.size)
        for e in layout.entries:
            if e.name in trainable:
                mask[e.offset : e.stop] = 1.0
        self.recipe = TrainRecipe(lr=lr, optimizer="adam", weight_decay=0.0)
        self.opt = Optimizer(self.recipe, np, mask)
        self.perm = as_values(task.spec, start)
        self.other = dict(task.other)

    def transformed(self) -> np.ndarray:
        from combinability.matching import weight_matching

        params = self.ctx.layout.unflatten(self.theta, cast=False)
        self.perm = weight_matching(self.task.spec, params, self.other, init=self.perm, seed=self.task.seed,
                                    max_iter=self.matching_iter)
        return self.ctx.layout.flatten({**self.other, **apply_permutation(self.task.spec, self.perm, self.other)})

    def backward(self, grad_flat: np.ndarray) -> None:
        self.theta = self.opt.step(self.theta, grad_flat, self.recipe.lr)

    def permutation(self) -> Permutation:
        return as_values(self.task.spec, self.perm)

    def state(self) -> dict[str, np.ndarray]:
        out = {"theta": self.theta, "opt/t": np.asarray(self.opt.t)}
        out.update({f"perm/{p}": v for p, v in self.perm.items()})
        if self.opt.m is not None:
            out.update({"opt/m": self.opt.m, "opt/v": self.opt.v})
        return out

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        self.theta = np.asarray(state["theta"], dtype=np.float64)
        self.perm = as_values(self.task.spec, {p: state[f"perm/{p}"] for p in self.perm})
        if "opt/m" in state:
            self.opt.m, self.opt.v = np.asarray(state["opt/m"]), np.asarray(state["opt/v"])
        self.opt.t = int(state["opt/t"])


def ste(task: AlignTask, *, context: LearningContext | None = None, lr: float = 1e-3, matching_iter: int = 100,
        init: str = "weight", **options: Any) -> Permutation:
    """STE matching: a trainable copy of A, projected onto permutations of B, trained on combinations.

    Works on every symmetry kind of ``task.spec`` (heads and experts as block permutations,
    a residual stream's orthogonal map, packed axes): the projection is weight matching of
    the copy onto B, warm-started from the previous step's transformation.

    Parameters
    ----------
    task : AlignTask
    context : LearningContext
        The models, their backend and the data (passed by ``ModelSet.align``).
    lr : float, default 1e-3
        Adam's learning rate on the trainable copy.
    matching_iter : int, default 100
        Maximum weight-matching sweeps per step (warm-started: usually one or two).
    init : {"weight", "identity"}, default "weight"
        The first permutation: weight matching's, or the identity.
    **options
        The shared loop's options (:func:`learn`): ``epochs`` (3), ``batch_size`` (100),
        ``sampler`` (default ``Linear(lam=0.5)``, the midpoint), ``state`` (a resumable state
        file), ``eval_examples`` (1000), ``progress``.

    Returns
    -------
    Permutation
        ``method="ste"``: the permutation with the lowest evaluation loss seen (the start
        included); ``objective`` that loss, ``history`` one per epoch after the start's.

    Raises
    ------
    ConfigurationError
        If no data or no model context is given, an option is out of range, or the backend
        gives no gradients (all before training).
    DatasetError
        If the data does not fit the models.

    Examples
    --------
    >>> pair.align("ste", data=(x, y), epochs=3, seed=0, sampler=cb.Uniform())  # doctest: +SKIP
    """
    check_settings("ste", lr, init, ("weight", "identity"), matching_iter)
    ctx = check_learning("ste", task, context)
    check_options("ste", options.get("epochs", 3), options.get("batch_size", 100),
                   options.get("eval_examples", 1000), options.get("sampler"))
    start = start_permutation(task, init)
    settings = {"lr": lr, "matching_iter": matching_iter, "init": init}
    return learn("ste", task, ctx, lambda: _SteLearner(task, ctx, start, lr=lr, matching_iter=matching_iter),
                 start=start, settings=settings, **options)
