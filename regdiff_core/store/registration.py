"""Chapter 5's files: which pairs a regime trains on, where each run is kept, the model files.

- :func:`regime_data` gathers a regime's training pairs from ``work_dir``: the prepared real pairs
  (chapter 1's cache, uint8 masks in memory) and chapter 4's synthetic or reconstructed pair files, which
  :class:`RegimeData` reads when a batch needs them (a bounded cache), so host memory does not grow with
  ``n_synthetic``.
- :func:`train_regime` trains one run of a regime (:func:`regdiff_core.registration.train_registration`)
  in ``work_dir/registration/<run_name>/`` — ``checkpoint.pt`` (resumed), ``history.csv`` — and writes
  its ``model.pt``; :func:`load_registration` reads it back, or the paper's released networks.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from regdiff_core.config import CANONICAL_SHAPE, Profile, RegistrationConfig
from regdiff_core.registration import (
    REGIMES,
    TwoStepRegistration,
    build_registration,
    few_cases,
    regime_runs,
    train_registration,
)
from regdiff_core.training import CheckpointError, load_weights, model_layout, read_checkpoint, save_model
from regdiff_core.utils import seed_everything


def run_name(regime: str, run: int = 0) -> str:
    """The folder name of a regime's training run: ``run`` 0 is ``<regime>``, run k > 0 ``<regime>-run<k>``.

    Chapter 5 trains several runs (seeds) of the regimes the paper's claim rests on
    (``registration.seeds`` runs of each regime in ``registration.seed_regimes``), so that chapter 6 can
    tell a difference between regimes from the spread between seeds.
    """
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose one of {sorted(REGIMES)}")
    if run < 0:
        raise ValueError(f"run must be >= 0, got {run}")
    return regime if run == 0 else f"{regime}-run{run}"


#: Upper bound on the synthetic pairs :class:`RegimeData` keeps decoded in memory (bytes, fp16 as stored).
SYNTHETIC_CACHE_BYTES = 2 * 1024**3


class RegimeData:
    """Training pairs of one regime at the profile resolution, served batch by batch.

    ``fixed``, ``moving`` (N_mem, *S): pairs held in memory in their own dtype (the real pairs as ``uint8``
    masks, a quarter of float32); ``synthetic_files``: further pairs that stay on disk (chapter 4's npz,
    fp16 P(vessel)) and are read when a batch needs them, through a least-recently-used cache of at most
    ``cache_bytes``. So host memory does not grow with ``n_synthetic`` (at paper size 256 float32 pairs
    would be about 28 GB). Pair ``i < N_mem`` is in memory, the others are files in order.
    """

    def __init__(
        self,
        regime: str,
        cases: Sequence[str],
        fixed: torch.Tensor,
        moving: torch.Tensor,
        n_real: int,
        n_synthetic: int,
        synthetic_files: Sequence[str | Path] = (),
        cache_bytes: int = SYNTHETIC_CACHE_BYTES,
    ) -> None:
        self.regime, self.cases = regime, list(cases)
        self.fixed, self.moving = fixed, moving
        self.n_real, self.n_synthetic = n_real, n_synthetic
        self.synthetic_files = [Path(p) for p in synthetic_files]
        self.cache_bytes = int(cache_bytes)
        self._cache: collections.OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = (
            collections.OrderedDict()
        )
        self._cached_bytes = 0
        if len(self.cases) != len(self):
            raise ValueError(f"regime {regime!r}: {len(self.cases)} case names for {len(self)} pairs")
        if self.synthetic_files:
            first = self._synthetic(0)[0]
            if len(fixed) and tuple(first.shape) != tuple(fixed.shape[1:]):
                raise ValueError(
                    f"regime {regime!r}: real and synthetic pairs differ in shape "
                    f"{sorted({tuple(fixed.shape[1:]), tuple(first.shape)})}"
                )
            self._shape = tuple(first.shape)
        else:
            self._shape = tuple(fixed.shape[1:])

    def __len__(self) -> int:
        return len(self.fixed) + len(self.synthetic_files)

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape (H, W, D) of every pair."""
        return self._shape

    def _synthetic(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        if j in self._cache:
            self._cache.move_to_end(j)
            return self._cache[j]
        from regdiff_core.store.sampling import read_synthetic_pair

        pair = read_synthetic_pair(self.synthetic_files[j])
        size = sum(t.numel() * t.element_size() for t in pair)
        while self._cache and self._cached_bytes + size > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= sum(t.numel() * t.element_size() for t in old)
        if size <= self.cache_bytes:
            self._cache[j] = pair
            self._cached_bytes += size
        return pair

    def pair(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair ``i`` as stored: ``(fixed, moving)`` (*S) in its own dtype."""
        n_mem = len(self.fixed)
        if i < n_mem:
            return self.fixed[i], self.moving[i]
        return self._synthetic(i - n_mem)

    def batch(
        self, index: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs ``index`` as ``(fixed, moving)`` (B, *S) float32 on ``device``."""
        pairs = [self.pair(int(i)) for i in index]
        fixed = torch.stack([f.to(device, torch.float32) for f, _ in pairs])
        moving = torch.stack([m.to(device, torch.float32) for _, m in pairs])
        return fixed, moving


def regime_data(profile: Profile, work_dir: str | Path, regime: str) -> RegimeData:
    """Load the training pairs of ``regime`` (one of :data:`REGIMES`) from ``work_dir``."""
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose one of {sorted(REGIMES)}")
    cfg = profile.registration
    fixed = moving = None
    cases: list[str] = []
    files: list[Path] = []
    n_real = 0
    if regime == "reconstructions":
        from regdiff_core.store.sampling import reconstruction_files

        files = reconstruction_files(Path(work_dir))
        if not files:
            raise FileNotFoundError(
                f"no VQ-AE reconstructions in {Path(work_dir) / 'reconstructions'}: run chapter 4 "
                f"(python -m regdiff_core sample --profile {profile.name}) first"
            )
        cases = [f"reconstruction:{p.stem.removeprefix('recon_')}" for p in files]
        empty = torch.zeros(0, dtype=torch.uint8)
        return RegimeData(regime, cases, empty, empty, 0, len(files), synthetic_files=files)
    if regime != "synthetic":
        from regdiff_core.store.data import load_pairs

        real = load_pairs(profile, Path(work_dir), "train")
        keep = list(range(len(real.cases)))
        if regime in ("real_few", "synthetic_plus_few"):
            chosen = few_cases(real.cases, cfg.n_few)
            keep = [real.cases.index(c) for c in chosen]
        # uint8 masks as prepared: converted to float32 one batch at a time (RegimeData.batch)
        fixed, moving = real.fixed[keep], real.moving[keep]
        cases += [real.cases[i] for i in keep]
        n_real = len(keep)
    if regime in ("synthetic", "synthetic_plus_few"):
        from regdiff_core.store.sampling import synthetic_files

        files = synthetic_files(Path(work_dir))
        if not files:
            raise FileNotFoundError(
                f"no synthetic pairs in {Path(work_dir) / 'synthetic'}: run chapter 4 "
                f"(python -m regdiff_core sample --profile {profile.name}) first"
            )
        if cfg.n_synthetic > len(files):
            raise ValueError(
                f"registration.n_synthetic = {cfg.n_synthetic}, but only {len(files)} synthetic pairs exist "
                f"in {files[0].parent}"
            )
        files = files[: cfg.n_synthetic]
        cases += [f"synthetic:{p.stem}" for p in files]
    if fixed is None:
        fixed = moving = torch.zeros(0, dtype=torch.uint8)
    return RegimeData(regime, cases, fixed, moving, n_real, len(files), synthetic_files=files)


class TrainedRegistration(NamedTuple):
    model: TwoStepRegistration
    history: list[dict[str, float]]
    seconds: float
    n_pairs: int
    path: Path


def save_registration(model: TwoStepRegistration, path: Path, **extra: Any) -> Path:
    """``model.pt`` of a run: both steps' weights (``step1``, ``step2``) and the config, in the one
    model-file layout (:func:`regdiff_core.training.save_model`); ``extra``: regime, run, grid, pairs."""
    weights = {f"step{k + 1}": net.state_dict() for k, net in enumerate(model.nets)}
    return save_model(path, weights, dataclasses.asdict(model.cfg), spatial_dims=model.spatial_dims, **extra)


def train_regime(
    profile: Profile,
    regime: str,
    work_dir: str | Path,
    device: torch.device,
    *,
    progress: bool = True,
    data: RegimeData | None = None,
    run: int = 0,
) -> TrainedRegistration:
    """Train both steps on ``regime``'s pairs (:func:`regdiff_core.registration.train_registration`) and
    save ``registration/<name>/model.pt`` with ``<name>`` = :func:`run_name` (``regime`` for run 0).

    Resumes from ``registration/<name>/checkpoint.pt`` if present (a finished run returns at once).
    ``data`` may be given directly (tests); otherwise it is loaded from ``work_dir``. The run's randomness
    (initial weights, batches) comes from the global RNG: seed it before the call (chapter 5 and the CLI
    use seed + run).
    """
    cfg = profile.registration
    out_dir = Path(work_dir) / "registration" / run_name(regime, run)
    data = data if data is not None else regime_data(profile, work_dir, regime)
    trained = train_registration(
        data, cfg, device, out_dir=out_dir, desc=f"registration {run_name(regime, run)}", progress=progress
    )
    n = len(data.cases)
    path = save_registration(
        trained.model, out_dir / "model.pt", regime=regime, run=run, grid=trained.grid, n_pairs=n,
        cases=data.cases,
    )  # fmt: skip
    return TrainedRegistration(trained.model, trained.history, trained.seconds, n, path)


def train_regimes(
    profile: Profile,
    work_dir: str | Path,
    device: torch.device,
    seed: int = 0,
    *,
    regimes: Sequence[str] | None = None,
    runs: int | None = None,
    data: dict[str, RegimeData] | None = None,
    progress: bool = True,
) -> dict[tuple[str, int], TrainedRegistration]:
    """Chapter 5's training runs (and ``python -m regdiff_core train-registration``'s): each of ``regimes``
    (default ``registration.regimes``) with ``runs`` runs (default :func:`~regdiff_core.registration.
    regime_runs`); run k is seeded with ``seed + k`` before it starts. ``data``: regime → its pairs, already
    loaded. Returns (regime, run) → :class:`TrainedRegistration`."""
    counts = regime_runs(profile)
    trained = {}
    for regime in regimes or profile.registration.regimes:
        pairs = data.get(regime) if data is not None else None
        for run in range(runs if runs is not None else counts.get(regime, 1)):
            seed_everything(seed + run)
            trained[regime, run] = train_regime(
                profile, regime, work_dir, device, data=pairs, progress=progress, run=run
            )
    return trained


def load_registration(
    profile: Profile, work_dir: str | Path, regime_or_path: str | Path, device: torch.device, *, run: int = 0
) -> TwoStepRegistration:
    """A trained model: a regime name (→ ``work_dir/registration/<regime>/model.pt``, or the folder of
    :func:`run_name` for ``run`` > 0) or a file path.

    Accepts this package's ``model.pt`` and the paper's released ``regnets_state_*.pth`` (a list of two
    UNet state dicts, fp16 or fp32, possibly ``torch.compile``-prefixed; built with the paper's config).
    """
    path = Path(regime_or_path)
    if str(regime_or_path) in REGIMES:
        path = Path(work_dir) / "registration" / run_name(str(regime_or_path), run) / "model.pt"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: train it with chapter 5 "
                f"(python -m regdiff_core train-registration --profile {profile.name} --regime {regime_or_path})"
            )
    if not path.exists():
        raise FileNotFoundError(f"registration checkpoint {path} does not exist")
    again = "Move it away and rerun `python -m regdiff_core train-registration`."
    payload = read_checkpoint(path, "registration model", again)
    regime = None
    if isinstance(payload, list | tuple) and len(payload) == 2:  # the seed's released networks
        cfg, states, dims, n_pairs = released_config(profile), list(payload), 3, None
    else:  # chapter 5's model.pt
        saved = model_layout(payload, path, "registration model", again)
        try:
            cfg = RegistrationConfig(**_tuples(saved["config"]))
            states = [saved["weights"]["step1"], saved["weights"]["step2"]]
        except (KeyError, TypeError) as err:
            raise CheckpointError(
                f"{path}: neither a chapter-5 model.pt ({type(err).__name__}: {err}) nor a list of two UNet "
                f"state dicts. {again}"
            ) from err
        dims, n_pairs, regime = saved.get("spatial_dims", 3), saved.get("n_pairs"), saved.get("regime")
    model = build_registration(cfg, dims)
    for k, (net, sd) in enumerate(zip(model.nets, states)):
        load_weights(net, sd, name=f"{path} (network {k + 1})")
    model.n_train_pairs = n_pairs
    model.regime = regime  # the regime it was trained on (chapter 5's model.pt), None for other files
    return model.to(device).eval()


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def released_config(profile: Profile) -> RegistrationConfig:
    """The paper's registration settings, with ``scale`` chosen so that the grid is the paper's 128×104×128
    for this profile's volumes (paper: ½; colab: 1; ci: 2, i.e. the 4 mm masks upsampled — approximate)."""
    scale = CANONICAL_SHAPE[0] / 2 / profile.data.shape[0]
    return dataclasses.replace(RegistrationConfig(), scale=scale)
