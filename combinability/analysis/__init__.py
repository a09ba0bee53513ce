"""Analyses inside the barrier: why combinations work, layer by layer.

=====================================  ==============================================  =====================
function                               measures                                        work it follows
=====================================  ==============================================  =====================
:func:`llfc`                           layer-wise linear feature connectivity          Zhou et al. 2023
:func:`layerwise_barriers`             single-layer and cumulative barriers, with the  Adilova et al. 2023;
                                       second-order (curvature) prediction             Singh et al. 2024
:func:`calibrate`                      loss barriers with and without a fitted         Ito et al. 2024
                                       softmax temperature, naive and aligned
:func:`lewc`                           per-layer least-squares ``f ≈ a f_A + b f_B``   Ito et al. 2024
                                       against the exponentially weighted prediction
=====================================  ==============================================  =====================

Each returns a labelled :class:`xarray.Dataset` (``combinability_format`` ``"llfc"``,
``"layerwise_barriers"``, ``"calibration"``, ``"lewc"``) that ``combinability report``
draws, and takes ``out=`` to write it (a finished result of the same settings is reused).
"""

from combinability.analysis.calibration import (
    CalibrationOverlapWarning,
    calibrate,
    fit_temperature,
    lewc,
)
from combinability.analysis.layerwise import curvature_along, curvature_and_slope, layerwise_barriers
from combinability.analysis.llfc import cosine_and_scale, llfc

__all__ = [
    "CalibrationOverlapWarning",
    "calibrate",
    "cosine_and_scale",
    "curvature_along",
    "curvature_and_slope",
    "fit_temperature",
    "layerwise_barriers",
    "lewc",
    "llfc",
]
