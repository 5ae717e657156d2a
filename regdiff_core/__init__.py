"""regdiff: paired synthetic 3D lung-vessel data with absorbing diffusion, and registration trained on it.

The package behind the book. One chapter = one notebook in ``notebooks/`` + one module here:

=========================  ==============================
notebook                   module
=========================  ==============================
01_data_preparation        :mod:`regdiff_core.data`
02_vqae                    :mod:`regdiff_core.vqae`
03_absorbing_diffusion     :mod:`regdiff_core.diffusion`
04_sampling                :mod:`regdiff_core.sampling`
05_registration            :mod:`regdiff_core.registration`
06_evaluation              :mod:`regdiff_core.metrics`
=========================  ==============================

Each chapter's figures are in :mod:`regdiff_core.figures`, one module per chapter module above (the
chapter modules compute and never import matplotlib).

Shared pieces: :mod:`regdiff_core.config` (profiles), :mod:`regdiff_core.training` (the one training
loop: resume, atomic checkpoints, NaN guard), :mod:`regdiff_core.utils` (device, seeds, metrics files).
"""

__version__ = "0.1.0"
