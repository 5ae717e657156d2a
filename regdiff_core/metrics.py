"""Chapter 6: how good is a registration — landmark error, overlap, smoothness, inverse consistency.

Metrics (all on displacement fields in the convention of :mod:`regdiff_core.registration`: voxels of
the grid the field lives on, channel ``c`` along axis ``c``, pull-back, A∘φ_AB ≈ B):

* **TRE** (target registration error, mm): each moving landmark m is carried to m + u_AB(m) by the
  displacement sampled (trilinearly) at m on the registration grid; the distance to its fixed partner
  f is measured in the canonical 256×208×256 frame and scaled by the voxel spacing (mm per canonical
  voxel). Landmarks move between frames with align_corners=False geometry
  (:func:`~regdiff_core.registration.rescale_points`, the same formula as
  :func:`regdiff_core.data.canonical_to_profile`), so TRE is comparable at every profile resolution.
  Where this differs from the authors' code (mm, the landmark mapping) and why: one list, on the book's
  profiles page (``book/profiles.md``; ``SEED_DIFFERENCES`` in ``book/_tools/bookpages.py``).
* **Dice** of the warped fixed mask and the moving mask (threshold ½), at the profile resolution.
* **Jacobian determinant** det(I + ∇u) by central differences: % of voxels with det ≤ 0 (folding) and
  the standard deviation of log det (SDlogJ; det clamped at 1e-9 first so that folded voxels count as
  very large log-contractions instead of NaN — Learn2Reg's evaluation adds 3 before the log instead,
  which damps the value; we do not).
* **Inverse-consistency error** mean ‖φ_AB ∘ φ_BA − id‖ in mm over the grid: zero by construction up to
  interpolation error for this network, and the number that shows it.

Then the chapter's evaluation: every trained regime on the test pairs, without and with test-time
adaptation (:func:`evaluate_model`), tables in the paper's shape with the paper's own numbers read
from its result CSVs (:func:`~regdiff_core.store.metrics.paper_results`); the box plots are in
``figures/metrics.py``. The paper's claim is judged over training seeds (:func:`seed_claim`: a
difference counts only beyond the seed spread), TTA is followed step by step (:func:`tta_curve`), and
:func:`dice_gain` measures pair realism without landmarks.

A peer on the same landmarks: Lung250M-4B's VoxelMorph++ predictions for 17 of the 27 test pairs, scored
with our TRE by :func:`~regdiff_core.store.metrics.evaluate_keypoint_predictions` (a thin-plate spline
through its keypoints; the units are explained there), stand beside ours in :func:`with_reference_rows`.

The files — the paper's result CSVs and released networks' names, Lung250M-4B's repository files,
our per-landmark CSV — are read and written by :mod:`regdiff_core.store.metrics`; this module computes.

Left out on purpose: the Hausdorff distance and per-lobe Dice (no lobe labels in the release), and
significance tests between regimes (three seeds per regime cannot carry them; the seed spread is
reported instead).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from regdiff_core.config import ALL_TEST_CASES, CANONICAL_SHAPE, Profile
from regdiff_core.data import dice
from regdiff_core.registration import (
    TwoStepRegistration,
    compose,
    registration_grid,
    rescale_points,
    resize_field,
    test_time_adapt,
    to_grid,
    warp,
)

if TYPE_CHECKING:  # only an annotation: the chapter module does not import the store at run time
    from regdiff_core.store.metrics import PeerResult

# --------------------------------------------------------------------------------------------------
# Metrics on fields.
# --------------------------------------------------------------------------------------------------


def sample_field(ddf: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of a field ``ddf`` (dim, *S) at ``points`` (N, dim) voxel indices → (N, dim).

    Outside the grid the nearest border value is used (as everywhere a displacement is resampled here).
    """
    dim = ddf.shape[0]
    sizes = torch.tensor(ddf.shape[1:], dtype=points.dtype, device=points.device)
    # voxel index → grid_sample units (align_corners=True), last axis first
    normalised = (2 * points / (sizes - 1).clamp(min=1) - 1).flip(-1)
    grid = normalised.view(1, -1, *([1] * (dim - 1)), dim).to(ddf.dtype)
    out = F.grid_sample(ddf.unsqueeze(0), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(dim, -1).t()


class TRE(NamedTuple):
    """Per-landmark errors in mm: ``initial`` ‖f − m‖, ``registered`` ‖f − (m + u(m))‖; both (N,)."""

    initial: torch.Tensor
    registered: torch.Tensor
    moved: torch.Tensor  # (N, dim) moved moving landmarks, canonical voxels


def target_registration_error(
    phi_AB: torch.Tensor | None,
    fixed_points: torch.Tensor,
    moving_points: torch.Tensor,
    spacing: Sequence[float] | torch.Tensor,
    frame_shape: Sequence[int] = CANONICAL_SHAPE,
) -> TRE:
    """TRE of a map ``phi_AB`` (dim, *S) in voxels of its grid S (None = identity).

    ``fixed_points``, ``moving_points``: (N, dim) voxel indices in the frame of ``frame_shape`` (the
    canonical 256×208×256); ``spacing``: (dim,) mm per frame voxel.
    """
    f = fixed_points.double()
    m = moving_points.double()
    mm = torch.as_tensor(spacing, dtype=torch.float64)
    if phi_AB is None:
        moved = m
    else:
        grid_shape = tuple(phi_AB.shape[1:])
        m_grid = rescale_points(m, frame_shape, grid_shape)
        u_grid = sample_field(phi_AB.double().cpu(), m_grid)
        # a displacement of u voxels on a size-s grid is u·S/s voxels of the size-S frame
        per_voxel = torch.tensor([S / s for S, s in zip(frame_shape, grid_shape)], dtype=torch.float64)
        moved = m + u_grid * per_voxel
    # TRE = ‖(f − (m + u(m)))·spacing‖
    return TRE(((f - m) * mm).norm(dim=-1), ((f - moved) * mm).norm(dim=-1), moved)


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """det(I + ∇u) of ``ddf`` (B, dim, *S) in voxels → (B, *S); central differences (one-sided at the edges)."""
    dim = ddf.shape[1]
    # J[..., i, j] = δ_ij + ∂u_i/∂x_j
    grads = [torch.stack(torch.gradient(ddf[:, i], dim=list(range(1, dim + 1))), -1) for i in range(dim)]
    J = torch.stack(grads, -2) + torch.eye(dim, dtype=ddf.dtype, device=ddf.device)
    return torch.linalg.det(J.double()).to(ddf.dtype)


class JacobianStats(NamedTuple):
    folding_percent: float  # % of voxels with det ≤ 0
    sdlogj: float  # std of log(max(det, 1e-9))


def jacobian_stats(ddf: torch.Tensor) -> JacobianStats:
    """Folding % and SDlogJ of ``ddf`` (B, dim, *S), voxels, over all voxels of the batch."""
    det = jacobian_determinant(ddf.double())
    folding = float((det <= 0).double().mean() * 100)
    sdlogj = float(det.clamp(min=1e-9).log().std())
    return JacobianStats(folding, sdlogj)


def inverse_consistency_error(
    phi_AB: torch.Tensor, phi_BA: torch.Tensor, mm_per_voxel: Sequence[float] | None = None
) -> float:
    """Mean ‖φ_AB ∘ φ_BA − id‖ over the grid. Fields (B, dim, *S) in voxels; in mm if ``mm_per_voxel`` (dim,)."""
    residual = compose(phi_AB, phi_BA)  # displacement of φ_AB ∘ φ_BA; id has none
    if mm_per_voxel is not None:
        scale = torch.as_tensor(mm_per_voxel, dtype=residual.dtype, device=residual.device)
        residual = residual * scale.view(1, -1, *([1] * (residual.dim() - 2)))
    return float(residual.norm(dim=1).mean())


# --------------------------------------------------------------------------------------------------
# Evaluation of a model on the test pairs.
# --------------------------------------------------------------------------------------------------


@dataclass
class MapMetrics:
    """The metrics of one map on one test pair. ``tre``: (N,) mm per landmark."""

    tre: torch.Tensor
    folding_percent: float
    sdlogj: float
    ic_error: float
    dice: float

    @property
    def tre_mean(self) -> float:
        return float(self.tre.mean())


@dataclass
class CaseEvaluation:
    case: str
    initial: torch.Tensor  # (N,) mm
    dice_before: float
    net: MapMetrics
    tta: MapMetrics | None = None
    tta_seconds: float = 0.0


@dataclass
class Evaluation:
    """One model on the test pairs. ``name``: regime, "identity" or a released network."""

    name: str
    tta_iterations: int
    cases: list[CaseEvaluation] = field(default_factory=list)
    seconds: float = 0.0
    n_train_pairs: int | None = None  # pairs the model was trained on, if known

    def subset(self, cases: Sequence[str]) -> list[CaseEvaluation]:
        return [c for c in self.cases if c.case in set(cases)]

    def summary(self, cases: Sequence[str] | None = None) -> dict[str, Any]:
        """Pooled over the landmarks of ``cases`` (default all): TRE means (mm); map metrics averaged over pairs.

        ``folding_percent``, ``sdlogj``, ``ic_error``, ``dice`` describe the final maps (after TTA when
        it ran); the same with suffix ``_net`` describe the network alone.
        """
        rows = self.cases if cases is None else self.subset(cases)
        if not rows:
            return {"n_pairs": 0, "n_landmarks": 0}
        out: dict[str, Any] = {
            "n_pairs": len(rows),
            "n_landmarks": int(sum(len(r.initial) for r in rows)),
            "tre_initial": float(torch.cat([r.initial for r in rows]).mean()),
            "tre_net": float(torch.cat([r.net.tre for r in rows]).mean()),
            "tre_tta": float(torch.cat([r.tta.tre for r in rows]).mean())
            if rows[0].tta is not None
            else None,
            "dice_before": float(np.mean([r.dice_before for r in rows])),
        }
        for key in ("folding_percent", "sdlogj", "ic_error", "dice"):
            out[f"{key}_net"] = float(np.mean([getattr(r.net, key) for r in rows]))
            final = [getattr(r.tta if r.tta is not None else r.net, key) for r in rows]
            out[key] = float(np.mean(final))
        return out

    #: the keys :meth:`metric_values` reports (the chapter's metrics file uses them per regime)
    METRIC_KEYS = (
        "tre_net", "tre_tta", "folding_percent", "sdlogj", "ic_error", "dice",
        "folding_percent_net", "sdlogj_net", "ic_error_net", "dice_net",
    )  # fmt: skip

    def metric_values(self, cases: Sequence[str] | None = None) -> dict[str, Any]:
        """The summary's TRE and map metrics (no counts), for a metrics file."""
        summary = self.summary(cases)
        return {k: summary.get(k) for k in self.METRIC_KEYS}

    def per_case_rows(self) -> list[dict[str, Any]]:
        """One row per test pair, for a table."""
        rows = []
        for r in self.cases:
            row = {
                "model": self.name,
                "case": r.case,
                "landmarks": len(r.initial),
                "TRE initial (mm)": float(r.initial.mean()),
                "TRE net (mm)": r.net.tre_mean,
            }
            if r.tta is not None:
                row["TRE TTA (mm)"] = r.tta.tre_mean
            final = r.tta if r.tta is not None else r.net
            row.update(
                {
                    "folding (%)": final.folding_percent,
                    "SDlogJ": final.sdlogj,
                    "IC error (mm)": final.ic_error,
                    "Dice before": r.dice_before,
                    "Dice after": final.dice,
                }
            )
            rows.append(row)
        return rows


def _map_metrics(
    model: TwoStepRegistration | None,
    A: torch.Tensor,
    B: torch.Tensor,
    A_full: torch.Tensor,
    B_full: torch.Tensor,
    f: torch.Tensor,
    m: torch.Tensor,
    spacing: torch.Tensor,
) -> MapMetrics:
    grid = tuple(A.shape[2:])
    if model is None:
        phi_AB = phi_BA = torch.zeros(1, A.dim() - 2, *grid, device=A.device)
    else:
        reg = model.register(A, B)
        phi_AB, phi_BA = reg.phi_AB, reg.phi_BA
    phi_AB, phi_BA = phi_AB.float().cpu(), phi_BA.float().cpu()
    tre = target_registration_error(phi_AB[0], f, m, spacing)
    stats = jacobian_stats(phi_AB)
    mm_per_voxel = [S / s * float(sp) for S, s, sp in zip(CANONICAL_SHAPE, grid, spacing)]
    ic = inverse_consistency_error(phi_AB, phi_BA, mm_per_voxel)
    # Dice at the profile resolution: warp the fixed mask by φ_AB resampled to that grid
    warped_A = warp(A_full.cpu(), resize_field(phi_AB, A_full.shape[2:]))
    return MapMetrics(
        tre.registered.float(),
        stats.folding_percent,
        stats.sdlogj,
        ic,
        float(dice(warped_A > 0.5, B_full > 0.5)),
    )


def evaluate_model(
    profile: Profile,
    model: TwoStepRegistration | None,
    test,
    landmarks,
    *,
    name: str,
    tta_iterations: int,
    device: torch.device,
    progress: bool = False,
) -> Evaluation:
    """Evaluate ``model`` (None = the identity map) on every pair of ``test`` (a ``PairSet`` at the profile
    resolution) with its ``landmarks`` (a ``Landmarks``, same case order), without and — if
    ``tta_iterations`` > 0 and there is a model — with test-time adaptation (Adam, ``profile.evaluation.tta_lr``).
    """
    if list(test.cases) != list(landmarks.cases):
        raise ValueError(f"test pairs {test.cases} and landmarks {landmarks.cases} differ")
    ev = profile.evaluation
    scale = model.cfg.scale if model is not None else profile.registration.scale
    grid = registration_grid(test.fixed.shape[1:], scale)
    amp = model is not None and model.cfg.amp
    out = Evaluation(name, tta_iterations if model is not None else 0)
    out.n_train_pairs = getattr(model, "n_train_pairs", None)
    t0 = time.perf_counter()
    iterator = range(len(test.cases))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"evaluate {name}", unit="pair")
    for i in iterator:
        case = test.cases[i]
        vols = test.volumes([i])  # (1, 2, *shape) float
        A_full, B_full = vols[:, :1], vols[:, 1:]
        A = to_grid(A_full, grid).to(device)
        B = to_grid(B_full, grid).to(device)
        f, m = landmarks.canonical_fixed[i], landmarks.canonical_moving[i]
        spacing = test.spacing[i]
        initial = target_registration_error(None, f, m, spacing).initial.float()
        row = CaseEvaluation(
            case,
            initial,
            float(dice(A_full > 0.5, B_full > 0.5)),
            _map_metrics(model, A, B, A_full, B_full, f, m, spacing),
        )
        if model is not None and tta_iterations > 0:
            adapted = test_time_adapt(model, A, B, tta_iterations, ev.tta_lr, amp, progress=progress)
            row.tta = _map_metrics(adapted.model, A, B, A_full, B_full, f, m, spacing)
            row.tta_seconds = adapted.seconds
        out.cases.append(row)
    out.seconds = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------------------------------
# The paper's own numbers and the tables.
# --------------------------------------------------------------------------------------------------

#: A regime-neutral name for each training regime, and how many pairs the paper used in it.
REGIME_LABELS: dict[str, str] = {
    "real_all": "all real pairs",
    "real_few": "few real pairs",
    "synthetic": "synthetic pairs",
    "synthetic_plus_few": "synthetic + few real, not in the paper",
    "reconstructions": "VQ-AE reconstructions of all real pairs, not in the paper",
}
PAPER_PAIRS: dict[str, int] = {"real_all": 97, "real_few": 10, "synthetic": 256}


class PaperResults(NamedTuple):
    """Per landmark (4590,) in mm ≈ canonical voxels, rows in the order of ALL_TEST_CASES; ``case`` per row."""

    case: list[str]
    initial: torch.Tensor
    net: dict[str, torch.Tensor]
    tta: dict[str, torch.Tensor]

    def mean(self, values: torch.Tensor, cases: Sequence[str] | None = None) -> float:
        if cases is None:
            return float(values.mean())
        keep = torch.tensor([c in set(cases) for c in self.case])
        return float(values[keep].mean())


def with_reference_rows(
    rows: Sequence[dict[str, Any]], peer: PeerResult, splits: dict[str, Sequence[str] | None]
) -> list[dict[str, Any]]:
    """The comparison table (:func:`comparison_rows`) with a column for a reference method and one row
    per entry of ``splits`` (label → cases) holding its pooled TRE on those cases."""
    column = "reference"
    out = [{**row, column: None} for row in rows]
    for label, cases in splits.items():
        n = len(peer.cases(cases))
        blank = dict.fromkeys(rows[0], None) if rows else {}
        out.append(
            {**blank, "training data": f"{peer.method}, {label} ({n} pairs)", column: peer.mean(cases)}
        )
    return out


def comparison_rows(
    evaluations: dict[str, Evaluation], paper: PaperResults | None, cases: Sequence[str] | None = None,
    net_means: dict[str, float] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """The paper's table: one row per training regime, our TRE (network / after TTA) beside the paper's.

    Ours is pooled over the landmarks of ``cases`` among our test pairs; the paper's over the same
    subset of its 27 pairs when ``cases`` is the benchmark split, else over all 27. ``net_means``
    (regime → mm) replaces our network column, e.g. by the mean over training seeds.
    """
    rows = []
    any_eval = next(iter(evaluations.values()))
    ours_initial = any_eval.summary(cases)["tre_initial"]
    paper_cases = None if cases is None else [c for c in ALL_TEST_CASES if c in set(cases)]
    rows.append(
        {
            "training data": "none (initial)",
            "ours: network": ours_initial,
            "ours: + TTA": None,
            "paper: network": paper.mean(paper.initial, paper_cases) if paper else None,
            "paper: + TTA": None,
        }
    )
    for regime, evaluation in evaluations.items():
        s = evaluation.summary(cases)
        has_paper = paper is not None and regime in paper.net
        label = REGIME_LABELS.get(regime, regime)
        counts = [f"ours {evaluation.n_train_pairs}"] if evaluation.n_train_pairs is not None else []
        counts += [f"paper {PAPER_PAIRS[regime]}"] if regime in PAPER_PAIRS else []
        rows.append(
            {
                "training data": f"{label} ({', '.join(counts)})" if counts else label,
                "ours: network": (net_means or {}).get(regime, s["tre_net"]),
                "ours: + TTA": s["tre_tta"],
                "paper: network": paper.mean(paper.net[regime], paper_cases) if has_paper else None,
                "paper: + TTA": paper.mean(paper.tta[regime], paper_cases) if has_paper else None,
            }
        )
    return rows


def evaluation_sentence(summaries: dict[str, dict[str, Any]], tre_initial: float) -> str:
    """A plain sentence built from the numbers: which regime is best, whether TTA helps, and the caveat."""
    parts = []
    best_net = min(summaries, key=lambda k: summaries[k]["tre_net"])
    parts.append(
        f"Without adaptation the best network here is '{best_net}' "
        f"({summaries[best_net]['tre_net']:.2f} mm against {tre_initial:.2f} mm before registration)"
    )
    tta = {k: v["tre_tta"] for k, v in summaries.items() if v.get("tre_tta") is not None}
    if tta:
        best_tta = min(tta, key=tta.get)
        helped = [k for k in tta if tta[k] < summaries[k]["tre_net"]]
        parts.append(
            f"; test-time adaptation lowers the error for {len(helped)} of {len(tta)} regimes, "
            f"best '{best_tta}' at {tta[best_tta]:.2f} mm"
        )
    return "".join(parts) + "."


#: The paper's claim as orderings of the network column (mean TRE, lower is better): (better, worse).
PAPER_ORDERING: tuple[tuple[str, str], ...] = (
    ("real_all", "synthetic"),
    ("synthetic", "real_few"),
    ("synthetic_plus_few", "real_few"),
)


class Ordering(NamedTuple):
    """Which of the paper's orderings (:data:`PAPER_ORDERING`) a run shows for one column (``key``)."""

    key: str
    holds: dict[str, bool]  # "real_all < synthetic" → True/False, for every pair both regimes of which ran
    all_hold: bool
    sentence: str


def paper_ordering(summaries: dict[str, dict[str, Any]], key: str = "tre_net") -> Ordering:
    """Check the paper's claim on this run: real_all < synthetic < real_few and synthetic+few < real_few.

    ``summaries``: regime → :meth:`Evaluation.summary`; ``key``: ``"tre_net"`` (the network column, where
    the paper states its claim) or ``"tre_tta"``. The sentence names every comparison with its numbers.
    """
    holds: dict[str, bool] = {}
    phrases = []
    for better, worse in PAPER_ORDERING:
        if better not in summaries or worse not in summaries:
            continue
        a, b = summaries[better].get(key), summaries[worse].get(key)
        if a is None or b is None:
            continue
        ok = a < b
        holds[f"{better} < {worse}"] = ok
        phrases.append(f"{better} {a:.2f} {'<' if ok else '≥'} {worse} {b:.2f} mm")
    all_hold = bool(holds) and all(holds.values())
    column = "network" if key == "tre_net" else "after test-time adaptation"
    if not holds:
        sentence = f"The regimes needed to check the paper's ordering ({column}) were not run."
    else:
        verdict = (
            "in the paper's order"
            if all_hold
            else f"not in the paper's order ({sum(holds.values())} of {len(holds)} comparisons hold)"
        )
        sentence = f"Column '{column}': " + "; ".join(phrases) + f" — {verdict}."
    return Ordering(key, holds, all_hold, sentence)


# --------------------------------------------------------------------------------------------------
# The claim over several training seeds, TTA against its number of steps, and pair realism.
# --------------------------------------------------------------------------------------------------


class SeedSpread(NamedTuple):
    """One regime's network TRE over its training runs: ``values`` (mm, one per seed), their ``mean`` and
    sample standard deviation ``std`` (n − 1 in the denominator; 0 for a single run)."""

    values: list[float]
    mean: float
    std: float


def seed_spread(values: Sequence[float]) -> SeedSpread:
    """Mean and sample standard deviation of per-seed values."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("seed_spread needs at least one value")
    mean = sum(v) / len(v)
    std = (sum((x - mean) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0
    return SeedSpread(v, mean, std)


class SeedClaim(NamedTuple):
    """The paper's ordering (:data:`PAPER_ORDERING`) judged on seed means, against the seed spread.

    ``comparisons``: "better < worse" → {"difference": mean(worse) − mean(better), "spread": the larger
    of the two regimes' seed standard deviations, "holds": difference > spread}; a difference inside the
    spread does not count as holding. ``share_of_gap``: (few − synthetic) / (few − all), how far
    synthetic pairs move the network from few real pairs towards all of them (the paper: 0.53), None
    where a regime is missing.
    """

    spreads: dict[str, SeedSpread]
    comparisons: dict[str, dict[str, Any]]
    share_of_gap: float | None
    all_hold: bool
    sentence: str


#: The paper's network column, (few − synthetic) / (few − all) = (10.98 − 7.27) / (10.98 − 4.01).
PAPER_SHARE_OF_GAP = (10.98 - 7.27) / (10.98 - 4.01)


def seed_claim(per_seed: dict[str, Sequence[float]]) -> SeedClaim:
    """Judge the paper's ordering from each regime's per-seed network TRE (regime → values in mm)."""
    spreads = {r: seed_spread(v) for r, v in per_seed.items() if len(v)}
    comparisons: dict[str, dict[str, Any]] = {}
    phrases = []
    for better, worse in PAPER_ORDERING:
        if better not in spreads or worse not in spreads:
            continue
        a, b = spreads[better], spreads[worse]
        difference, spread = b.mean - a.mean, max(a.std, b.std)
        holds = difference > spread
        comparisons[f"{better} < {worse}"] = {"difference": difference, "spread": spread, "holds": holds}
        relation = "holds" if holds else ("inside the seed spread" if difference > 0 else "reversed")
        phrases.append(
            f"{better} {a.mean:.2f} vs {worse} {b.mean:.2f} mm: difference {difference:.2f} mm against a seed "
            f"spread of {spread:.2f} mm ({relation})"
        )
    share = None
    if all(r in spreads for r in ("real_all", "synthetic", "real_few")):
        gap = spreads["real_few"].mean - spreads["real_all"].mean
        if gap > 0:
            share = (spreads["real_few"].mean - spreads["synthetic"].mean) / gap
    all_hold = bool(comparisons) and all(c["holds"] for c in comparisons.values())
    if not comparisons:
        sentence = "The regimes needed to check the paper's ordering were not run."
    else:
        sentence = "; ".join(phrases) + "."
        if share is not None:
            sentence += (
                f" Synthetic pairs take the network {100 * share:.0f} % of the way from few real pairs to all of "
                f"them (the paper: {100 * PAPER_SHARE_OF_GAP:.0f} %)."
            )
    return SeedClaim(spreads, comparisons, share, all_hold, sentence)


@torch.no_grad()
def _pair_tre(model: TwoStepRegistration, A, B, f, m, spacing) -> torch.Tensor:
    reg = model.register(A, B)
    return target_registration_error(reg.phi_AB.float().cpu()[0], f, m, spacing).registered.float()


def tta_curve(
    profile: Profile,
    model: TwoStepRegistration,
    test,
    landmarks,
    milestones: Sequence[int],
    *,
    device: torch.device,
) -> dict[int, float]:
    """Mean TRE (mm, pooled over the landmarks of every pair of ``test``) after each number of test-time
    adaptation steps in ``milestones`` (0 = the network alone). One adaptation per pair runs to the largest
    milestone and is measured on the way, with the settings of :func:`evaluate_model` (Adam,
    ``evaluation.tta_lr``), so the value at a milestone equals a TTA run of that many steps.
    """
    from regdiff_core.registration import greedy_iteration, make_optimizers

    milestones = sorted({int(k) for k in milestones})
    if not milestones or milestones[0] < 0:
        raise ValueError(f"milestones must be >= 0, got {milestones}")
    grid = registration_grid(test.fixed.shape[1:], model.cfg.scale)
    amp = model.cfg.amp and device.type == "cuda"
    errors: dict[int, list[torch.Tensor]] = {k: [] for k in milestones}
    for i in range(len(test.cases)):
        vols = test.volumes([i])
        A, B = to_grid(vols[:, :1], grid).to(device), to_grid(vols[:, 1:], grid).to(device)
        f, m, spacing = landmarks.canonical_fixed[i], landmarks.canonical_moving[i], test.spacing[i]
        adapted = copy.deepcopy(model).train()
        optimizers = make_optimizers(adapted, profile.evaluation.tta_lr)
        scaler = torch.amp.GradScaler(device.type, enabled=amp) if amp else None
        for step in range(milestones[-1] + 1):
            if step in errors:
                errors[step].append(_pair_tre(adapted.eval(), A, B, f, m, spacing))
                adapted.train()
            if step < milestones[-1]:
                greedy_iteration(adapted, optimizers, A, B, scaler, amp)
    return {k: float(torch.cat(v).mean()) for k, v in errors.items()}


@torch.no_grad()
def dice_gain(
    model: TwoStepRegistration, fixed: torch.Tensor, moving: torch.Tensor, *, device: torch.device,
    threshold: float = 0.5,
) -> torch.Tensor:  # fmt: skip
    """How much ``model`` raises the fixed-vs-moving overlap of each pair: Dice(A∘φ_AB, B) − Dice(A, B),
    (N,), masks ``> threshold`` at the profile resolution; ``fixed``/``moving`` (N, H, W, D).

    A number of pair realism that needs no landmarks: a network trained on real pairs raises the overlap of
    real pairs by undoing their breathing motion; on synthetic pairs whose two halves hardly differ, or
    differ in ways no real motion explains, it can raise it much less.
    """
    grid = registration_grid(fixed.shape[1:], model.cfg.scale)
    gains = []
    for f_i, m_i in zip(fixed, moving):
        A_full = (f_i.float() > threshold).float()[None, None]
        B_full = (m_i.float() > threshold).float()[None, None]
        reg = model.register(to_grid(A_full, grid).to(device), to_grid(B_full, grid).to(device))
        warped = warp(A_full, resize_field(reg.phi_AB.float().cpu(), A_full.shape[2:]))
        gains.append(
            float(dice(warped > threshold, B_full > threshold))
            - float(dice(A_full > threshold, B_full > threshold))
        )
    return torch.tensor(gains, dtype=torch.float64)
