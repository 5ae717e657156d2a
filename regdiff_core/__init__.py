"""regdiff: paired synthetic 3D lung-vessel data with absorbing diffusion, and registration trained on it.

The package behind the book. One chapter = one notebook in ``notebooks/`` + one module here, which
holds what the paper computes (models, losses, the training step and loop, sampling, metrics):

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

Beside each chapter module, with the same name:

- :mod:`regdiff_core.store` ``.<chapter>`` — the files it reads and writes (downloads, caches, model,
  token and pair files) and the stage entry points that go from files to files;
- :mod:`regdiff_core.figures` ``.<chapter>`` — its figures (the chapter modules never import matplotlib).

Shared pieces: :mod:`regdiff_core.config` (profiles), :mod:`regdiff_core.training` (the one training
loop, one checkpoint format, one stale-state rule, one model-file format), :mod:`regdiff_core.utils`
(device, seeds, atomic writes, the one table helper, metrics files), :mod:`regdiff_core.distributed`
(torchrun), :mod:`regdiff_core.cli` (every ``python -m regdiff_core`` stage), :mod:`regdiff_core.bench`
(``make gpu-check``: each chapter's own training step at paper size), :mod:`regdiff_core.reference` (the
authors' and MONAI's functions the tests and chapter 5 compare ours with).
"""

__version__ = "0.1.0"
