"""``make gpu-check``: paper-size timings of every trained stage, on whatever accelerator is present.

Each benchmark times the chapter's own training step (:func:`regdiff_core.vqae.train_step`,
:func:`regdiff_core.diffusion.train_step`, :func:`regdiff_core.registration.greedy_iteration`) and, where
a stage also samples or adapts, those calls, at the paper's sizes and on random data (the cost does not
depend on the values). ``--small`` runs the same code at toy sizes, which is how ``make test`` checks on
a CPU that the script itself works.

One stage failing (out of memory, say) is recorded in the JSON and does not stop the others.
The whole paper-size run is sized to finish in under 8 minutes on one H100.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from regdiff_core import __version__, diffusion, registration, vqae
from regdiff_core.config import PROFILES, EvaluationConfig, RegistrationConfig, get_profile
from regdiff_core.utils import autocast, count_parameters, resolve_device, timer


def bench_vqae(device: torch.device, small: bool = False) -> dict[str, Any]:
    """Paper-size AutoEncoder + quantiser forward+backward on 128³ patches, batch 2 and 8, fp16 and bf16.

    Returns iterations per second and peak memory (GB, CUDA only) per setting; ``small=True``: toy sizes.
    The seed reports ≈4.5 GB of GPU memory per sample at 128³.
    """
    cfg = PROFILES["paper"].vqae
    patch, batches, warmup, timed = cfg.patch_size, (2, 8), 2, 5
    if small:
        cfg = dataclasses.replace(cfg, channels=(4, 8), strides=(2, 2), codebook_size=16, embed_dim=8)
        patch, batches, warmup, timed = 16, (2,), 1, 1
    model = vqae.build_vqae(cfg).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    weights = torch.tensor(cfg.class_weights, device=device)
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16} if device.type == "cuda" else {"fp32": None}
    results: dict[str, Any] = {
        "patch": patch,
        "params_autoencoder": sum(p.numel() for p in model.autoencoder.parameters()),
    }
    for name, dtype in dtypes.items():
        for b in batches:
            x = (torch.rand(b, 2, *(patch,) * cfg.spatial_dims, device=device) > 0.9).float()
            scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            key = f"{name}_batch{b}"
            try:
                for i in range(warmup + timed):
                    if i == warmup:
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        t0 = time.perf_counter()
                    vqae.train_step(model, x, optimizer, scaler, cfg, weights, dtype is not None,
                                    dtype or torch.float16)  # fmt: skip
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = (time.perf_counter() - t0) / timed
                peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
                results[key] = {
                    "it_per_s": round(1 / seconds, 3),
                    "samples_per_s": round(b / seconds, 3),
                    "peak_memory_gb": None if peak is None else round(peak, 2),
                    "peak_memory_gb_per_sample": None if peak is None else round(peak / b, 2),
                }
            except torch.OutOfMemoryError as err:
                results[key] = {"error": f"out of memory: {err}".splitlines()[0]}
            del x
    return results


def bench_diffusion(device: torch.device, small: bool = False) -> dict[str, Any]:
    """Paper-size timings: sampling 2 pairs at T = 256 steps including the VQ-AE decode; one batch of 64
    pairs at 256 steps (decoded 4 at a time), scaled to the 256 pairs chapter 4 samples; and one
    training step (batch 8, AMP on CUDA). Random weights: the cost does not depend on them.

    ``small=True``: the same code at toy sizes (CPU smoke test).
    """
    profile = get_profile("paper")
    cfg, vqae_cfg, grid = profile.diffusion, profile.vqae, diffusion.token_grid(profile)
    if small:  # a few seconds on a CPU: tiny networks on a 4×4×4 token grid (8³ voxels)
        cfg = dataclasses.replace(cfg, n_layers=1, width=16, n_heads=2, ff=32, T=8, batch_size=2)
        vqae_cfg = dataclasses.replace(
            vqae_cfg, channels=(4, 8), strides=(1, 2), embed_dim=8, codebook_size=16
        )
        grid = (4, 4, 4)
    vqae_net = vqae.build_vqae(vqae_cfg).to(device).eval()
    denoiser = diffusion.build_denoiser(cfg, vqae_cfg.codebook_size, grid).to(device).eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    gen = torch.Generator().manual_seed(0)
    n_pairs = 2
    # warm-up: kernels, cuDNN autotuning and allocator, outside the timing
    diffusion.sample_tokens(denoiser, n_pairs, steps=2, batch_size=n_pairs, generator=gen, amp=cfg.amp)
    with torch.no_grad(), autocast(device, cfg.amp):
        vqae_net.decode(torch.zeros(n_pairs, *grid, dtype=torch.long, device=device))
    sync()

    def sample_and_decode(n: int, decode_batch: int):
        """Tokens of ``n`` pairs at T steps, then decoded ``decode_batch`` at a time: (samples, seconds, seconds)."""
        with timer() as tokens_time:
            samples = diffusion.sample_tokens(denoiser, n, steps=cfg.T, temperature=profile.sampling.temperature,
                                              batch_size=n, generator=gen, amp=cfg.amp)  # fmt: skip
            sync()
        with timer() as decode_time, torch.no_grad(), autocast(device, cfg.amp):
            for chunk in samples.tokens.split(decode_batch):
                vqae_net.decode(chunk.to(device)).float()
            sync()
        return samples, tokens_time["seconds"], decode_time["seconds"]

    samples, tokens_seconds, decode_seconds = sample_and_decode(n_pairs, n_pairs)
    # 256 pairs as chapter 4 samples them for real, in large batches: one batch of `big` pairs timed at
    # T steps (tokens, then decoding them `decode_batch` at a time), scaled to 256 pairs
    big, decode_batch, n_total = (4, 2, 8) if small else (64, 4, profile.sampling.n_pairs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, big_tokens, big_decode = sample_and_decode(big, decode_batch)
    peak_big = round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None
    vqae_net = None  # the VQ-AE is not needed for the training step: free its memory
    large_batches = {
        "batch_size": big,
        "decode_batch": decode_batch,
        "tokens_seconds": round(big_tokens, 3),
        "decode_seconds": round(big_decode, 3),
        "seconds_per_pair": round((big_tokens + big_decode) / big, 4),
        "n_pairs": n_total,
        # seconds per pair × n_pairs
        "estimated_n_pairs_seconds": round((big_tokens + big_decode) * n_total / big, 1),
        "peak_memory_gb": peak_big,
    }
    # one training step (after one warm-up step)
    denoiser.train()
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=cfg.lr)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    x_0 = torch.randint(0, vqae_cfg.codebook_size, (cfg.batch_size, math.prod(grid)), device=device)
    for _ in range(2):  # the second is timed
        sync()
        with timer() as step_time:
            diffusion.train_step(denoiser, x_0, optimizer, scaler, cfg, denoiser.mask_id, use_amp)
            sync()
    return {
        "params": count_parameters(denoiser),
        "grid": list(grid),
        "steps": cfg.T,
        "sample_2_pairs_seconds": round(tokens_seconds + decode_seconds, 3),
        "sample_tokens_seconds": round(tokens_seconds, 3),
        "decode_2_pairs_seconds": round(decode_seconds, 3),
        "network_calls": samples.network_calls,
        "sample_large_batches": large_batches,
        "train_step_seconds": round(step_time["seconds"], 4),
        "train_batch": cfg.batch_size,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
        if device.type == "cuda"
        else None,
    }


def bench_registration(device: torch.device, small: bool = False) -> dict[str, Any]:
    """One paper-size training iteration (batch 8 at 128×104×128) and one TTA iteration (batch 1).

    ``small=True``: tiny sizes (a CPU smoke test). Returns seconds per iteration and peak memory (GB, CUDA only).
    """
    cfg = RegistrationConfig()
    grid, batch = (128, 104, 128), cfg.batch_size
    if small:
        cfg = dataclasses.replace(cfg, channels=(4, 8, 8, 8, 8, 8))
        grid, batch = (24, 16, 24), 2
    model = registration.build_registration(cfg).to(device)
    optimizers = registration.make_optimizers(model, cfg.lr)
    amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp) if amp else None
    gen = torch.Generator().manual_seed(0)
    # smooth random blobs as stand-in masks
    A = registration.to_grid(
        (torch.rand(batch, 1, *(g // 4 for g in grid), generator=gen) > 0.7).float(), grid
    ).to(device)
    B = torch.roll(A, shifts=2, dims=2)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    registration.greedy_iteration(
        model, optimizers, A, B, scaler, amp
    )  # warm-up (cuDNN autotuning, allocations)
    sync()
    with timer() as t_train:
        registration.greedy_iteration(model, optimizers, A, B, scaler, amp)
        sync()
    peak_train = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with timer() as t_tta:
        registration.test_time_adapt(model, A[:1], B[:1], 1, EvaluationConfig().tta_lr, amp)
        sync()
    peak_tta = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return {
        "grid": list(grid),
        "batch_size": batch,
        "parameters_per_net": count_parameters(model.nets[0]),
        "train_iteration_seconds": t_train["seconds"],
        "train_peak_memory_gb": peak_train,
        "tta_iteration_seconds": t_tta["seconds"],
        "tta_peak_memory_gb": peak_tta,
        "amp": amp,
    }


#: The benchmarks, in pipeline order (the JSON's ``stages``).
BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {
    "vqae": bench_vqae,
    "diffusion": bench_diffusion,
    "registration": bench_registration,
}


def run_benchmarks(
    device: torch.device, small: bool, stages: dict[str, Callable[..., dict[str, Any]]] | None = None
) -> dict[str, Any]:
    """Every benchmark of ``stages`` (default :data:`BENCHMARKS`) → one report; a failure is recorded."""
    stages = BENCHMARKS if stages is None else stages
    report: dict[str, Any] = {
        "regdiff_version": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "small": small,
        "stages": {},
    }
    for short, bench in stages.items():
        t0 = time.perf_counter()
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            result = bench(device, small=small)
            result["wall_seconds"] = round(time.perf_counter() - t0, 2)
            report["stages"][short] = result
        except Exception as err:  # record and carry on: one OOM must not hide the other stages
            report["stages"][short] = {
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(),
            }
        print(f"[gpu-check] {short}: {json.dumps(report['stages'][short], default=str)[:400]}", flush=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m regdiff_core.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--small", action="store_true", help="toy sizes (a CPU smoke test of this script)")
    parser.add_argument("--out", type=Path, default=Path("_build/gpu_check.json"))
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cpu" and not args.small:
        print(
            "[gpu-check] no GPU found: paper-size timings on a CPU take hours. Use --small for a smoke test."
        )
        return 2
    report = run_benchmarks(device, small=args.small)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"[gpu-check] wrote {args.out}")
    failed = [k for k, v in report["stages"].items() if "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
