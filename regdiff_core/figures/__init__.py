"""Every figure of the book, one module per chapter; the chapter modules compute, these only draw.

- :mod:`regdiff_core.figures.data` (chapter 1): projections, slices, landmarks, vessel fractions, the
  slice viewer; the blue/orange pair overlay every later chapter reuses;
- :mod:`regdiff_core.figures.vqae` (chapter 2): VQ-AE training, reconstructions, motion kept, codebooks;
- :mod:`regdiff_core.figures.diffusion` (chapter 3): token grids, the denoiser's training and fill-in;
- :mod:`regdiff_core.figures.sampling` (chapter 4): unmasking strip and animation, gallery, memorisation;
- :mod:`regdiff_core.figures.registration` (chapter 5): deformed grids, velocities, map slices;
- :mod:`regdiff_core.figures.metrics` (chapter 6): TRE box plots, TTA curves and the paper's claim.

A figure module may import its chapter module, never the other way round. Notebooks use
``from regdiff_core import figures`` and call ``figures.<chapter>.<function>``.
"""

from regdiff_core.figures import data, diffusion, metrics, registration, sampling, vqae

__all__ = ["data", "diffusion", "metrics", "registration", "sampling", "vqae"]
