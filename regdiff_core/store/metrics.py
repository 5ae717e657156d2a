"""Chapter 6's files: the paper's result CSVs, Lung250M-4B's repository files, our per-landmark CSV.

:mod:`regdiff_core.metrics` holds what chapter 6 computes (TRE, Dice, Jacobians, inverse consistency,
:func:`~regdiff_core.metrics.evaluate_model`, the claim over seeds, the tables) and the structures it
returns (:class:`~regdiff_core.metrics.Evaluation`, :class:`~regdiff_core.metrics.PaperResults`,
); this module names and reads the files the chapter compares against and writes the one it
produces:

- ``data_dir/unleashing-registration/regnets_state_{dilated_vessels,dilated_vessels_10,synth}.csv``
  (:data:`PAPER_CSVS`, downloaded with chapter 1's release): the paper's per-landmark TRE, one row per
  landmark in :data:`~regdiff_core.config.ALL_TEST_CASES` order, columns (initial, network, after 50
  TTA iterations), read by :func:`paper_results`. The released networks beside them,
  ``regnets_state_*.pth`` (:data:`RELEASED_NETWORKS`), are named by :func:`checkpoint_label`;
- ``data_dir/lung250m-4b-repo/`` (:func:`fetch_lung250m_repo`): ``evaluation/lms_validation.pth``, the
  27 test pairs' landmarks in each scan's original voxel frame (:func:`load_original_landmarks`), and
  ``predict_vxmpp/case_NNN.csv``, VoxelMorph++ keypoint predictions for 17 of them
  (:func:`load_keypoint_predictions`); :func:`evaluate_keypoint_predictions` reads both and measures
  them with :func:`keypoint_tre` (a thin-plate spline through the keypoints, :data:`TPS_SETTINGS`) into a
  :class:`PeerResult` — the peer's numbers only, none of the paper's method;
- our own per-landmark TRE in the shape of the paper's CSVs (:func:`per_landmark_table`,
  :func:`write_per_landmark_csv`; ``python -m regdiff_core evaluate --csv``).

Kept apart from the computation so that the chapter module reads as the method and its metrics are
tested on tensors; the file names, formats and their error messages change here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from regdiff_core.config import ALL_TEST_CASES, BENCHMARK_TEST_CASES, Profile
from regdiff_core.metrics import (
    Evaluation,
    PaperResults,
    dice_gain,
    evaluate_model,
    target_registration_error,
    tta_curve,
)
from regdiff_core.registration import regime_runs

# --------------------------------------------------------------------------------------------------
# The paper's result files and released networks
# --------------------------------------------------------------------------------------------------

#: The paper's result files (per landmark: initial, network, after 50 TTA iterations) and what they hold.
PAPER_CSVS: dict[str, str] = {
    "real_all": "regnets_state_dilated_vessels.csv",
    "real_few": "regnets_state_dilated_vessels_10.csv",
    "synthetic": "regnets_state_synth.csv",
}
#: The released networks (not in the data mirror; users online may have them).
RELEASED_NETWORKS: dict[str, str] = {k: v.replace(".csv", ".pth") for k, v in PAPER_CSVS.items()}


def paper_results(data_dir: str | Path, landmark_counts: Sequence[int]) -> PaperResults:
    """Read the paper's three result CSVs from ``data_dir/unleashing-registration/``.

    ``landmark_counts``: landmarks per case in ALL_TEST_CASES order (from the landmark file), to know
    which rows belong to which case.
    """
    root = Path(data_dir) / "unleashing-registration"
    if len(landmark_counts) != len(ALL_TEST_CASES):
        raise ValueError(f"need {len(ALL_TEST_CASES)} landmark counts, got {len(landmark_counts)}")
    case = [c for c, n in zip(ALL_TEST_CASES, landmark_counts) for _ in range(int(n))]
    net, tta, initial = {}, {}, None
    for regime, name in PAPER_CSVS.items():
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: the paper's result file is missing; run chapter 1 "
                "(`python -m regdiff_core prepare`) or `python -m data_download unleashing-registration`"
            )
        table = torch.from_numpy(np.loadtxt(path, delimiter=",", dtype=np.float64))
        if table.shape != (len(case), 3):
            raise ValueError(f"{path}: expected {len(case)} rows × 3 columns, got {tuple(table.shape)}")
        initial = table[:, 0] if initial is None else initial
        net[regime], tta[regime] = table[:, 1], table[:, 2]
    return PaperResults(case, initial, net, tta)


def checkpoint_label(model, checkpoint: str) -> tuple[str, str | None]:
    """``(label, regime)`` of an evaluated checkpoint: the regime stored in chapter 5's ``model.pt``, the
    regime of a released ``regnets_state_*.pth`` (label "released <regime>"), else the file's stem."""
    if checkpoint == "identity":
        return "identity", None
    regime = getattr(model, "regime", None)
    if regime:
        return regime, regime
    name = Path(checkpoint).name
    for key, released in RELEASED_NETWORKS.items():
        if name == released:
            return f"released {key}", key
    return Path(checkpoint).stem, None


# --------------------------------------------------------------------------------------------------
# Lung250M-4B's repository: landmarks in the original frame, VoxelMorph++ predictions
# --------------------------------------------------------------------------------------------------

#: Lung250M-4B's repository files (``data_download`` dataset ``lung250m-4b-repo``) under ``data_dir``.
LUNG250M_REPO = "lung250m-4b-repo"
ORIGINAL_LANDMARKS_FILE = "evaluation/lms_validation.pth"
VXMPP_FOLDER = "predict_vxmpp"
VXMPP_LABEL = "VoxelMorph++ with instance optimization (Lung250M-4B's predictions)"


def fetch_lung250m_repo(data_dir: str | Path, base_url: str | None = None) -> Path:
    """Download (or verify) Lung250M-4B's landmarks and VoxelMorph++ predictions into
    ``data_dir/lung250m-4b-repo`` (``$REGDIFF_LUNG250M_REPO_URL`` names a mirror); return that folder."""
    from data_download import fetch

    dest = Path(data_dir) / LUNG250M_REPO
    fetch(LUNG250M_REPO, dest, base_url=base_url, progress=False)
    return dest


def load_original_landmarks(data_dir: str | Path) -> dict[str, torch.Tensor]:
    """``evaluation/lms_validation.pth``: case id ("002", …) → (N, 6) float64, fixed then moving landmark,
    voxel indices in each scan's original frame (27 cases, 4677 pairs)."""
    path = Path(data_dir) / LUNG250M_REPO / ORIGINAL_LANDMARKS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing; download it with `python -m data_download {LUNG250M_REPO} "
            f"--dest {path.parent.parent}`"
        )
    stored = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(stored, dict) or any(torch.as_tensor(v).shape[-1:] != (6,) for v in stored.values()):
        raise ValueError(f"{path}: expected a dict of (N, 6) landmark tensors keyed by case id")
    return {f"{int(k):03d}": torch.as_tensor(v).double() for k, v in stored.items()}


def load_keypoint_predictions(data_dir: str | Path, folder: str = VXMPP_FOLDER) -> dict[str, torch.Tensor]:
    """``<folder>/case_NNN.csv`` of Lung250M-4B's repository: case → (K, 6) float64 rows
    ``x_f, y_f, z_f, x_m, y_m, z_m`` (fixed keypoint, its predicted moving position; original frame)."""
    root = Path(data_dir) / LUNG250M_REPO / folder
    paths = sorted(root.glob("case_[0-9][0-9][0-9].csv"))
    if not paths:
        raise FileNotFoundError(
            f"{root}: no case_NNN.csv predictions; download them with `python -m data_download "
            f"{LUNG250M_REPO} --dest {root.parent}`"
        )
    out = {}
    for path in paths:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
        if table.shape[1] != 6:
            raise ValueError(
                f"{path}: expected 6 columns (x_f, y_f, z_f, x_m, y_m, z_m), got {table.shape[1]}"
            )
        out[path.stem.removeprefix("case_")] = torch.from_numpy(table)
    return out


#: The thin-plate spline of the evaluation, as the data mirror's README measures it (2.27 mm on 104–113).
TPS_SETTINGS: dict[str, Any] = {"kernel": "thin_plate_spline", "smoothing": 1.0, "neighbors": 200}


def keypoint_tre(
    keypoints: torch.Tensor, landmarks: torch.Tensor, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> torch.Tensor:
    """TRE (N,) of a method given as corresponding keypoints, at landmarks it never saw.

    ``keypoints`` (K, 6): fixed keypoint, predicted moving position; ``landmarks`` (N, 6): fixed, moving;
    both voxel indices of one frame; ``spacing`` mm per voxel. A thin-plate spline
    (:data:`TPS_SETTINGS`) interpolates the displacements ``k_m − k_f`` at the fixed landmarks f; the
    error is our TRE distance ‖(f + u(f) − m)·spacing‖ (:func:`target_registration_error` with the
    moved fixed landmarks in place of the identity-mapped ones).
    """
    from scipy.interpolate import RBFInterpolator

    kp = keypoints.double().numpy()
    tps = RBFInterpolator(kp[:, :3], kp[:, 3:] - kp[:, :3], **TPS_SETTINGS)
    f, m = landmarks[:, :3].double(), landmarks[:, 3:].double()
    moved = f + torch.from_numpy(tps(f.numpy()))
    return target_registration_error(None, moved, m, spacing).initial


class PeerResult(NamedTuple):
    """A peer method's TRE per case (mm), and the landmarks' initial distance, on the cases it covers."""

    method: str
    tre: dict[str, torch.Tensor]
    initial: dict[str, torch.Tensor]

    def cases(self, split: Sequence[str] | None = None) -> list[str]:
        return [c for c in self.tre if split is None or c in set(split)]

    def mean(self, split: Sequence[str] | None = None, initial: bool = False) -> float:
        """Mean over all landmarks (pooled) of the cases in ``split`` (None: all it covers)."""
        values = self.initial if initial else self.tre
        return float(torch.cat([values[c] for c in self.cases(split)]).mean())

    def n_landmarks(self, split: Sequence[str] | None = None) -> int:
        return sum(len(self.tre[c]) for c in self.cases(split))

    def summary(self) -> dict[str, Any]:
        """Pooled means on Lung250M-4B's test split 104–113 and on the other cases (its validation cases)."""
        other = [c for c in self.tre if c not in set(BENCHMARK_TEST_CASES)]
        return {
            "method": self.method,
            "104-113": self.mean(BENCHMARK_TEST_CASES),
            "other": self.mean(other),
            "cases_104_113": self.cases(BENCHMARK_TEST_CASES),
            "cases_other": other,
            "landmarks_104_113": self.n_landmarks(BENCHMARK_TEST_CASES),
            "landmarks_other": self.n_landmarks(other),
            "tre_initial_104_113": self.mean(BENCHMARK_TEST_CASES, initial=True),
            "tre_initial_other": self.mean(other, initial=True),
        }


def evaluate_keypoint_predictions(
    data_dir: str | Path,
    folder: str = VXMPP_FOLDER,
    method: str = VXMPP_LABEL,
    spacing: dict[str, Sequence[float]] | None = None,
) -> PeerResult:
    """TRE of Lung250M-4B's released keypoint predictions (default: VoxelMorph++) at the original-frame
    landmarks, per case (:func:`keypoint_tre`). ``spacing``: mm per voxel per case; default 1 mm, i.e.
    voxels of the original frame, as the benchmark's ``evaluate.py`` measures."""
    landmarks = load_original_landmarks(data_dir)
    predictions = load_keypoint_predictions(data_dir, folder)
    unknown = sorted(set(predictions) - set(landmarks))
    if unknown:
        raise ValueError(f"predictions for cases {unknown} have no landmarks in {ORIGINAL_LANDMARKS_FILE}")
    tre, initial = {}, {}
    for case in sorted(predictions):
        mm = (spacing or {}).get(case, (1.0, 1.0, 1.0))
        lms = landmarks[case]
        tre[case] = keypoint_tre(predictions[case], lms, mm)
        initial[case] = target_registration_error(None, lms[:, :3], lms[:, 3:], mm).initial
    return PeerResult(method, tre, initial)


# --------------------------------------------------------------------------------------------------
# Per-landmark results in the shape of the paper's CSVs
# --------------------------------------------------------------------------------------------------


def per_landmark_table(evaluation: Evaluation) -> np.ndarray:
    """Per-landmark TRE (mm) in the shape of the paper's result CSVs: one row per landmark, cases in
    :data:`~regdiff_core.config.ALL_TEST_CASES` order, columns (initial, network, after TTA); the last
    column is NaN without TTA. ``(n_landmarks, 3)`` float64."""
    order = {c: i for i, c in enumerate(ALL_TEST_CASES)}
    rows = []
    for r in sorted(evaluation.cases, key=lambda r: order.get(r.case, len(order))):
        tta = r.tta.tre if r.tta is not None else torch.full_like(r.net.tre, float("nan"))
        rows.append(torch.stack((r.initial, r.net.tre, tta), dim=1).double())
    return torch.cat(rows).numpy() if rows else np.zeros((0, 3))


def write_per_landmark_csv(evaluation: Evaluation, path: str | Path) -> Path:
    """Write :func:`per_landmark_table` as the paper writes its CSVs (``np.savetxt``, ``%.18e``, comma)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    np.savetxt(tmp, per_landmark_table(evaluation), fmt="%.18e", delimiter=",")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------------
# Chapter 6's evaluations of the trained runs (model files in, Evaluations out)
# --------------------------------------------------------------------------------------------------


def evaluate_runs(
    profile: Profile, work_dir: str | Path, test, landmarks, device: torch.device
) -> tuple[dict[str, Evaluation], dict[str, list[float]]]:
    """Every run chapter 5 trained, on the test pairs: each regime's first run with
    ``evaluation.tta_iterations`` steps of test-time adaptation (the paper's table), the other runs
    (seeds) with the network alone. Returns (regime → its first run's :class:`Evaluation`, regime → the
    network's mean TRE in mm of each run)."""
    from regdiff_core.store.registration import load_registration

    evaluations: dict[str, Evaluation] = {}
    per_seed: dict[str, list[float]] = {}
    for regime, n_runs in regime_runs(profile).items():
        for run in range(n_runs):
            model = load_registration(profile, work_dir, regime, device, run=run)
            ev = evaluate_model(
                profile, model, test, landmarks, name=regime, device=device,
                tta_iterations=profile.evaluation.tta_iterations if run == 0 else 0,
            )  # fmt: skip
            per_seed.setdefault(regime, []).append(ev.summary()["tre_net"])
            if run == 0:
                evaluations[regime] = ev
    return evaluations, per_seed


def tta_curves(
    profile: Profile, work_dir: str | Path, data_dir: str | Path, test, regimes, device: torch.device
):
    """TRE after each of ``evaluation.curve_steps`` TTA steps (:func:`~regdiff_core.metrics.tta_curve`) for
    each regime's first run, on the first ``evaluation.curve_pairs`` test pairs (all when 0). Returns
    (regime → {steps: mean TRE (mm)}, the test pairs used)."""
    import dataclasses

    from regdiff_core.store.data import load_landmarks
    from regdiff_core.store.registration import load_registration

    n_curve = profile.evaluation.curve_pairs or len(test)
    curve_test = dataclasses.replace(
        test, cases=test.cases[:n_curve], fixed=test.fixed[:n_curve], moving=test.moving[:n_curve],
        spacing=test.spacing[:n_curve], raw_shapes=None if test.raw_shapes is None else test.raw_shapes[:n_curve],
    )  # fmt: skip
    curve_lms = load_landmarks(profile, data_dir, curve_test.cases)
    curves = {
        r: tta_curve(
            profile, load_registration(profile, work_dir, r, device), curve_test, curve_lms,
            profile.evaluation.curve_steps, device=device,
        )
        for r in regimes
    }  # fmt: skip
    return curves, curve_test


def realism_gains(
    profile: Profile, work_dir: str | Path, test, device: torch.device
) -> dict[str, torch.Tensor]:
    """How much the ``real_all`` network raises the overlap of each pair (:func:`~regdiff_core.metrics.
    dice_gain`) of three sets: the real test pairs, the VQ-AE reconstructions of the training pairs, and
    synthetic pairs (as many as chapter 4's statistics use, at most ``registration.n_synthetic``)."""
    from regdiff_core.store.registration import load_registration
    from regdiff_core.store.sampling import load_synthetic, read_synthetic_pair, reconstruction_files

    real_all_net = load_registration(profile, work_dir, "real_all", device)
    recon = [read_synthetic_pair(p) for p in reconstruction_files(work_dir)]
    synth = load_synthetic(work_dir, n=min(profile.sampling.n_stats, profile.registration.n_synthetic))
    pair_sets = {
        "test pairs (real, unseen)": (test.fixed, test.moving),
        "VQ-AE reconstructions": (torch.stack([f for f, _ in recon]), torch.stack([m for _, m in recon])),
        "synthetic": (synth.fixed, synth.moving),
    }
    return {name: dice_gain(real_all_net, f, m, device=device) for name, (f, m) in pair_sets.items()}


def evaluate_released(
    profile: Profile, work_dir: str | Path, data_dir: str | Path, test, landmarks, device: torch.device
) -> tuple[dict[str, Evaluation], list[str]]:
    """The authors' released networks (:data:`RELEASED_NETWORKS`, in ``data_dir/unleashing-registration``)
    on the test pairs, with ``evaluation.tta_iterations`` TTA steps. Returns (regime → its
    :class:`Evaluation`, the names of the files not downloaded)."""
    from regdiff_core.store.registration import load_registration

    released, missing = {}, []
    for regime, name in RELEASED_NETWORKS.items():
        path = Path(data_dir) / "unleashing-registration" / name
        if not path.is_file():
            missing.append(name)
            continue
        model = load_registration(profile, work_dir, path, device)
        released[regime] = evaluate_model(
            profile, model, test, landmarks, name=f"released {regime}",
            tta_iterations=profile.evaluation.tta_iterations, device=device,
        )  # fmt: skip
    return released, missing
