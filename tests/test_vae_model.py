"""vae_model.py: shapes, the reparameterization trick, the loss, learning, checkpoints and
the atomic writes every file goes through."""
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from conftest import ROOT
from vae_model import VAE, atomic_write, load_vae, psnr, save_checkpoint, vae_checkpoint, vae_loss


@pytest.mark.parametrize("size,latent", [(32, 4), (64, 8), (40, 1), (128, 4)])
def test_shapes(size, latent):
    model = VAE(size, latent, channels=(8, 16, 16))
    x = torch.rand(2, 3, size, size) * 2 - 1
    mu, log_var = model.encode(x)
    assert mu.shape == log_var.shape == (2, latent, size // 8, size // 8)
    recon, mu2, _ = model(x)
    assert recon.shape == x.shape
    assert recon.min() >= -1 and recon.max() <= 1  # tanh output, same range as the input
    assert model.decode(torch.randn(3, latent, size // 8, size // 8)).shape == (3, 3, size, size)


def test_image_size_must_be_multiple_of_8():
    with pytest.raises(ValueError, match="multiple of 8"):
        VAE(36)


def test_kl_term_matches_torch_distributions():
    torch.manual_seed(0)
    mu, log_var = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    x = torch.rand(5, 3, 24, 24)
    _, _, kl = vae_loss(x, x, mu, log_var, kl_weight=1.0)
    q = Normal(mu, torch.exp(0.5 * log_var))
    expected = kl_divergence(q, Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum() / 5
    assert torch.allclose(kl, expected, rtol=1e-5)


def test_loss_reduction_is_sum_per_image_mean_over_batch():
    x, recon = torch.zeros(4, 3, 8, 8), torch.full((4, 3, 8, 8), 0.5)
    zeros = torch.zeros(4, 2, 1, 1)
    total, mse, kl = vae_loss(recon, x, zeros, zeros, kl_weight=0.1)
    assert mse.item() == pytest.approx(3 * 8 * 8 * 0.25)  # summed over one image's pixels
    assert kl.item() == pytest.approx(0.0)                # q = N(0, I) = prior
    _, _, kl = vae_loss(recon, x, torch.ones(4, 2, 1, 1), zeros, kl_weight=0.1)
    total, mse, _ = vae_loss(recon, x, torch.ones(4, 2, 1, 1), zeros, kl_weight=0.1)
    assert kl.item() == pytest.approx(2 * 0.5)            # 1/2 mu^2 per element, 2 elements
    assert total.item() == pytest.approx(mse.item() + 0.1 * kl.item())


def test_reparameterize_passes_gradients_and_samples_the_right_distribution():
    torch.manual_seed(0)
    mu = torch.full((20000,), 2.0, requires_grad=True)
    log_var = torch.full((20000,), 2 * torch.log(torch.tensor(3.0)).item(), requires_grad=True)
    z = VAE.reparameterize(mu, log_var)
    assert z.mean().item() == pytest.approx(2.0, abs=0.1)
    assert z.std().item() == pytest.approx(3.0, abs=0.1)
    z.sum().backward()
    assert torch.all(mu.grad == 1)                      # dz/dmu = 1
    # z = mu + exp(log_var / 2) * eps, so dz/dlog_var = sigma * eps / 2 = (z - mu) / 2
    assert torch.allclose(log_var.grad, (z.detach() - mu.detach()) / 2, atol=1e-6)


def test_psnr():
    x = torch.zeros(2, 3, 4, 4)
    assert psnr(x + 0.2, x) == pytest.approx(10 * torch.log10(torch.tensor(1 / 0.01)).item())


def test_small_model_learns_four_images():
    """A real learning test: PSNR on four images must rise well above the start."""
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    images = []
    for i in range(4):
        blob = ((xx - 0.3 * i + 0.4) ** 2 + (yy + 0.2 * i - 0.3) ** 2 < 0.25).float()
        colour = torch.tensor([[0.8, -0.6, 0.2], [-0.5, 0.7, -0.9], [0.1, 0.1, -0.8], [-0.9, -0.2, 0.6]][i])
        images.append(torch.where(blob.bool(), colour.view(3, 1, 1), torch.ones(3, 32, 32)))
    x = torch.stack(images)
    model = VAE(32, 4, channels=(16, 32, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    with torch.no_grad():
        before = psnr(model.decode(model.encode(x)[0]), x)
    for _ in range(300):
        recon, mu, log_var = model(x)
        loss, _, _ = vae_loss(recon, x, mu, log_var, kl_weight=0.01)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = psnr(model.decode(model.encode(x)[0]), x)
    assert after > 22 and after > before + 10, (before, after)


def test_checkpoint_rebuilds_the_model(tmp_path):
    model = VAE(48, 6, channels=(8, 16, 24)).eval()
    path = tmp_path / "m.pth"
    save_checkpoint(vae_checkpoint(model), path)
    loaded = load_vae(path)
    assert loaded.image_size == 48 and loaded.config == model.config
    assert not loaded.training
    x = torch.rand(1, 3, 48, 48) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(x)[0]), model.decode(model.encode(x)[0]))


@pytest.mark.parametrize("channels", [(4, 8, 12), (12, 20, 132), (32, 64, 128)])
def test_any_width_that_the_flag_accepts_builds(channels):
    """--channels takes any multiples of 4; GroupNorm must find a group count for each."""
    model = VAE(16, 2, channels)
    assert model(torch.rand(1, 3, 16, 16))[0].shape == (1, 3, 16, 16)


def half_written(path, *args, **kwargs):
    """A save that dies halfway: some bytes reach the file it was given, then it fails."""
    with open(path, "wb") as file:
        file.write(b"\x89PNG half a file")
    raise OSError("disk full")


def test_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"the good version")
    with pytest.raises(OSError):
        atomic_write(str(path), half_written)
    assert path.read_bytes() == b"the good version" and os.listdir(tmp_path) == ["file.bin"]


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "m.pth"
    script = (f"import os, signal, torch, sys; sys.path.insert(0, {ROOT!r})\n"
              "from vae_model import VAE, atomic_write, save_checkpoint, vae_checkpoint\n"
              f"save_checkpoint(vae_checkpoint(VAE(32, 4, (8, 8, 8))), {str(path)!r})\n"
              "def dies(tmp):\n"
              "    open(tmp, 'wb').write(b'half')\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              f"atomic_write({str(path)!r}, dies)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert load_vae(path).config["latent_channels"] == 4
