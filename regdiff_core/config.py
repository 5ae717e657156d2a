"""Named profiles: every size, count and hyperparameter a chapter needs, in one place.

A *profile* collects one frozen dataclass per pipeline stage. Four profiles exist:

- ``ci``    — 2 CPU cores, minutes per chapter: reduced resolution, narrow networks, few cases.
              This is what the published book shows.
- ``gpu``   — one H100-class GPU, minutes for the whole book: the release's 10 training pairs and every
              test pair, half resolution (the paper's registration grid), colab's networks, short runs.
- ``colab`` — one free 16 GB GPU, about an hour per chapter: half resolution, the full 97 pairs.
- ``paper`` — exactly the sizes and hyperparameters of the paper's code (see ``shared/PAPER.md``);
              the few remaining differences from the seed are listed in ``book/profiles.md``.

Notebooks and the CLI select a profile by name and may override a few values with dotted keys::

    profile = get_profile("ci", {"vqae.iterations": 50})

Unknown profile names, stages or fields raise :class:`ConfigError` (a typo must not silently fall back
to a default, as it would with a plain dict lookup).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: The seed's canonical frame (H, W, D) in voxels (about 1 mm). Landmarks live in this frame.
CANONICAL_SHAPE: tuple[int, int, int] = (256, 208, 256)

#: The ten training pairs the paper's release ships (its "10 real pairs" regime).
RELEASE_TRAIN_CASES: tuple[str, ...] = tuple(f"{i:03d}" for i in range(32, 42))

#: The 27 validation+test pairs with landmarks, in the order of ``lms_validation_cropped.pth``.
ALL_TEST_CASES: tuple[str, ...] = (
    "002", "008", "054", "055", "056", "094", "097",
    "104", "105", "106", "107", "108", "109", "110", "111", "112", "113",
    "114", "115", "116", "117", "118", "119", "120", "121", "122", "123",
)  # fmt: skip

#: Lung250M-4B's own test split (COPDgene cases), reported separately in the paper.
BENCHMARK_TEST_CASES: tuple[str, ...] = tuple(f"{i:03d}" for i in range(104, 114))


class ConfigError(ValueError):
    """A profile name, stage or field that does not exist, or a value of the wrong kind."""


# --------------------------------------------------------------------------------------------------
# One dataclass per stage. Each chapter module reads only its own stage (and ``data``).
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """Chapter 1. ``shape`` is the profile's volume shape (H, W, D); the canonical frame is 256×208×256."""

    #: must divide 256×208×256 axis by axis: volumes are reduced by whole blocks ("any vessel in block")
    shape: tuple[int, int, int] = CANONICAL_SHAPE
    #: "unleashing-registration" (the release's 10 pairs, already dilated) or "lung250m-4b" (97 raw pairs).
    train_dataset: str = "lung250m-4b"
    #: training cases to use; None = every pair the dataset has.
    train_cases: tuple[str, ...] | None = None
    #: test cases to prepare (must have landmarks); None = all 27.
    test_cases: tuple[str, ...] | None = None


@dataclass(frozen=True)
class VQAEConfig:
    """Chapter 2: the paired 3D VQ-AE (MONAI ``AutoEncoder`` + vector quantiser)."""

    spatial_dims: int = 3  # 2 for a 2D track (every vqae component is dimension-generic)
    channels: tuple[int, ...] = (48, 48, 64, 64, 128, 192, 256, 384)
    strides: tuple[int, ...] = (1, 2, 1, 2, 1, 2, 1, 2)
    codebook_size: int = 1024
    embed_dim: int = 384  # = channels[-1]: the quantiser works on the encoder's last feature map
    beta: float = 0.25  # commitment weight
    legacy_beta: bool = True  # the seed puts β on the codebook term (taming's legacy form); False: VQ-VAE's
    codebook_weight: float = 0.1
    class_weights: tuple[float, float] = (1.0, 2.5)
    patch_size: int = 128
    affine_sigma: float = 0.05
    batch_size: int = 8
    lr: float = 5e-4
    iterations: int = 42000  # 336000 / batch 8
    restart_divisor: int = 7  # CosineAnnealingWarmRestarts(T_0 = ⌈iterations / 7⌉, T_mult = 2); paper: 6000
    dead_code_restart: bool = False  # the seed has none
    #: whole volumes per encoder/decoder call in ``encode`` and the test reconstruction (memory ∝ batch)
    encode_batch: int = 2
    amp: bool = True  # fp16 autocast, on CUDA only
    ckpt_every: int = 1000
    log_every: int = 100


@dataclass(frozen=True)
class DiffusionConfig:
    """Chapter 3: the absorbing-diffusion denoiser over token grids."""

    n_layers: int = 12
    width: int = 512
    n_heads: int = 16
    ff: int = 1024
    dropout: float = 0.0  # paper: 0.1, the seed's (PyTorch's default); 0 as unleashing-transformers
    #: "seed": the weighted CE / (ln 2 · K · N), as the seed (paper); "per-token": / (ln 2 · N), bits per token
    loss_norm: str = "per-token"
    pre_norm: bool = False
    ema: float | None = None  # e.g. 0.999; None = no EMA (the seed)
    T: int = 256
    lr: float = 1e-4
    warmup: int = 500
    batch_size: int = 8
    iterations: int = 15000
    amp: bool = True
    ckpt_every: int = 1000
    log_every: int = 100
    #: steps per run of chapter 3's variant comparison (``diffusion.ABLATIONS``); 0 = skip it (not in
    #: the paper, and at paper size each run takes hours)
    ablation_iterations: int = 0
    ablation_ema: float = 0.999  # EMA decay tracked alongside each comparison run
    ablation_variants: tuple[str, ...] = ("baseline", "pre-norm", "dropout 0.1 (seed)")


@dataclass(frozen=True)
class SamplingConfig:
    """Chapter 4: sampling synthetic pairs."""

    n_pairs: int = 256
    steps: int = 256
    temperature: float = 0.9
    batch_size: int = 2
    threshold: float = 0.5  # P(vessel) > threshold → vessel, for the nii.gz masks and the statistics
    export_nifti: bool = True  # also write binarised masks in the canonical frame (the seed: npz only)
    n_stats: int = 64  # synthetic pairs loaded (as binary masks) for the statistics of chapter 4
    steps_sweep: tuple[int, ...] = (256, 64, 16)  # time and quality against the number of steps
    n_sweep: int = 4  # pairs sampled per entry of steps_sweep


@dataclass(frozen=True)
class RegistrationConfig:
    """Chapter 5: the two-step inverse-consistent registration network (defaults = the seed's)."""

    scale: float = 0.5  # registration grid relative to ``data.shape`` (paper: half, 128×104×128)
    channels: tuple[int, ...] = (8, 16, 32, 64, 64, 64)  # MONAI UNet, one per step
    strides: tuple[int, ...] = (2, 2, 1, 2, 1)
    tanh_scale: float = 0.35  # network output = 0.35·tanh(·), in grid_sample units
    smooth_kernel: int = 7  # average pools k7, strides 2, 2, 1, 1, then linear upsampling
    ss_steps: int = 12  # scaling and squaring: v / 2**12, then 12 squarings
    smooth_weight: float = 0.5  # λ of the first-order smoothness of both maps
    lr: float = 0.015  # Adam, one per network
    batch_size: int = 8
    iterations: int = 1248  # the seed's 2500 // batch · 4; each iteration updates both steps
    n_few: int = 10  # the "few real pairs" regime (the release's 10 training pairs at paper scale)
    n_synthetic: int = 256  # synthetic pairs used by the synthetic regimes
    regimes: tuple[str, ...] = ("real_all", "real_few", "synthetic", "synthetic_plus_few")
    amp: bool = True  # the seed's fp16 autocast of the UNets (CUDA only)
    ckpt_every: int = 250
    log_every: int = 50


@dataclass(frozen=True)
class EvaluationConfig:
    """Chapter 6: test-time adaptation and metrics."""

    tta_iterations: int = 50  # per test pair, fine-tuning copies of both networks
    tta_lr: float = 0.005  # Adam


STAGES: dict[str, type] = {
    "data": DataConfig,
    "vqae": VQAEConfig,
    "diffusion": DiffusionConfig,
    "sampling": SamplingConfig,
    "registration": RegistrationConfig,
    "evaluation": EvaluationConfig,
}


@dataclass(frozen=True)
class Profile:
    name: str
    data: DataConfig = field(default_factory=DataConfig)
    vqae: VQAEConfig = field(default_factory=VQAEConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def replace(self, overrides: dict[str, Any] | None = None) -> Profile:
        """A copy with dotted-key overrides applied, e.g. ``{"vqae.iterations": 10}``."""
        if not overrides:
            return self
        by_stage: dict[str, dict[str, Any]] = {}
        for key, value in overrides.items():
            stage, _, name = key.partition(".")
            if stage not in STAGES or not name:
                raise ConfigError(
                    f"override {key!r}: expected '<stage>.<field>' with stage one of {sorted(STAGES)}"
                )
            known = {f.name for f in dataclasses.fields(STAGES[stage])}
            if name not in known:
                raise ConfigError(f"override {key!r}: {stage} has no field {name!r}; known: {sorted(known)}")
            by_stage.setdefault(stage, {})[name] = _coerce(getattr(getattr(self, stage), name), value, key)
        return dataclasses.replace(
            self, **{s: dataclasses.replace(getattr(self, s), **kv) for s, kv in by_stage.items()}
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def case_id(value: Any) -> str:
    """A case id as the datasets spell it: ``2`` or ``"2"`` → ``"002"``; anything else unchanged (as text)."""
    text = str(value).strip()
    return f"{int(text):03d}" if text.isdigit() else text


#: Words that turn a ``None``-able field back to ``None`` (for case lists: every case of the dataset).
_NONE_WORDS = {"none", "all", "null", ""}


def _field_type(key: str) -> Any:
    """The annotated type of ``stage.field`` (resolved), or None when it cannot be found."""
    import typing

    stage, _, name = key.partition(".")
    try:
        return typing.get_type_hints(STAGES[stage]).get(name)
    except (KeyError, NameError, TypeError):
        return None


def _coerce(current: Any, value: Any, key: str) -> Any:
    """Turn CLI strings ("10", "0.5", "true", "8,16,32", "032,033", "all") into the field's type.

    The type comes from the field's annotation, so a field whose default is ``None`` (``data.train_cases``:
    ``tuple[str, ...] | None``) reads "032,033" as a tuple of strings; "none" or "all" give ``None``
    where the annotation allows it (for case lists: every case). Case ids (fields ``*_cases``) are
    normalised to three digits, ``2`` → ``"002"``, as ``data_download`` accepts them.
    """
    import types
    import typing

    hint = _field_type(key)
    args = (
        typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        else ()
    )
    optional = type(None) in args
    kinds = [a for a in args if a is not type(None)] if args else ([hint] if hint is not None else [])
    kind = kinds[0] if len(kinds) == 1 else None
    if kind is None and current is not None:
        kind = type(current)
    is_tuple = kind is tuple or typing.get_origin(kind) is tuple
    item_kind = (typing.get_args(kind) or (str,))[0] if typing.get_origin(kind) is tuple else None
    if is_tuple and item_kind is None:
        item_kind = type(current[0]) if isinstance(current, tuple) and current else str
    cases = key.endswith("_cases")

    if not isinstance(value, str):
        if is_tuple and isinstance(value, list | tuple):
            return tuple(case_id(v) for v in value) if cases else tuple(value)
        return value
    if optional and value.strip().lower() in _NONE_WORDS:
        return None
    if kind is str:
        return value
    try:
        if kind is bool:
            if value.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(value)
            return value.lower() in {"true", "1", "yes"}
        if kind is int:
            return int(value)
        if kind is float:
            return float(value)
        if is_tuple:
            items = [v.strip() for v in value.split(",") if v.strip()]
            if cases:
                return tuple(case_id(v) for v in items)
            return tuple(item_kind(v) for v in items)
    except ValueError as err:
        what = getattr(kind, "__name__", None) or str(hint or type(current).__name__)
        raise ConfigError(f"override {key!r}: cannot read {value!r} as {what}") from err
    return value


# --------------------------------------------------------------------------------------------------
# The three profiles.
# --------------------------------------------------------------------------------------------------

#: Test cases used at ``ci`` scale: 3 of the benchmark split 104–113 and 3 others, all in the mirror.
CI_TEST_CASES: tuple[str, ...] = ("002", "054", "097", "104", "108", "113")

PROFILES: dict[str, Profile] = {
    # the seed exactly; where its defaults are not the seed's, they are set here
    "paper": Profile(name="paper", diffusion=DiffusionConfig(dropout=0.1, loss_norm="seed")),
    "colab": Profile(
        name="colab",
        data=DataConfig(shape=(128, 104, 128)),
        vqae=VQAEConfig(
            channels=(32, 32, 64, 64, 128, 256),
            strides=(1, 2, 1, 2, 1, 2),
            codebook_size=512,
            embed_dim=256,
            patch_size=64,
            batch_size=4,
            iterations=6000,
            dead_code_restart=True,
            ckpt_every=500,
        ),
        diffusion=DiffusionConfig(
            n_layers=8,
            width=384,
            n_heads=12,
            ff=768,
            iterations=6000,
            ckpt_every=500,
            ablation_iterations=500,
            ablation_ema=0.99,
        ),
        sampling=SamplingConfig(n_pairs=64, steps=128),
        registration=RegistrationConfig(scale=1.0, batch_size=4, iterations=600, n_synthetic=64),
    ),
    # one H100-class GPU, about 8 minutes for all six notebooks (an estimate, not measured: book/profiles.md
    # argues it). The release's data (10 training pairs, every test pair), the registration grid of the
    # paper (128×104×128, here at scale 1 of a half-resolution volume), colab's networks, short runs.
    "gpu": Profile(
        name="gpu",
        data=DataConfig(
            shape=(128, 104, 128), train_dataset="unleashing-registration", train_cases=RELEASE_TRAIN_CASES
        ),
        vqae=VQAEConfig(
            channels=(32, 32, 64, 64, 128, 256),
            strides=(1, 2, 1, 2, 1, 2),
            codebook_size=512,
            embed_dim=256,
            patch_size=64,
            batch_size=8,
            lr=1e-3,
            iterations=2000,
            dead_code_restart=True,
            encode_batch=4,
            ckpt_every=500,
        ),
        diffusion=DiffusionConfig(
            n_layers=8, width=384, n_heads=12, ff=768, warmup=200, iterations=2000, ckpt_every=500
        ),
        sampling=SamplingConfig(n_pairs=32, steps=64, batch_size=16, n_stats=32, steps_sweep=(64, 16, 4)),
        registration=RegistrationConfig(
            scale=1.0, batch_size=4, iterations=300, n_synthetic=32, ckpt_every=100
        ),
        evaluation=EvaluationConfig(tta_iterations=20),
    ),
    "ci": Profile(
        name="ci",
        data=DataConfig(
            shape=(64, 52, 64),
            train_dataset="unleashing-registration",
            train_cases=RELEASE_TRAIN_CASES,
            test_cases=CI_TEST_CASES,
        ),
        # two stride-2 stages (no full-resolution stride-1 layer): 4× faster per step on a CPU than
        # (16, 16, 32, 32)/(1, 2, 1, 2) at about the same test Dice; lr 2e-3 and dead-code restarts
        # because short runs at 5e-4 leave most codes where they were initialised (chapter 2 compares).
        # Width and length are set by the motion test of chapter 2: measured on the ci pairs, (16, 32) for
        # 300 steps reconstructs fixed and moving almost alike (Dice between them 0.96 against the
        # inputs' 0.39), (32, 64) for 900 steps keeps much more of the motion (0.77) in ~70 s per run.
        vqae=VQAEConfig(
            channels=(32, 64),
            strides=(2, 2),
            codebook_size=128,
            embed_dim=64,
            patch_size=32,
            batch_size=4,
            lr=2e-3,
            iterations=900,
            dead_code_restart=True,
            amp=False,
            ckpt_every=300,
            log_every=10,
        ),
        # attention over all 16×13×16 = 3328 tokens dominates on a CPU (its cost grows with heads × batch):
        # a narrow net, short runs, T = S = 16. No dropout variant: CPU attention with dropout takes the
        # slow (materialised N×N) path, ~10× slower per step.
        diffusion=DiffusionConfig(
            n_layers=2,
            width=32,
            n_heads=2,
            ff=64,
            T=16,
            warmup=5,
            lr=5e-3,
            batch_size=2,
            iterations=80,
            amp=False,
            ckpt_every=40,
            log_every=10,
            ablation_iterations=30,
            ablation_ema=0.9,
            ablation_variants=("baseline", "pre-norm"),
        ),
        sampling=SamplingConfig(
            n_pairs=8,
            steps=16,
            batch_size=4,
            n_stats=8,
            steps_sweep=(16, 4, 1),
            n_sweep=2,
        ),
        # registration at 32×26×32 (8 mm voxels); the pooled velocity grid is then 8×7×8, where the seed's
        # k7 smoothing would span the whole lung, so k3; 6 squarings suffice for these short velocities
        registration=RegistrationConfig(
            scale=0.5,
            channels=(8, 16, 16, 32, 32, 32),
            smooth_kernel=3,
            ss_steps=6,
            batch_size=2,
            iterations=40,
            n_few=3,
            n_synthetic=8,
            amp=False,
            ckpt_every=20,
            log_every=5,
        ),
        evaluation=EvaluationConfig(tta_iterations=10),
    ),
}


def get_profile(name: str, overrides: dict[str, Any] | None = None) -> Profile:
    """The named profile, with optional dotted-key overrides. Unknown names raise :class:`ConfigError`."""
    if isinstance(name, Profile):
        return name.replace(overrides)
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[name].replace(overrides)
