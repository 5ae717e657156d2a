"""Every file the book reads or writes, one module per chapter; the chapter modules compute, these keep.

- :mod:`regdiff_core.store.data` (chapter 1): downloads, reading the masks and landmarks, the prepared cache;
- :mod:`regdiff_core.store.vqae` (chapter 2): the VQ-AE's model file, the token files (ours and the paper's);
- :mod:`regdiff_core.store.diffusion` (chapter 3): the denoiser's model file, its training grids;
- :mod:`regdiff_core.store.sampling` (chapter 4): synthetic and reconstructed pair files, written and read;
- :mod:`regdiff_core.store.registration` (chapter 5): which pairs a regime trains on, the model files;
- :mod:`regdiff_core.store.metrics` (chapter 6): the paper's result CSVs, Lung250M-4B's files, result files.

Checkpoints of the three trained stages have one format and one stale-state rule, in
:mod:`regdiff_core.training`. A store module may import its chapter module, never the other way round
(a chapter function that needs a file imports it inside the function). Notebooks use
``from regdiff_core import store`` and call ``store.<chapter>.<function>``.
"""

from regdiff_core.store import data, diffusion, metrics, registration, sampling, vqae

__all__ = ["data", "diffusion", "metrics", "registration", "sampling", "vqae"]
