"""Stage two: the learned prior is trained after the VAE, saved with it, used by --generate,
and measured by benchmarks/bench_samples.py."""
import inspect
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import sample_vae
import train_vae
from conftest import HF_HOME, ROOT, assert_user_error, grid_pixels, run_script
from latent_prior import LatentPrior, fit_prior, levels_for, load_prior, prior_loss, sample_prior
from vae_model import VAE, load_vae, vae_checkpoint

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_samples  # noqa: E402  (benchmarks/ is not a package: found through sys.path)


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


def test_training_draws_its_sample_grid_as_sample_vae_does():
    """train_vae.py's samples_learned_prior.png takes sample_prior's defaults; sample_vae.py has
    constants of its own, which must be the same numbers."""
    defaults = inspect.signature(sample_prior).parameters
    assert defaults["steps"].default == sample_vae.SAMPLE_STEPS
    assert defaults["guidance"].default == sample_vae.GUIDANCE
    assert defaults["interval"].default == sample_vae.GUIDANCE_INTERVAL


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


def test_the_prior_learns_the_codes_of_the_training_images_and_their_mirrors(monkeypatch):
    """Not of the training augmentation: its rotations and colour jitter would teach the prior
    tilted frames and grey backgrounds. Every image and its mirror, each exactly once."""
    torch.manual_seed(0)
    model = VAE(16, 4, (8, 8, 8)).eval()
    cache = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8)
    rows = torch.tensor([6, 0, 3, 2, 5])  # the training images among them
    images = cache[rows]
    seen = []
    monkeypatch.setattr(train_vae, "fit_prior", lambda mus, *rest: seen.append(mus) or "prior")
    args = train_vae.parse_args(["--prior-guide-steps", "0"])
    args.use_amp = False  # set by settings(), which train() calls first
    assert train_vae.train_prior(model, cache, rows, args, torch.device("cpu"), stop=[]) == ("prior", None)
    with torch.no_grad():
        expected = [model.encode(train_vae.to_model_range(x))[0] for x in (images, images.flip(-1))]
    codes = seen[0].flatten(1)
    assert len(codes) == 10
    for code in torch.cat(expected).flatten(1):  # each expected code once, in any order
        assert ((codes - code).abs().amax(1) < 1e-5).sum() == 1


def test_training_saves_the_prior_and_its_guide_with_the_model(trained):
    prior, guide = load_prior(trained["model"])
    channels = train_vae.LATENT_CHANNELS
    assert isinstance(prior, LatentPrior) and prior.config == {"latent_channels": channels, "width": 16, "levels": 2}
    assert isinstance(guide, LatentPrior) and guide.config == {"latent_channels": channels, "width": 8, "levels": 2}
    # Both standardise the same codes the same way, so their predictions can be mixed.
    assert torch.equal(guide.latent_mean, prior.latent_mean) and torch.equal(guide.latent_std, prior.latent_std)
    checkpoint = torch.load(trained["model"], weights_only=True)
    assert checkpoint["prior"]["seconds"] > 0
    # The prior's standardisation comes from the encoder's codes, not the zeros it starts with.
    assert torch.isfinite(prior.latent_std).all() and (prior.latent_std > 0).all()
    assert not torch.equal(prior.latent_mean, torch.zeros_like(prior.latent_mean))
    assert "learned prior done" in trained["stdout"]
    with Image.open(trained["results"] / "samples_learned_prior.png") as grid:
        assert grid.size == (8 * 34 + 2, 2 * 34 + 2)


@pytest.mark.parametrize("flags, guidance, temperature, says", [
    ([], sample_vae.GUIDANCE, 1.0, "learned prior, autoguidance 1.5\n"),
    (["--guidance", 3], 3.0, 1.0, "learned prior, autoguidance 3\n"),
    (["--guidance", 1], 1.0, 1.0, "learned prior\n"),
    (["--temperature", 0.5], sample_vae.GUIDANCE, 0.5, "learned prior, autoguidance 1.5, temperature 0.5\n")])
def test_generate_uses_the_learned_prior_and_its_guide_by_default(trained, tmp_path, flags, guidance, temperature,
                                                                   says):
    out = tmp_path / "gen.png"
    result = run_script("sample_vae.py", "--model", trained["model"], "--generate", 5, "--seed", 4,
                        "--sample-steps", 7, "--out", out, *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    assert says in result.stdout
    model, (prior, guide) = load_vae(trained["model"]), load_prior(trained["model"])
    noise = temperature * torch.randn(5, train_vae.LATENT_CHANNELS, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = grid_pixels(model.decode(sample_prior(prior, noise, 7, guide, guidance)), nrow=5)
    with Image.open(out) as grid:
        written = np.asarray(grid.convert("RGB")).astype(int)
    assert np.abs(written - expected).max() <= 1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generate_from_the_normal_prior_decodes_the_seeded_noise(trained, tmp_path, temperature):
    out = tmp_path / "normal.png"
    result = run_script("sample_vae.py", "--model", trained["model"], "--generate", 3, "--seed", 2,
                        "--prior", "normal", "--temperature", temperature, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "from the normal prior" in result.stdout
    model = load_vae(trained["model"])
    with torch.no_grad():
        noise = torch.randn(3, train_vae.LATENT_CHANNELS, 4, 4, generator=torch.Generator().manual_seed(2))
        expected = grid_pixels(model.decode(temperature * noise), 3)
    with Image.open(out) as grid:
        assert np.abs(np.asarray(grid.convert("RGB")).astype(int) - expected).max() <= 1


@pytest.fixture
def model_without_prior(trained, tmp_path):
    path = tmp_path / "old.pth"
    torch.save(vae_checkpoint(load_vae(trained["model"])), path)
    return path


def test_checkpoint_without_prior_falls_back_to_normal_with_a_note(model_without_prior, trained, tmp_path):
    result = run_script("sample_vae.py", "--model", model_without_prior, "--generate", 3, "--seed", 2,
                        "--out", tmp_path / "a.png")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "holds no learned prior" in result.stdout and "N(0, I)" in result.stdout
    run_script("sample_vae.py", "--model", trained["model"], "--generate", 3, "--seed", 2,
               "--prior", "normal", "--out", tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_asking_for_a_learned_prior_that_is_not_there(model_without_prior, tmp_path):
    result = run_script("sample_vae.py", "--model", model_without_prior, "--generate", 3,
                        "--prior", "learned", "--out", tmp_path / "a.png")
    assert_user_error(result, "no learned prior", "--prior normal")
    assert not (tmp_path / "a.png").exists()


def test_a_prior_without_a_guide_samples_unguided_with_a_note(trained, tmp_path):
    model, prior = load_vae(trained["model"]), load_prior(trained["model"])[0]
    torch.save(vae_checkpoint(model, prior), tmp_path / "unguided.pth")  # as --prior-guide-steps 0 writes it
    result = run_script("sample_vae.py", "--model", tmp_path / "unguided.pth", "--generate", 3, "--seed", 2,
                        "--sample-steps", 5, "--out", tmp_path / "a.png")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "holds no guide for its prior" in result.stdout and ", autoguidance" not in result.stdout
    noise = torch.randn(3, train_vae.LATENT_CHANNELS, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = grid_pixels(model.decode(sample_prior(prior, noise, 5)), 3)
    with Image.open(tmp_path / "a.png") as grid:
        assert np.abs(np.asarray(grid.convert("RGB")).astype(int) - expected).max() <= 1
    # With guidance turned off there is nothing to miss, and nothing to say.
    result = run_script("sample_vae.py", "--model", tmp_path / "unguided.pth", "--generate", 3, "--sample-steps", 5,
                        "--guidance", 1, "--out", tmp_path / "b.png")
    assert result.returncode == 0 and "note" not in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("part", ["prior", "guide"])
def test_prior_that_does_not_fit_its_config(trained, tmp_path, part):
    checkpoint = torch.load(trained["model"], weights_only=True)
    checkpoint[part]["config"]["width"] = 24
    torch.save(checkpoint, tmp_path / "bad.pth")
    result = run_script("sample_vae.py", "--model", tmp_path / "bad.pth", "--generate", 2)
    assert_user_error(result, f"{part} that does not fit its own config")


@pytest.mark.parametrize("flag,value,phrase", [
    ("--prior-steps", "-1", "zero or a positive"), ("--prior-width", "20", "multiple of 8"),
    ("--prior-lr", "0", "positive"),
    ("--prior-guide-steps", "-1", "zero or a positive"), ("--prior-guide-width", "12", "multiple of 8"),
])
def test_bad_prior_flags(tmp_path, flag, value, phrase):
    assert_user_error(run_script("train_vae.py", flag, value, "--results-dir", tmp_path / "r"), phrase)


def test_prior_steps_zero_skips_stage_two(tmp_path, image_folder):
    result = run_script("train_vae.py", "--data", image_folder, "--epochs", 1, "--image-size", 32,
                        "--prior-steps", 0, "--device", "cpu", "--out", tmp_path / "m.pth",
                        "--results-dir", tmp_path / "r")
    assert result.returncode == 0, result.stderr[-2000:]
    assert load_prior(tmp_path / "m.pth") == (None, None) and load_vae(tmp_path / "m.pth").image_size == 32


def test_ctrl_c_in_stage_two_keeps_the_vae_and_resume_trains_the_prior(tmp_path, image_folder):
    out, results = tmp_path / "m.pth", tmp_path / "r"
    args = [sys.executable, os.path.join(ROOT, "train_vae.py"), "--data", image_folder, "--epochs", "1",
            "--image-size", "32", "--device", "cpu", "--prior-steps", "1000000", "--prior-width", "16",
            "--prior-guide-steps", "7", "--out", str(out), "--results-dir", str(results)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": HF_HOME, "MPLBACKEND": "Agg"}
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not out.exists() and process.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)  # inside stage two: the VAE is saved before it starts
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "saved in" in stderr
    # The command it prints continues the run as it started, its prior flags included.
    assert f"`python train_vae.py --resume --results-dir {results}`" in stderr
    assert load_vae(out).image_size == 32 and load_prior(out) == (None, None)  # usable, without a prior

    # --resume after a finished VAE trains only the prior, with the prior flags given now where
    # there are (the guide's steps, given as 0 here, would otherwise be the run's 7).
    result = run_script("train_vae.py", "--resume", "--results-dir", results, "--prior-steps", 20,
                        "--prior-width", 8, "--prior-guide-steps", 0, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming after epoch 1 of 1" in result.stdout and "ignoring" not in result.stdout
    assert load_prior(out)[0].config["width"] == 8 and load_prior(out)[1] is None  # into the run's --out
    assert sorted(os.listdir(tmp_path)) == ["m.pth", "r"]


# ------------------------------------------------------------------ benchmarks/bench_samples.py

def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift():
    a = torch.randn(300, 6, generator=torch.Generator().manual_seed(0))
    assert abs(bench_samples.frechet_distance(a, a)) < 1e-6
    shifts = [bench_samples.frechet_distance(a, a + s) for s in (0.5, 1.0, 2.0)]
    assert shifts[0] == pytest.approx(6 * 0.25, rel=1e-6) and shifts[0] < shifts[1] < shifts[2]
    # A wider spread counts too: scaling a set by 2 moves its mean m to 2m and gives
    # tr(C + 4C - 2 (4C^2)^1/2) = tr(C) for the covariances.
    b = torch.randn(500, 3, generator=torch.Generator().manual_seed(1)).double()
    expected = b.mean(0).pow(2).sum() + torch.cov(b.T).trace()
    assert bench_samples.frechet_distance(b, 2 * b) == pytest.approx(expected.item(), rel=1e-9)


def test_one_piece_counts_figures_that_are_not_fragments():
    images = torch.ones(4, 3, 32, 32)  # white
    images[0, :, 4:20, 4:20] = -1  # one square
    images[1, :, 4:12, 4:12] = images[1, :, 20:28, 20:28] = -1  # two apart
    images[2, :, 4:12, 4:12] = images[2, 0, 24:27, 24:27] = -1  # one square and a red speck
    images[3, :, 4:12, 4:12] = images[3, :, 12:20, 12:20] = 0  # two grey squares touching corners
    assert [bench_samples.one_piece(image[None]) for image in images] == [1, 0, 1, 1]
    assert bench_samples.one_piece(images) == 0.75
    assert bench_samples.one_piece(torch.ones(2, 3, 8, 8)) == 0  # nothing drawn: no figure
    images[0, :, 1:31, 1:31] = -1  # one piece, but it fills the frame: not a figure on white
    assert bench_samples.one_piece(images[:1]) == 0


def test_bench_samples_prints_every_row(trained, image_folder, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_samples.py"),
                             "--model", str(trained["model"]), "--data", image_folder, "--samples", "16",
                             "--val-fraction", "0.3", "--sample-steps", "3", "--grids", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "distance" not in line]
    names = [row.split("|")[1].strip() for row in rows]
    assert names == ["real training images (floor)", "real latents (reconstructions)", "N(0, I)",
                     "diagonal data prior", "PCA Gaussian", "learned prior without autoguidance",
                     "learned prior (chosen)", f"learned prior at temperature {bench_samples.LOW_TEMPERATURE}"]
    for name, row in zip(names, rows):
        layout, texture, whole, copy = (float(cell) for cell in row.split("|")[2:6])
        assert layout > -1e-6 and texture > -1e-6 and 0 <= whole <= 1, row
        # The floor's samples are training images: each is its own nearest neighbour.
        assert (copy == 0) == (name == "real training images (floor)"), row
    assert len(os.listdir(tmp_path)) == 6
    # The low-temperature row draws from the same noise, shrunk: other samples, other distances.
    assert rows[-1].split("|")[2:6] != rows[-2].split("|")[2:6]
    # Stage two's training time, stored in the checkpoint, belongs to the chosen row alone.
    assert float(rows[-2].split("|")[6]) > 0 and rows[-1].split("|")[6].strip() == ""

    # Another --draw-seed draws other samples from every prior, against the same real images;
    # --low-temperature 0 leaves that row out, and --only draws only the priors it names.
    again = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_samples.py"),
                            "--model", str(trained["model"]), "--data", image_folder, "--samples", "16",
                            "--val-fraction", "0.3", "--sample-steps", "3", "--draw-seed", "1",
                            "--low-temperature", "0", "--only", "learned prior"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]

    def distances(row):
        return row.split("|")[2:6]

    rows_again = [line for line in again.stdout.splitlines() if line.startswith("| ") and "distance" not in line]
    kept = [name for name in names[:-1] if name.startswith("real") or "learned prior" in name]
    assert [row.split("|")[1].strip() for row in rows_again] == kept == names[:2] + names[5:7]
    assert [distances(row) for row in rows_again[:2]] == [distances(row) for row in rows[:2]]
    assert all(distances(a) != distances(b) for a, b in zip(rows_again[2:], rows[5:7]))


def test_bench_samples_names_a_missing_model(image_folder, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_samples.py"),
                             "--model", str(tmp_path / "none.pth"), "--data", image_folder],
                            capture_output=True, text=True, timeout=300)
    assert_user_error(result, "none.pth", "train_vae.py")


def test_a_prior_whose_loss_is_not_finite_ends_in_a_clear_message(monkeypatch):
    with pytest.raises(FloatingPointError, match="loss became nan"):
        fit_prior(torch.full((4, 2, 4, 4), float("nan")), 8, 2, 2, 1e-3, torch.Generator().manual_seed(0))

    def diverge(*args, **kwargs):
        raise FloatingPointError("the prior's loss became nan")
    monkeypatch.setattr(train_vae, "fit_prior", diverge)
    args = train_vae.parse_args(["--prior-lr", "0.5"])
    args.use_amp = False
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    with pytest.raises(train_vae.UserError, match=r"loss became nan; lower --prior-lr \(now 0.5\)"):
        train_vae.train_prior(VAE(16, 2, (8, 8, 8)).eval(), images, torch.arange(3), args, torch.device("cpu"), stop=[])
