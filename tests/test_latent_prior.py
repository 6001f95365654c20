"""latent_prior.py: the U-Net and its levels, the noise schedule and loss, training, the
sampler with autoguidance, and loading."""
import math
import re

import pytest
import torch

from latent_prior import LatentPrior, fit_prior, levels_for, load_prior, prior_loss, sample_prior
from vae_model import VAE, vae_checkpoint


@pytest.mark.parametrize("side", [1, 4, 5])
def test_prior_samples_have_the_first_stage_latent_shape(side):
    prior = LatentPrior(latent_channels=6, width=16)
    z = sample_prior(prior, torch.randn(3, 6, side, side), steps=4)
    assert z.shape == (3, 6, side, side) and torch.isfinite(z).all()


@pytest.mark.parametrize("side, sizes", [
    (4, [4, 2]), (8, [8, 4]), (16, [16, 8]),     # 32, 64 and 128 px: two levels, as the prior always had
    (32, [32, 16, 8]), (64, [64, 32, 16, 8])])  # 256 and 512 px: one more level per doubling
def test_the_prior_grows_a_level_per_doubling_of_the_latent(side, sizes):
    """fit_prior builds the U-Net that levels_for gives for the codes' side; checked level by
    level: the feature map every block works on, and self-attention at the lowest level only."""
    codes = torch.randn(4, 3, side, side)
    prior = fit_prior(codes, 8, 1, 2, 1e-3, torch.Generator().manual_seed(0))
    assert prior.config == {"latent_channels": 3, "width": 8, "levels": len(sizes)} and levels_for(side) == len(sizes)
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, output.shape)  # returns None: the output goes on unchanged
        return hook
    for name, module in prior.named_modules():
        if re.fullmatch(r"(inner\.\d\.)?(down|up)\.[01]|middle\.0|attention", name):
            module.register_forward_hook(record(name))
    z = sample_prior(prior, torch.randn(2, 3, side, side), steps=2)
    assert z.shape == (2, 3, side, side) and torch.isfinite(z).all()
    top, inner, lowest = sizes[0], sizes[1:-1], sizes[-1]
    expected = {"down.0": (8, top), "down.1": (8, top), "up.0": (8, top), "up.1": (8, top),
                "middle.0": (16, lowest), "attention": (16, lowest)}
    for i, size in enumerate(inner):
        expected.update({f"inner.{i}.{part}": (16, size) for part in ("down.0", "down.1", "up.0", "up.1")})
    assert {name: (shape[1], shape[-1]) for name, shape in seen.items()} == expected


def test_a_prior_saved_before_it_could_grow_still_loads_and_samples(tmp_path):
    """Checkpoints written before levels existed hold a config without it: they rebuild the
    two-level U-Net they were trained as, with the same weights and the same samples."""
    torch.manual_seed(0)
    prior = LatentPrior(6, 16).eval()
    old = {"config": {"latent_channels": 6, "width": 16}, "model": prior.state_dict()}
    model = VAE(32, 6, (8, 8, 8))
    torch.save({**vae_checkpoint(model), "prior": old}, tmp_path / "old.pth")
    loaded, guide = load_prior(tmp_path / "old.pth")
    assert guide is None and loaded.config["levels"] == 2
    noise = torch.randn(2, 6, 4, 4)
    assert torch.equal(sample_prior(loaded, noise, steps=3), sample_prior(prior, noise, steps=3))


def test_prior_sampling_steps_and_maps_back_to_the_latent_scale():
    """With a net that predicts v = 0, a DDIM step from angle a to angle b estimates
    z0 = cos(a) z and noise = sin(a) z, so it multiplies z by cos(a) cos(b) + sin(a) sin(b)
    = cos(b - a); then the standardisation is undone."""
    mean, std = torch.arange(4.0), torch.tensor([1.0, 2.0, 0.5, 3.0])
    prior = LatentPrior(4, 16, mean, std)
    torch.nn.init.zeros_(prior.out[-1].weight)
    torch.nn.init.zeros_(prior.out[-1].bias)
    noise = torch.randn(5, 4, 3, 3)
    z = sample_prior(prior, noise, steps=10)
    shrink = math.cos(math.pi / 2 / 10) ** 10
    assert torch.allclose(z, noise * shrink * std.view(1, 4, 1, 1) + mean.view(1, 4, 1, 1), atol=1e-5)


class Constant(torch.nn.Module):
    """A stand-in prior that predicts the same v everywhere, on unstandardised latents."""

    def __init__(self, v):
        super().__init__()
        self.v = v
        self.register_buffer("latent_mean", torch.zeros(1, 2, 1, 1))
        self.register_buffer("latent_std", torch.ones(1, 2, 1, 1))

    def forward(self, z, t):
        return torch.full_like(z, self.v)


@pytest.mark.parametrize("guidance, v", [(1.0, 1.0), (1.5, 0.2 + 1.5 * (1.0 - 0.2)), (3.0, 0.2 + 3 * 0.8)])
def test_autoguidance_steps_away_from_the_guide(guidance, v):
    """One DDIM step from t = 1 (alpha = 0, sigma = 1) to t = 0 lands on z0 = -v, so the
    result shows the v it used: the guide's, plus `guidance` times the prior's lead over it."""
    z = sample_prior(Constant(1.0), torch.randn(3, 2, 4, 4), steps=1, guide=Constant(0.2), guidance=guidance,
                     interval=(0, 1))
    assert torch.allclose(z, torch.full_like(z, -v), atol=1e-6)
    unguided = sample_prior(Constant(1.0), torch.randn(3, 2, 4, 4), steps=1, guidance=guidance)
    assert torch.allclose(unguided, torch.full_like(z, -1.0), atol=1e-6)  # no guide, no guidance
    # One step runs at t = 1, pure noise: outside the default interval the guide is not heard.
    outside = sample_prior(Constant(1.0), torch.randn(3, 2, 4, 4), steps=1, guide=Constant(0.2), guidance=guidance)
    assert torch.allclose(outside, torch.full_like(z, -1.0), atol=1e-6)


def test_a_trained_prior_prefers_its_training_latents():
    torch.manual_seed(0)
    latents = torch.randn(4, 4, 4, 4)
    prior = LatentPrior(4, 32, latents.mean((0, 2, 3)), latents.std((0, 2, 3)))
    optimizer = torch.optim.Adam(prior.parameters(), lr=2e-3)
    for _ in range(300):
        loss = prior_loss(prior, latents.repeat(8, 1, 1, 1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    prior.eval()

    def mean_loss(z):
        torch.manual_seed(1)  # the same noise levels and noise for both sets
        with torch.no_grad():
            return sum(prior_loss(prior, z.repeat(64, 1, 1, 1)).item() for _ in range(5)) / 5

    others = torch.randn(4, 4, 4, 4)
    assert mean_loss(latents) < 0.7 * mean_loss(others)


def test_a_prior_whose_loss_is_not_finite_raises_floating_point_error():
    with pytest.raises(FloatingPointError, match="loss became nan"):
        fit_prior(torch.full((4, 2, 4, 4), float("nan")), 8, 2, 2, 1e-3, torch.Generator().manual_seed(0))
