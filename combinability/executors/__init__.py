"""Where a sweep's evaluations run: in this process, or on the workers of a Dask cluster.

A sweep is a grid of independent *cells* ``(value index, sample)``. :mod:`.cells` holds
the work of one cell (draw the coefficients from the cell's own seed, combine, repair,
evaluate every split), written once and used by both executors:

* the in-process loop of :func:`combinability.sweep` (no ``client``);
* :mod:`.dask_cluster`: the same cells sent in batches to the workers of a
  ``dask.distributed.Client``, the models and data scattered to every worker once.

Nothing here imports dask or a framework at module level.
"""

__all__: list[str] = []
