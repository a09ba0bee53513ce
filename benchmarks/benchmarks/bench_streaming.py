"""Appending one evaluation to a sweep's results file, at 10², 10³ and 10⁴ evaluations.

The file is created once with every cell; an append writes one evaluation's cells and its
``done`` flag in place, so its cost must not grow with the number of evaluations.
"""

import tempfile
from pathlib import Path

import numpy as np
import xarray as xr

from combinability.result_stream import ResultStream
from combinability.results import provenance


def sweep_template(evaluations: int, samples: int = 4) -> xr.Dataset:
    values = evaluations // samples
    shape = (2, values, samples)
    return xr.Dataset(
        {
            "loss": (("split", "lam", "sample"), np.full(shape, np.nan)),
            "accuracy": (("split", "lam", "sample"), np.full(shape, np.nan)),
            "agreement": (("split", "lam", "sample", "category"), np.zeros((*shape, 8), dtype=np.int64)),
            "done": (("lam", "sample"), np.zeros(shape[1:], dtype=bool)),
        },
        coords={"split": ["train", "test"], "lam": np.linspace(0, 1, values), "sample": np.arange(samples)},
        attrs=provenance(combinability_format="sweep"),
    )


class AppendOneEvaluation:
    params = [100, 1000, 10000]
    param_names = ["evaluations"]

    def setup(self, evaluations):
        self.folder = tempfile.mkdtemp()
        self.stream = ResultStream.create(Path(self.folder) / "s.nc", sweep_template(evaluations))
        self.values = evaluations // 4
        self.k = 0

    def teardown(self, evaluations):
        self.stream.close()

    def time_append(self, evaluations):
        i, s = divmod(self.k % (self.values * 4), 4)
        self.k += 1
        self.stream.append({"lam": i, "sample": s}, {"loss": np.array([0.1, 0.2]), "accuracy": np.array([0.9, 0.8]),
                                                     "agreement": np.ones((2, 8), dtype=np.int64)})
