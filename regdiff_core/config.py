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
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

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
    #: normalisation after each convolution: "instance" (MONAI's default, the paper's), "batch" or "none"
    norm: str = "instance"
    beta: float = 0.25  # commitment weight
    legacy_beta: bool = True  # the authors' code: β on the codebook term (taming's legacy); False: VQ-VAE's
    codebook_weight: float = 0.1
    class_weights: tuple[float, float] = (1.0, 2.5)
    patch_size: int = 128
    affine_sigma: float = 0.05
    batch_size: int = 8
    lr: float = 5e-4
    iterations: int = 42000  # 336000 / batch 8
    restart_divisor: int = 7  # CosineAnnealingWarmRestarts(T_0 = ⌈iterations / 7⌉, T_mult = 2); paper: 6000
    dead_code_restart: bool = False  # the authors' code has none
    #: chapter 2's run with the restart switched the other way stops after this many steps (0: all of them);
    #: it keeps the full run's learning-rate schedule, and the full run saves its model at that step
    ablation_iterations: int = 0
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
    dropout: float = 0.0  # paper: 0.1, the authors' (PyTorch's default); 0 as unleashing-transformers
    #: "seed": the weighted CE / (ln 2 · K · N), as the authors' code (paper); "per-token": / (ln 2 · N), bits per token
    loss_norm: str = "per-token"
    pre_norm: bool = False
    ema: float | None = None  # e.g. 0.999; None = no EMA (the authors' code)
    #: training-grid augmentation (not in the paper, whose 97 pairs need none): each training pair is also
    #: encoded mirrored left–right (``augment_flip``) and shifted by half a token (``augment_shift``:
    #: "none", "diagonal" = one shift along all three axes, "axes" = one along each axis, "all" = every
    #: combination of axes), so the denoiser sees the same anatomy under other token boundaries
    augment_flip: bool = False
    augment_shift: str = "none"
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
    #: steps of chapter 3's run on the paper's own token grids (0 = ``iterations``)
    side_iterations: int = 0


@dataclass(frozen=True)
class SamplingConfig:
    """Chapter 4: sampling synthetic pairs."""

    n_pairs: int = 256
    steps: int = 256
    temperature: float = 0.9
    batch_size: int = 2
    threshold: float = 0.5  # P(vessel) > threshold → vessel, for the nii.gz masks and the statistics
    export_nifti: bool = True  # also binarised masks in the canonical frame (the authors' code: npz only)
    n_stats: int = 64  # synthetic pairs loaded (as binary masks) for the statistics of chapter 4
    steps_sweep: tuple[int, ...] = (256, 64, 16)  # time and quality against the number of steps
    n_sweep: int = 4  # pairs sampled per entry of steps_sweep


@dataclass(frozen=True)
class RegistrationConfig:
    """Chapter 5: the two-step inverse-consistent registration network (defaults = the authors' code's)."""

    scale: float = 0.5  # registration grid relative to ``data.shape`` (paper: half, 128×104×128)
    channels: tuple[int, ...] = (8, 16, 32, 64, 64, 64)  # MONAI UNet, one per step
    strides: tuple[int, ...] = (2, 2, 1, 2, 1)
    tanh_scale: float = 0.35  # network output = 0.35·tanh(·), in grid_sample units
    smooth_kernel: int = 7  # average pools k7, strides 2, 2, 1, 1, then linear upsampling
    ss_steps: int = 12  # scaling and squaring: v / 2**12, then 12 squarings
    smooth_weight: float = 0.5  # λ of the first-order smoothness of both maps
    lr: float = 0.015  # Adam, one per network
    batch_size: int = 8
    iterations: int = 1248  # the authors' 2500 // batch · 4; each iteration updates both steps
    n_few: int = 10  # the "few real pairs" regime (the release's 10 training pairs at paper scale)
    n_synthetic: int = 256  # synthetic pairs used by the synthetic regimes
    #: the paper's three, synthetic + few real, and the VQ-AE reconstructions of the real pairs (the ceiling
    #: of what a perfect generative model could give with this VQ-AE)
    regimes: tuple[str, ...] = ("real_all", "real_few", "synthetic", "synthetic_plus_few", "reconstructions")
    #: training runs (seeds seed, seed + 1, …) of each regime in ``seed_regimes``; the others train once
    seeds: int = 1
    seed_regimes: tuple[str, ...] = ("real_all", "real_few", "synthetic")
    amp: bool = True  # the authors' fp16 autocast of the UNets (CUDA only)
    ckpt_every: int = 250
    log_every: int = 50


@dataclass(frozen=True)
class EvaluationConfig:
    """Chapter 6: test-time adaptation and metrics."""

    tta_iterations: int = 50  # per test pair, fine-tuning copies of both networks
    tta_lr: float = 0.005  # Adam
    #: chapter 6's curve of TRE against TTA steps: the step counts, and on how many test pairs (0 = all)
    curve_steps: tuple[int, ...] = (0, 10, 25, 50)
    curve_pairs: int = 0


STAGES: dict[str, type] = {
    "data": DataConfig,
    "vqae": VQAEConfig,
    "diffusion": DiffusionConfig,
    "sampling": SamplingConfig,
    "registration": RegistrationConfig,
    "evaluation": EvaluationConfig,
}


# --------------------------------------------------------------------------------------------------
# Allowed values of every field, checked whenever a profile is built (before anything is written).
# --------------------------------------------------------------------------------------------------


class _Rule(NamedTuple):
    """``ok(value)`` decides; ``allowed`` says what is allowed, for the error message."""

    ok: Callable[[Any], bool]
    allowed: str


def _num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _int(low: int, high: int | None = None) -> _Rule:
    text = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    return _Rule(
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high),
        text,
    )


def _real(low: float, high: float | None = None, *, open_low: bool = False, open_high: bool = False) -> _Rule:
    lo = f"{'(' if open_low else '['}{low:g}"
    hi = f"{high:g}{')' if open_high else ']'}" if high is not None else "inf)"

    def ok(v: Any) -> bool:
        if not _num(v) or v < low or (open_low and v == low):
            return False
        return high is None or v < high or (v == high and not open_high)

    return _Rule(ok, f"a number in {lo}, {hi}")


def _ints(low: int, length: int | None = None) -> _Rule:
    n = f"{length} " if length else "one or more "
    return _Rule(
        lambda v: isinstance(v, tuple) and len(v) >= 1 and (length is None or len(v) == length)
        and all(_int(low).ok(x) for x in v),
        f"{n}integers >= {low}",
    )  # fmt: skip


def _choice(*options: Any) -> _Rule:
    return _Rule(lambda v: v in options, f"one of {list(options)}")


def _subset(*options: str) -> _Rule:
    return _Rule(
        lambda v: isinstance(v, tuple) and len(v) >= 1 and all(x in options for x in v),
        f"one or more of {list(options)}",
    )


def _optional(rule: _Rule) -> _Rule:
    return _Rule(lambda v: v is None or rule.ok(v), f"None or {rule.allowed}")


_BOOL = _Rule(lambda v: isinstance(v, bool), "true or false")
_CASES = _Rule(lambda v: isinstance(v, tuple) and all(isinstance(c, str) for c in v), "a list of case ids")
_NAMES = _Rule(lambda v: isinstance(v, tuple) and all(isinstance(c, str) for c in v), "a list of names")
_LR = _real(0.0, 1.0, open_low=True)  # Adam: lr > 0; above 1 every one of these networks diverges
_SHARE = _real(0.0, 1.0, open_low=True, open_high=True)

#: The allowed values of every field, per stage. A field missing here is refused by :func:`validate`
#: (so a new field must say what it allows). Case ids, dataset names and divisibility of the shape
#: are checked again where they are used (``store.data.split_spec``, ``data.block_factors``) against the data.
RANGES: dict[str, dict[str, _Rule]] = {
    "data": {
        "shape": _ints(1, 3),
        "train_dataset": _choice("lung250m-4b", "unleashing-registration"),
        "train_cases": _optional(_CASES),
        "test_cases": _optional(_CASES),
    },
    "vqae": {
        "spatial_dims": _choice(2, 3),
        "channels": _ints(1),
        "strides": _ints(1),
        "codebook_size": _int(2),
        "embed_dim": _int(1),
        "norm": _choice("instance", "batch", "none"),
        "beta": _real(0.0),
        "legacy_beta": _BOOL,
        "codebook_weight": _real(0.0),
        "class_weights": _Rule(
            lambda v: isinstance(v, tuple) and len(v) == 2 and all(_real(0.0).ok(x) for x in v) and any(v),
            "two numbers >= 0, not both 0",
        ),
        "patch_size": _int(1),
        "affine_sigma": _real(0.0, 1.0),
        "batch_size": _int(1),
        "lr": _LR,
        "iterations": _int(1),
        "restart_divisor": _int(1),
        "dead_code_restart": _BOOL,
        "ablation_iterations": _int(0),
        "encode_batch": _int(1),
        "amp": _BOOL,
        "ckpt_every": _int(1),
        "log_every": _int(1),
    },
    "diffusion": {
        "n_layers": _int(1),
        "width": _int(1),
        "n_heads": _int(1),
        "ff": _int(1),
        "dropout": _real(0.0, 1.0, open_high=True),
        "loss_norm": _choice("per-token", "seed"),
        "pre_norm": _BOOL,
        "ema": _optional(_SHARE),
        "augment_flip": _BOOL,
        "augment_shift": _choice("none", "diagonal", "axes", "all"),
        "T": _int(1),
        "lr": _LR,
        "warmup": _int(0),
        "batch_size": _int(1),
        "iterations": _int(1),
        "amp": _BOOL,
        "ckpt_every": _int(1),
        "log_every": _int(1),
        "ablation_iterations": _int(0),
        "ablation_ema": _SHARE,
        "ablation_variants": _NAMES,
        "side_iterations": _int(0),
    },
    "sampling": {
        "n_pairs": _int(1),
        "steps": _int(1),
        "temperature": _real(0.0, open_low=True),
        "batch_size": _int(1),
        "threshold": _real(0.0, 1.0, open_high=True),
        "export_nifti": _BOOL,
        "n_stats": _int(1),
        "steps_sweep": _ints(1),
        "n_sweep": _int(1),
    },
    "registration": {
        "scale": _real(0.0, 1.0, open_low=True),
        "channels": _ints(1),
        "strides": _ints(1),
        "tanh_scale": _real(0.0, open_low=True),
        "smooth_kernel": _int(1),
        "ss_steps": _int(0),
        "smooth_weight": _real(0.0),
        "lr": _LR,
        "batch_size": _int(1),
        "iterations": _int(1),
        "n_few": _int(1),
        "n_synthetic": _int(1),
        "regimes": _subset("real_all", "real_few", "synthetic", "synthetic_plus_few", "reconstructions"),
        "seeds": _int(1),
        "seed_regimes": _subset("real_all", "real_few", "synthetic", "synthetic_plus_few", "reconstructions"),
        "amp": _BOOL,
        "ckpt_every": _int(1),
        "log_every": _int(1),
    },
    "evaluation": {
        "tta_iterations": _int(0),
        "tta_lr": _LR,
        "curve_steps": _ints(0),
        "curve_pairs": _int(0),
    },
}

#: Rules between fields of one stage: (stage, field, ok(cfg), what must hold, the other field).
_BETWEEN: tuple[tuple[str, str, Callable[[Any], bool], str, str], ...] = (
    ("vqae", "strides", lambda c: len(c.strides) == len(c.channels), "one stride per channel entry", "channels"),
    ("vqae", "embed_dim", lambda c: c.embed_dim == c.channels[-1], "the last channel entry", "channels"),
    ("diffusion", "width", lambda c: c.width % c.n_heads == 0, "a multiple of n_heads", "n_heads"),
    # MONAI's UNet takes one stride fewer than channel entries
    ("registration", "strides", lambda c: len(c.strides) == len(c.channels) - 1, "len(channels) - 1 strides",
     "channels"),
)  # fmt: skip


def validate(profile: Profile) -> Profile:
    """Check every field of every stage against :data:`RANGES`; raise :class:`ConfigError` naming the
    field, its value and what is allowed. Returns ``profile`` unchanged."""
    where = f" in profile {profile.name!r}"
    for stage in STAGES:
        cfg = getattr(profile, stage)
        rules = RANGES.get(stage, {})
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            rule = rules.get(f.name)
            if rule is None:
                raise ConfigError(f"{stage}.{f.name}: no allowed range is defined (add it to config.RANGES)")
            if not rule.ok(value):
                raise ConfigError(
                    f"{stage}.{f.name} = {value!r}{where} is out of range: allowed is {rule.allowed}"
                )
    for stage, name, ok, text, other in _BETWEEN:
        cfg = getattr(profile, stage)
        if not ok(cfg):
            raise ConfigError(
                f"{stage}.{name} = {getattr(cfg, name)!r}{where} is out of range: allowed is {text} "
                f"({stage}.{other} = {getattr(cfg, other)!r})"
            )
    return profile


@dataclass(frozen=True)
class Profile:
    name: str
    data: DataConfig = field(default_factory=DataConfig)
    vqae: VQAEConfig = field(default_factory=VQAEConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self) -> None:
        validate(self)  # every way of building a profile (overrides, dataclasses.replace) is checked

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

#: Test cases used at ``ci`` scale: the 20 of the 27 that the test mirror holds (7 of the benchmark split
#: 104–113 and 13 others; 094, 105, 111, 112, 115, 120 and 122 are not mirrored).
CI_TEST_CASES: tuple[str, ...] = (
    "002", "008", "054", "055", "056", "097",
    "104", "106", "107", "108", "109", "110", "113",
    "114", "116", "117", "118", "119", "121", "123",
)  # fmt: skip

#: colab's networks, which the gpu profile shares (only its batch, lengths and learning rate differ)
_COLAB_VQAE = VQAEConfig(
    channels=(32, 32, 64, 64, 128, 256),
    strides=(1, 2, 1, 2, 1, 2),
    codebook_size=512,
    embed_dim=256,
    patch_size=64,
    batch_size=4,
    iterations=6000,
    dead_code_restart=True,
    ckpt_every=500,
)
_COLAB_DENOISER = DiffusionConfig(n_layers=8, width=384, n_heads=12, ff=768, iterations=6000, ckpt_every=500)

PROFILES: dict[str, Profile] = {
    # the seed exactly; where its defaults are not the seed's, they are set here
    "paper": Profile(name="paper", diffusion=DiffusionConfig(dropout=0.1, loss_norm="seed")),
    "colab": Profile(
        name="colab",
        data=DataConfig(shape=(128, 104, 128)),
        vqae=_COLAB_VQAE,
        diffusion=dataclasses.replace(_COLAB_DENOISER, ablation_iterations=500, ablation_ema=0.99),
        sampling=SamplingConfig(n_pairs=64, steps=128),
        registration=RegistrationConfig(scale=1.0, batch_size=4, iterations=600, n_synthetic=64),
    ),
    # one H100-class GPU, minutes for all six notebooks (an estimate, not measured: book/profiles.md
    # argues it). The release's data (10 training pairs, every test pair), the registration grid of the
    # paper (128×104×128, here at scale 1 of a half-resolution volume), colab's networks, short runs.
    "gpu": Profile(
        name="gpu",
        data=DataConfig(
            shape=(128, 104, 128), train_dataset="unleashing-registration", train_cases=RELEASE_TRAIN_CASES
        ),
        # the release's ten pairs, as at ci: codes shared between volumes (batch normalisation) and
        # augmented training grids for the denoiser, as ci measured (not measured at this size)
        vqae=dataclasses.replace(
            _COLAB_VQAE, norm="batch", batch_size=8, lr=1e-3, iterations=2000, encode_batch=4
        ),
        diffusion=dataclasses.replace(
            _COLAB_DENOISER, warmup=200, iterations=2000, ema=0.999, augment_flip=True, augment_shift="all"
        ),
        sampling=SamplingConfig(n_pairs=32, steps=64, batch_size=16, n_stats=32, steps_sweep=(64, 16, 4)),
        registration=RegistrationConfig(
            scale=1.0, batch_size=4, iterations=300, n_synthetic=32, ckpt_every=100
        ),
        evaluation=EvaluationConfig(tta_iterations=20, curve_pairs=5),
    ),
    "ci": Profile(
        name="ci",
        data=DataConfig(
            shape=(64, 52, 64),
            train_dataset="unleashing-registration",
            train_cases=RELEASE_TRAIN_CASES,
            test_cases=CI_TEST_CASES,
        ),
        # two stride-2 stages, 512 codes, dead-code restarts, lr 2e-3; batch normalisation so that a
        # code means the same in every volume (book/profiles.md: how each was measured)
        vqae=VQAEConfig(
            channels=(32, 64),
            strides=(2, 2),
            norm="batch",
            codebook_size=512,
            embed_dim=64,
            patch_size=32,
            batch_size=4,
            lr=2e-3,
            iterations=900,
            dead_code_restart=True,
            # chapter 2's run without restarts: the first 300 steps of the same schedule, against this
            # run's model at step 300 (all 900 cost more of the CI budget: book/profiles.md)
            ablation_iterations=300,
            amp=False,
            ckpt_every=300,
            log_every=10,
        ),
        # a narrow denoiser (attention over 3328 tokens dominates on a CPU), T = S = 16; ten pairs are
        # few, so augmented grids, 800 steps and an EMA (book/profiles.md: the sweep behind them)
        diffusion=DiffusionConfig(
            n_layers=2,
            width=32,
            n_heads=2,
            ff=64,
            T=16,
            warmup=5,
            lr=5e-3,
            batch_size=2,
            iterations=800,
            ema=0.99,
            augment_flip=True,
            augment_shift="all",
            amp=False,
            ckpt_every=100,
            log_every=10,
            side_iterations=200,
        ),
        # 64 synthetic pairs for registration (6.4 per real pair; the paper: 256 for 97, 2.6); the NIfTI
        # export (for viewers; the chapters read the npz files) is left to the other profiles
        sampling=SamplingConfig(
            n_pairs=64,
            steps=16,
            batch_size=4,
            export_nifti=False,
            n_stats=16,
            steps_sweep=(16, 4, 1),
            n_sweep=2,
        ),
        # registration at 32×26×32 (8 mm voxels); the pooled velocity grid is then 8×7×8, where the seed's
        # k7 smoothing would span the whole lung, so k3. 4 squarings (v / 16) instead of 12: the map moves
        # by a small fraction of a voxel, and each iteration warps a third fewer times. 300 iterations: the
        # training loss stops falling there, so every regime is trained to convergence at this grid
        # (book/profiles.md: both measured). "Few" is 1 of the 10 release pairs, the paper's fraction
        # (10 of 97).
        registration=RegistrationConfig(
            scale=0.5,
            channels=(8, 16, 16, 32, 32, 32),
            smooth_kernel=3,
            ss_steps=4,
            batch_size=2,
            iterations=300,
            n_few=1,
            n_synthetic=64,
            seeds=3,
            amp=False,
            ckpt_every=100,
            log_every=10,
        ),
        # 5 TTA iterations per test pair (paper: 50): 20 test pairs × 4 regimes fit the budget
        evaluation=EvaluationConfig(tta_iterations=5, curve_steps=(0, 5, 10, 25, 50), curve_pairs=3),
    ),
}


def get_profile(name: str, overrides: dict[str, Any] | None = None) -> Profile:
    """The named profile, with optional dotted-key overrides. Unknown names raise :class:`ConfigError`.

    ``$REGDIFF_SET`` (``STAGE.FIELD=VALUE`` items separated by ``;``) overrides every named profile of the
    process, under ``overrides``; it is said once per process. ``make gpu-book`` sets it to the test pairs
    a local data folder holds, so that every notebook of the run uses those.
    """
    if isinstance(name, Profile):
        return name.replace(overrides)
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[name].replace({**env_overrides(), **(overrides or {})})


def env_overrides() -> dict[str, str]:
    """The overrides named by ``$REGDIFF_SET`` (``"data.test_cases=002,008;vqae.iterations=10"``)."""
    import os

    text = os.environ.get("REGDIFF_SET", "").strip()
    items = [item.strip() for item in text.split(";") if item.strip()]
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"$REGDIFF_SET item {item!r}: expected STAGE.FIELD=VALUE")
        out[key.strip()] = value.strip()
    if out and text not in _SAID:
        _SAID.add(text)
        print(f"[regdiff] $REGDIFF_SET overrides every profile: {'; '.join(items)}")
    return out


_SAID: set[str] = set()
