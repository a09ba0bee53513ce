"""Every experiment of the paper as a function returning ``xarray.Dataset`` results.

=====================================  ==========================  ==================
function                               paper                       returns
=====================================  ==========================  ==================
:func:`hypercube`                      §4.2.1–4.2.4, figs 2–5      one Dataset per sampler
:func:`identity_stitching`             §4.3, fig 6                 Dataset
:func:`width_ablation`                 §4.4, fig 7                 Dataset of barriers
:func:`min_max`                        §4.5.1, fig 8               Dataset
:func:`linear_extrapolation`           §5.1, fig 9                 Dataset
:func:`centred_box`                    §5.2, fig 10                Dataset
:func:`transitivity`                   §5.3, fig 11a               Dataset
:func:`three_models`                   §5.4, fig 11b               Dataset (+ best point)
:func:`functional_agreement`           §6.1, fig 12                one Dataset per scheme
:func:`edge_lengths`                   §6.2, fig 13                Dataset of histograms
:func:`alignment_robustness`           §6.3, fig 14                Dataset of barriers
:func:`asymmetry_comparison`           Lim et al. 2024             Dataset of barriers
:func:`compare_aligners`               weight, activation, STE     Dataset of barriers
:func:`symmetry_comparison`            Theus et al.                Dataset of barriers
=====================================  ==========================  ==================

Sweeping experiments compare the naive pair (B as trained) with the aligned pair
(``π(θ_B)``) along an ``alignment`` dimension, as the paper's figures do.
"""

from combinability.experiments.agreement import functional_agreement
from combinability.experiments.aligners import compare_aligners
from combinability.experiments.asymmetry import asymmetry_comparison
from combinability.experiments.compare import compare_alignment
from combinability.experiments.edges import edge_lengths
from combinability.experiments.hypercube import HYPERCUBE_SAMPLERS, hypercube
from combinability.experiments.robustness import alignment_robustness
from combinability.experiments.schemes import centred_box, identity_stitching, linear_extrapolation, min_max
from combinability.experiments.symmetries import symmetry_comparison
from combinability.experiments.three import best_point, three_models, transitivity
from combinability.experiments.width import width_ablation

__all__ = [
    "HYPERCUBE_SAMPLERS",
    "alignment_robustness",
    "asymmetry_comparison",
    "best_point",
    "centred_box",
    "compare_aligners",
    "compare_alignment",
    "edge_lengths",
    "functional_agreement",
    "hypercube",
    "identity_stitching",
    "linear_extrapolation",
    "min_max",
    "symmetry_comparison",
    "three_models",
    "transitivity",
    "width_ablation",
]
