"""
Stage two: a learned prior over the VAE's latent space, a small denoising diffusion model.

With a weak KL weight the encoder's codes fill only a thin part of N(0, I): decoding plain noise
paints colour patches. So, as Stable Diffusion does on top of its VAE, a second model learns to
remove noise from noised latents, and sampling removes it step by step from pure noise (Ho et
al. 2020, "DDPM"; deterministic steps as in Song et al. 2021, "DDIM"). Read top to bottom: the
network, the noise schedule and the loss, training, sampling, loading.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from vae_model import load_checkpoint, norm, rebuild


# --- The network: a small U-Net over the latent image -----------------------------------------
class DenoiserBlock(nn.Module):
    """A residual block that also hears the noise level: a learned shift per channel."""

    def __init__(self, c_in, c_out, time_dim):
        super().__init__()
        self.conv1 = nn.Sequential(norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.time = nn.Linear(time_dim, c_out)
        self.conv2 = nn.Sequential(norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, t_embedding):
        h = self.conv1(x) + self.time(t_embedding)[:, :, None, None]
        return self.skip(x) + self.conv2(h)


class Attention(nn.Module):
    """Self-attention: a convolution sees only its neighbours, this every position at once."""

    def __init__(self, channels):
        super().__init__()
        self.norm = norm(channels)
        self.attention = nn.MultiheadAttention(channels, num_heads=4, batch_first=True)

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, h * w, C)
        mixed = self.attention(tokens, tokens, tokens, need_weights=False)[0]
        return x + mixed.transpose(1, 2).reshape(b, c, h, w)


def levels_for(side):
    """The U-Net's resolutions: one per doubling of `side`, so that attention sees 8-15 a side."""
    levels = 2
    while side / 2 ** levels >= 8:
        levels += 1
    return levels


class Level(nn.Module):
    """One resolution of the U-Net: two blocks down, and two up, joined by a skip connection."""

    def __init__(self, channels, below, time_dim):
        super().__init__()
        self.down = nn.ModuleList([DenoiserBlock(channels, channels, time_dim) for _ in range(2)])
        self.downsample = nn.Conv2d(channels, below, 3, stride=2, padding=1)
        self.upsample = nn.Conv2d(below, channels, 3, padding=1)
        self.up = nn.ModuleList([DenoiserBlock(2 * channels, channels, time_dim),
                                 DenoiserBlock(channels, channels, time_dim)])

    def descend(self, h, e):
        for block in self.down:
            h = block(h, e)
        return self.downsample(h), h  # down to the level below, and the skip kept for the way up

    def ascend(self, h, skip, e):
        # Back to the skip's size, not simply 2x: an odd side (40 px images) halves unevenly.
        h = self.upsample(F.interpolate(h, size=skip.shape[-2:], mode="nearest"))
        h = torch.cat([h, skip], dim=1)
        for block in self.up:
            h = block(h, e)
        return h


class LatentPrior(Level):
    """A U-Net predicting v = alpha * noise - sigma * z0 from z_t = alpha * z0 + sigma * noise,
    well-posed at both ends of the schedule (Salimans and Ho 2022). It is its own top Level; below
    it the inner levels, then the middle blocks and self-attention at the lowest resolution."""

    def __init__(self, latent_channels=6, width=64, latent_mean=None, latent_std=None, levels=2):
        # Not Level's init: the top level's parts come below in their old order (old seeds hold).
        nn.Module.__init__(self)
        self.config = dict(latent_channels=latent_channels, width=width, levels=levels)
        # The codes are standardised per channel, so that noise of std 1 drowns them fully.
        shape = (1, latent_channels, 1, 1)
        mean = torch.zeros(shape) if latent_mean is None else latent_mean.view(shape)
        std = torch.ones(shape) if latent_std is None else latent_std.view(shape)
        self.register_buffer("latent_mean", mean)
        self.register_buffer("latent_std", std)
        w, t = width, 4 * width
        self.time = nn.Sequential(nn.Linear(w, t), nn.SiLU(), nn.Linear(t, t))
        self.inp = nn.Conv2d(latent_channels, w, 3, padding=1)
        self.down = nn.ModuleList([DenoiserBlock(w, w, t), DenoiserBlock(w, w, t)])
        self.downsample = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.inner = nn.ModuleList([Level(2 * w, 2 * w, t) for _ in range(levels - 2)])
        self.middle = nn.ModuleList([DenoiserBlock(2 * w, 2 * w, t) for _ in range(2)])
        self.attention = Attention(2 * w)
        self.upsample = nn.Conv2d(2 * w, w, 3, padding=1)
        self.up = nn.ModuleList([DenoiserBlock(2 * w, w, t), DenoiserBlock(w, w, t)])
        self.out = nn.Sequential(norm(w), nn.SiLU(), nn.Conv2d(w, latent_channels, 3, padding=1))

    def embed_time(self, t):
        # Sinusoids of many frequencies, as for the positions of a transformer.
        half = self.config["width"] // 2
        frequencies = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
        angles = 1000.0 * t[:, None] * frequencies[None]
        return self.time(torch.cat([angles.sin(), angles.cos()], dim=1))

    def forward(self, z_t, t):
        e = self.embed_time(t)
        h = self.inp(z_t)
        levels, skips = [self, *self.inner], []
        for level in levels:  # down
            h, skip = level.descend(h, e)
            skips.append(skip)
        for block in self.middle:  # the lowest resolution, where attention sees the whole figure
            h = block(h, e)
        h = self.attention(h)
        for level in reversed(levels):  # up: each skip brings back its level's detail
            h = level.ascend(h, skips.pop(), e)
        return self.out(h)


# --- Noise schedule and loss ------------------------------------------------------------------
def noise_schedule(t):
    """Cosine schedule (Nichol and Dhariwal 2021): z_t = alpha * z0 + sigma * noise, where
    alpha^2 + sigma^2 = 1; t = 0 is clean, t = 1 pure noise."""
    angle = t * math.pi / 2
    return torch.cos(angle).view(-1, 1, 1, 1), torch.sin(angle).view(-1, 1, 1, 1)


def prior_loss(prior, z0):
    """MSE of the predicted v at a random noise level per latent (a mean: no ELBO to match)."""
    z0 = (z0 - prior.latent_mean) / prior.latent_std
    t = torch.rand(len(z0), device=z0.device)
    alpha, sigma = noise_schedule(t)
    noise = torch.randn_like(z0)
    v = alpha * noise - sigma * z0
    return F.mse_loss(prior(alpha * z0 + sigma * noise, t), v)


# --- Training ---------------------------------------------------------------------------------
@torch.no_grad()
def latent_means(model, batches):
    """What the prior learns from: the VAE's latent means (not samples: the decoder ignores
    the posterior's noise) of the images in `batches` (in [-1, 1]) and of their mirrors, never
    of augmented images (the prior would draw their tilted frames and grey backgrounds)."""
    model.eval()
    mus = []
    for batch in batches:
        for x in (batch, batch.flip(-1)):
            mus.append(model.encode(x.contiguous(memory_format=torch.channels_last))[0])
    return torch.cat(mus).float()


def fit_prior(codes, width, steps, batch_size, lr, generator, use_amp=False, stop=(),
              desc="learned prior"):
    """A LatentPrior trained on the codes (N, latent, h, w): the moving average of its weights,
    which samples more cleanly (Ho et al. 2020); None on a stop; FloatingPointError on a nan."""
    device = codes.device
    prior = LatentPrior(codes.shape[1], width, codes.mean((0, 2, 3)), codes.std((0, 2, 3)),
                        levels_for(min(codes.shape[-2:]))).to(device)
    # A plain average, decay 0.999, from the first step's weights: a warm-up (decay min(0.999,
    # (1 + n) / (10 + n)), which forgets those) drew worse guided samples (benchmarks/README.md).
    ema = torch.optim.swa_utils.AveragedModel(
        prior, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999), use_buffers=True)
    optimizer = torch.optim.AdamW(prior.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    # Every step's batch is drawn now and sent to the device once: a copy per step would wait.
    picks = torch.randint(len(codes), (steps, batch_size), generator=generator).to(device)
    for pick in tqdm(picks, desc=desc, leave=False):
        if stop:
            return None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = prior_loss(prior, codes[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        ema.update_parameters(prior)
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"the prior's loss became {loss.item()}")
    return ema.module.eval()


# --- Sampling ---------------------------------------------------------------------------------
SAMPLE_STEPS = 200              # DDIM steps from pure noise to a latent
GUIDANCE = 1.5                  # how far autoguidance goes past the prior's own step; 1: off
GUIDANCE_INTERVAL = (0.2, 0.7)  # the noise levels t (1: pure noise) where autoguidance acts


@torch.no_grad()
def sample_prior(prior, noise, steps=SAMPLE_STEPS, guide=None, guidance=GUIDANCE,
                 interval=GUIDANCE_INTERVAL):
    """Turn noise (B, latent, h, w) into latents of the first stage in `steps` deterministic
    DDIM steps: at each, estimate the clean latent and the noise from v, then re-mix them at
    the next, lower noise level. Autoguidance (Karras et al. 2024): `guide`, a smaller prior
    trained shorter, is the more wrong where the two disagree, so each step goes `guidance`
    times as far from its prediction as the prior's own (1: off), away from the weak model's
    errors, such as a patchwork of colours. Only at noise levels t inside `interval`
    (Kynkäänniemi et al. 2024): near pure noise it would pull the figures' layouts astray."""
    z = noise
    times = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
    # Decided once on the CPU: a tensor comparison in the loop would wait for the GPU each step.
    guided = [guide is not None and guidance != 1 and interval[0] <= t <= interval[1]
              for t in times[:-1].tolist()]
    for t, t_next, guide_here in zip(times[:-1], times[1:], guided):
        alpha, sigma = noise_schedule(t.expand(len(z)))
        v = prior(z, t.expand(len(z)))
        if guide_here:
            v_guide = guide(z, t.expand(len(z)))
            v = v_guide + guidance * (v - v_guide)
        z0, eps = alpha * z - sigma * v, sigma * z + alpha * v
        alpha_next, sigma_next = noise_schedule(t_next.expand(len(z)))
        z = alpha_next * z0 + sigma_next * eps
    return z * prior.latent_std + prior.latent_mean


def load_prior(path, map_location="cpu", checkpoint=None):
    """(prior, guide) stored next to the VAE in `path` (or in its `checkpoint`, if already read),
    each None where there is none."""
    checkpoint = load_checkpoint(path, map_location) if checkpoint is None else checkpoint
    return tuple(None if checkpoint.get(name) is None else
                 rebuild(LatentPrior, checkpoint[name],
                         f"{path} holds a {name} that does not fit its own config", map_location)
                 for name in ("prior", "guide"))
