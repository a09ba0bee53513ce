"""The paper's figures, drawn with matplotlib from the library's result Datasets.

=================================  ==================================  ===================
function                           draws                               paper
=================================  ==================================  ===================
:func:`plot_sweep`                 loss and accuracy along a sampler   figs 2–6, 8–10, 11a
:func:`plot_agreement`             agreement categories, stacked       fig 12
:func:`plot_triangle`              accuracy over three models          fig 11b
:func:`plot_edge_lengths`          edge-length histograms              fig 13
:func:`plot_width_ablation`        barriers against width              fig 7
:func:`plot_robustness`            barriers after re-matching k pairs  fig 14
:func:`plot_barrier_summary`       naive vs aligned barriers, bars     —
:func:`plot_asymmetry`             standard vs asymmetric, linear path —
:func:`plot_aligners`              aligner barriers, merged models     —
:func:`plot_symmetries`            naive / permutation / orthogonal    —
=================================  ==================================  ===================

Every function returns a :class:`matplotlib.figure.Figure` and, given ``path=``, writes
it atomically (temporary file, then rename; the suffix picks the format, PNG by
default). Figures are built without ``pyplot``: no global state, no display needed.
This package is not imported by ``import combinability``; importing it imports
matplotlib.

Examples
--------
>>> from combinability.plots import plot_sweep          # doctest: +SKIP
>>> fig = plot_sweep(cb.open_results("uniform.nc"), "uniform.png")  # doctest: +SKIP
"""

from combinability.plots.agreement import CATEGORY_LABELS, agreement_fractions, plot_agreement
from combinability.plots.aligners import plot_aligners
from combinability.plots.asymmetry import plot_asymmetry
from combinability.plots.curves import PARAMETER_LABELS, barrier_caption, plot_sweep
from combinability.plots.edges import edge_histograms, plot_edge_lengths
from combinability.plots.robustness import plot_robustness, robustness_curves
from combinability.plots.summary import barrier_table, plot_barrier_summary
from combinability.plots.symmetries import plot_symmetries
from combinability.plots.triangle import plot_triangle, triangle_coordinates, triangle_values
from combinability.plots.width import plot_width_ablation

__all__ = [
    "CATEGORY_LABELS",
    "PARAMETER_LABELS",
    "agreement_fractions",
    "barrier_caption",
    "barrier_table",
    "edge_histograms",
    "plot_agreement",
    "plot_aligners",
    "plot_asymmetry",
    "plot_barrier_summary",
    "plot_edge_lengths",
    "plot_robustness",
    "plot_sweep",
    "plot_symmetries",
    "plot_triangle",
    "plot_width_ablation",
    "robustness_curves",
    "triangle_coordinates",
    "triangle_values",
]
