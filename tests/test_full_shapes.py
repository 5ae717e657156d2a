"""Every network of the ``paper`` and ``colab`` profiles at its full shapes, in seconds and without the
compute: built on PyTorch's ``meta`` device (shapes and dtypes, no memory, no arithmetic), except the
quantiser's nearest-code search, which runs for real on one token grid (3328 × embed_dim, cheap).

Expected numbers come from the paper (PAPER.md): the VQ-AE's AutoEncoder has 10,253,363 parameters, the
denoiser 27,987,456; tokens form a 16×13×16 grid; registration runs on 128×104×128.
"""

from __future__ import annotations

import math

import pytest
import torch

from regdiff_core import diffusion as D
from regdiff_core import registration as R
from regdiff_core import vqae as V
from regdiff_core.config import get_profile
from regdiff_core.utils import count_parameters

META = torch.device("meta")


@pytest.mark.parametrize("name", ["paper", "colab"])
def test_vqae_shapes_at_full_size(name):
    p = get_profile(name)
    with META:
        model = V.build_vqae(p.vqae)
    if name == "paper":
        assert count_parameters(model.autoencoder) == 10_253_363
    # whole volume → token grid (what `encode` does) → logits of both heads at full resolution
    x = torch.zeros(1, 2, *p.data.shape, device=META)
    z_e = model.autoencoder.encode(x)
    assert tuple(z_e.shape) == (1, p.vqae.embed_dim, 16, 13, 16)
    assert model.grid_shape(p.data.shape) == (16, 13, 16)
    # the nearest-code search for real, on one grid of (random) encoder features
    real = V.VectorQuantizer(p.vqae.codebook_size, p.vqae.embed_dim, p.vqae.beta, p.vqae.legacy_beta).eval()
    q = real(torch.randn(1, p.vqae.embed_dim, 16, 13, 16))
    assert q.indices.shape == (1, 16, 13, 16) and int(q.indices.max()) < p.vqae.codebook_size
    logits = model.autoencoder.decode(
        model.quantiser.lookup(torch.zeros(1, 16, 13, 16, dtype=torch.long, device=META))
    )
    assert tuple(logits.shape) == (1, 4, *p.data.shape)
    # a training step's patch: (batch, 2, patch³) → logits of the same size
    patch = torch.zeros(p.vqae.batch_size, 2, *(p.vqae.patch_size,) * 3, device=META)
    z = model.autoencoder.encode(patch)
    side = p.vqae.patch_size // math.prod(p.vqae.strides)
    assert tuple(z.shape) == (p.vqae.batch_size, p.vqae.embed_dim, side, side, side)
    assert tuple(model.autoencoder.decode(z).shape) == (p.vqae.batch_size, 4, *(p.vqae.patch_size,) * 3)


@pytest.mark.parametrize("name", ["paper", "colab"])
def test_denoiser_shapes_at_full_size(name):
    p = get_profile(name)
    grid = D.token_grid(p)
    assert grid == (16, 13, 16)
    with META:
        net = D.build_denoiser(p.diffusion, p.vqae.codebook_size, grid)
    if name == "paper":
        assert count_parameters(net) == 27_987_456
    x_t = torch.full((p.diffusion.batch_size, 3328), p.vqae.codebook_size, dtype=torch.long, device=META)
    logits = net(x_t)
    assert tuple(logits.shape) == (p.diffusion.batch_size, 3328, p.vqae.codebook_size)
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("name", ["paper", "colab"])
def test_registration_shapes_at_full_size(name):
    p = get_profile(name)
    grid = R.registration_grid(p.data.shape, p.registration.scale)
    assert grid == (128, 104, 128)
    with META:
        model = R.build_registration(p.registration)
    volumes = torch.zeros(p.registration.batch_size, 1, *p.data.shape, device=META)
    A = R.to_grid(volumes, grid)
    assert tuple(A.shape) == (p.registration.batch_size, 1, *grid)
    reg = model.register(A, A)
    assert tuple(reg.phi_AB.shape) == tuple(reg.phi_BA.shape) == (p.registration.batch_size, 3, *grid)
