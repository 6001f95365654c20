"""sample_vae.py: every mode, headless, on the model trained in conftest, checked against what
the model computes; the learned prior and its guide by default, the fallbacks with a note."""
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample_vae
import vae_api
from conftest import ROOT, assert_user_error, grid_pixels, run_script
from image_data import open_rgb, to_model_range, to_square
from latent_prior import load_prior, sample_prior
from torchvision.transforms.v2.functional import pil_to_tensor
from train_vae import LATENT_CHANNELS
from vae_model import VAE, load_vae, vae_checkpoint


def test_reconstruction_figure_and_its_psnr(trained, image_folder, tmp_path):
    image = os.path.join(image_folder, "blob_03.png")
    out = tmp_path / "fig.png"
    result = run_script("sample_vae.py", "--model", trained["model"], "--no-show", "--out", out, "--image", image)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = float(re.search(r"reconstruction PSNR ([0-9.]+) dB", result.stdout).group(1))
    model = load_vae(trained["model"])
    x = to_model_range(pil_to_tensor(to_square(open_rgb(image), 32)).unsqueeze(0))  # as in training
    with torch.no_grad():
        mse = ((model.decode(model.encode(x)[0]) - x) / 2).pow(2).mean().item()  # on [0, 1] pixels
    assert printed == pytest.approx(10 * math.log10(1 / mse), abs=0.006)
    with Image.open(out) as figure:
        assert figure.width > 2.5 * figure.height  # original | reconstruction | latent channels


def test_the_sample_image_is_found_from_another_folder_and_the_figure_written_there(trained, tmp_path):
    """pokemon_sample_test.png ships beside the script; the figure goes where the user stands."""
    result = run_script("sample_vae.py", "--model", trained["model"], "--no-show", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reconstruction PSNR" in result.stdout
    with Image.open(tmp_path / "vae_results" / "sample_reconstruction.png") as figure:
        assert figure.width > 2.5 * figure.height


def test_sampling_one_image_loads_neither_datasets_nor_the_training_script(trained, tmp_path):
    """sample_vae.py imports the model, the prior and image_data.py; the Hub client (seconds to
    import) only where a Hub data set is read, which sampling never does."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['sample_vae.py', '--model', {str(trained['model'])!r}, '--no-show',"
            f" '--out', {str(tmp_path / 'fig.png')!r}]\n"
            "try:\n"
            f"    runpy.run_path({os.path.join(ROOT, 'sample_vae.py')!r}, run_name='__main__')\n"
            "except SystemExit as exit_:\n"
            "    assert not exit_.code, exit_.code\n"
            "print(sorted(name for name in ('datasets', 'train_vae') if name in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "MPLBACKEND": "Agg"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reconstruction PSNR" in result.stdout and (tmp_path / "fig.png").exists()
    assert result.stdout.strip().splitlines()[-1] == "[]"


def wide_photo():
    """A 'photo' three times as wide as high: red, green (the centre) and blue thirds, no white."""
    photo = Image.new("RGB", (96, 32), (200, 30, 30))
    photo.paste((30, 200, 30), (32, 0, 64, 32))
    photo.paste((30, 30, 200), (64, 0, 96, 32))
    return photo


def as_trained(vae):
    return vae_api.Trained(vae.eval(), None, None, "")


def test_sample_vae_prepares_images_with_the_models_fit(tmp_path):
    wide_photo().save(tmp_path / "photo.png")
    x = vae_api.to_input(as_trained(VAE(16, 2, (8, 8, 8), fit="crop")), str(tmp_path / "photo.png"))
    r, g, b = x[0].add(1).mul(127.5).round()
    assert (g > 180).all() and (r < 60).all() and (b < 60).all()  # the green centre, not the red and blue edges
    padded = vae_api.to_input(as_trained(VAE(16, 2, (8, 8, 8))), Image.open(tmp_path / "photo.png"))  # PIL too
    assert (padded[0, :, 0] == 1).all()  # the default pads: white on top


# ------------------------------------------------------------------ --generate


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
    noise = temperature * torch.randn(5, LATENT_CHANNELS, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = grid_pixels(model.decode(sample_prior(prior, noise, 7, guide, guidance)), nrow=5)
    with Image.open(out) as grid:
        written = np.asarray(grid.convert("RGB")).astype(int)
    assert np.abs(written - expected).max() <= 1


@pytest.mark.parametrize("count, temperature", [(3, 1.0), (16, 0.7)])
def test_generate_from_the_normal_prior_decodes_the_seeded_noise(trained, tmp_path, count, temperature):
    """--prior normal decodes z ~ N(0, temperature^2 I) from --seed, laid out 8 to a row."""
    out = tmp_path / "normal.png"
    result = run_script("sample_vae.py", "--model", trained["model"], "--generate", count, "--seed", 2,
                        "--prior", "normal", "--temperature", temperature, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "from the normal prior" in result.stdout
    model = load_vae(trained["model"])
    with torch.no_grad():
        noise = torch.randn(count, LATENT_CHANNELS, 4, 4, generator=torch.Generator().manual_seed(2))
        expected = grid_pixels(model.decode(temperature * noise), min(8, count))
    with Image.open(out) as grid:
        written = np.asarray(grid.convert("RGB")).astype(int)
    rows = math.ceil(count / 8)
    assert written.shape == (rows * 34 + 2, min(8, count) * 34 + 2, 3)  # 32 px each, 2 px padding
    assert np.abs(written - expected).max() <= 1


def test_generate_is_repeatable_with_seed(trained, tmp_path):
    """The same --seed draws the same samples; another seed, others."""
    for name, seed in (("a.png", 3), ("b.png", 3), ("c.png", 4)):
        result = run_script("sample_vae.py", "--model", trained["model"], "--generate", 4, "--seed", seed,
                            "--sample-steps", 10, "--out", tmp_path / name)
        assert result.returncode == 0, result.stderr[-2000:]
    a, b, c = ((tmp_path / name).read_bytes() for name in ("a.png", "b.png", "c.png"))
    assert a == b != c


def test_generate_from_the_data_prior_decodes_the_fitted_gaussian(trained, image_folder, tmp_path):
    out = tmp_path / "gen.png"
    result = run_script("sample_vae.py", "--model", trained["model"], "--generate", 3, "--seed", 5,
                        "--prior", "data", "--data", image_folder, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    model = load_vae(trained["model"])
    images = torch.stack([to_model_range(pil_to_tensor(to_square(open_rgb(os.path.join(image_folder, name)), 32)))
                          for name in sorted(os.listdir(image_folder))])
    with torch.no_grad():
        mus = model.encode(images)[0]
        eps = torch.randn(3, *mus.shape[1:], generator=torch.Generator().manual_seed(5))
        expected = grid_pixels(model.decode(mus.mean(0) + mus.std(0) * eps), nrow=3)
    with Image.open(out) as grid:
        assert np.abs(np.asarray(grid.convert("RGB")).astype(int) - expected).max() <= 1


def test_the_data_prior_is_the_mean_and_std_of_the_latent_means(trained):
    model = load_vae(trained["model"])
    pixels = torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8)  # over a batch of encode_means
    mean, std = sample_vae.fit_data_prior(model, pixels, "cpu")
    with torch.no_grad():
        mus = model.encode(to_model_range(pixels))[0]
    assert torch.allclose(mean, mus.mean(0), atol=1e-5) and torch.allclose(std, mus.std(0), atol=1e-5)


@pytest.fixture
def model_without_prior(trained, tmp_path):
    path = tmp_path / "old.pth"
    torch.save(vae_checkpoint(load_vae(trained["model"])), path)
    return path


def test_checkpoint_without_prior_falls_back_to_normal_with_a_note(model_without_prior, trained, tmp_path):
    result = run_script("sample_vae.py", "--model", model_without_prior, "--generate", 3, "--seed", 2,
                        "--out", tmp_path / "a.png")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "holds no learned prior: train one with `python train_vae.py`" in result.stdout  # an older file: no record
    assert "N(0, I)" in result.stdout
    run_script("sample_vae.py", "--model", trained["model"], "--generate", 3, "--seed", 2,
               "--prior", "normal", "--out", tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_a_prior_without_a_guide_samples_unguided(trained, tmp_path):
    model, prior = load_vae(trained["model"]), load_prior(trained["model"])[0]
    torch.save(vae_checkpoint(model, prior), tmp_path / "unguided.pth")  # as --prior-guide-steps 0 writes it
    result = run_script("sample_vae.py", "--model", tmp_path / "unguided.pth", "--generate", 3, "--seed", 2,
                        "--sample-steps", 5, "--out", tmp_path / "a.png")
    assert result.returncode == 0, result.stderr[-2000:]
    assert ", autoguidance" not in result.stdout
    noise = torch.randn(3, LATENT_CHANNELS, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = grid_pixels(model.decode(sample_prior(prior, noise, 5)), 3)
    with Image.open(tmp_path / "a.png") as grid:
        assert np.abs(np.asarray(grid.convert("RGB")).astype(int) - expected).max() <= 1
    # With guidance turned off there is nothing to miss, and nothing to say.
    result = run_script("sample_vae.py", "--model", tmp_path / "unguided.pth", "--generate", 3, "--sample-steps", 5,
                        "--guidance", 1, "--out", tmp_path / "b.png")
    assert result.returncode == 0 and "note" not in result.stdout, result.stderr[-2000:]


# ------------------------------------------------------------------ --interpolate, --latent-map, flags


def test_interpolation_decodes_the_straight_line_between_the_latent_means(trained, image_folder, tmp_path):
    a, b = (os.path.join(image_folder, name) for name in ("blob_01.png", "blob_05.png"))
    out = tmp_path / "walk.png"
    result = run_script("sample_vae.py", "--model", trained["model"], "--interpolate", a, b,
                        "--steps", 5, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    model = load_vae(trained["model"])
    xa, xb = (to_model_range(pil_to_tensor(to_square(open_rgb(path), 32)).unsqueeze(0)) for path in (a, b))
    with torch.no_grad():
        mu_a, mu_b = model.encode(xa)[0], model.encode(xb)[0]
        expected = model.decode(torch.cat([(1 - t) * mu_a + t * mu_b for t in (0, 0.25, 0.5, 0.75, 1)]))
    frames = vae_api.interpolate(vae_api.load(trained["model"]), a, b, 5)  # PIL images
    walked = torch.stack([pil_to_tensor(frame) for frame in frames]).float()
    assert (walked - expected.add(1).mul(127.5)).abs().max() <= 1
    with Image.open(out) as strip:
        assert np.abs(np.asarray(strip.convert("RGB")).astype(int) - grid_pixels(expected, nrow=5)).max() <= 1
    with Image.open(tmp_path / "walk.gif") as gif:
        assert gif.n_frames == 8  # 5 there, 3 back
    assert result.stdout.count(f"saved {tmp_path / 'walk.gif'}") == 1 and result.stdout.count(f"saved {out}") == 1


def test_interpolation_to_a_gif_name_puts_the_animation_there_and_the_strip_beside_it(trained, image_folder, tmp_path):
    a, b = (os.path.join(image_folder, name) for name in ("blob_01.png", "blob_05.png"))
    result = run_script("sample_vae.py", "--model", trained["model"], "--interpolate", a, b,
                        "--steps", 4, "--out", tmp_path / "walk.gif")
    assert result.returncode == 0, result.stderr[-2000:]
    with Image.open(tmp_path / "walk.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == 6  # 4 there, 2 back
    with Image.open(tmp_path / "walk.png") as strip:
        assert strip.format == "PNG"
    for name in ("walk.gif", "walk.png"):
        assert result.stdout.count(f"saved {tmp_path / name}") == 1, result.stdout


def test_latent_map_positions_are_the_principal_components_and_the_map_is_repeatable(trained, image_folder, tmp_path):
    mus = torch.randn(30, 4, 2, 2) * torch.linspace(0.1, 3, 16).view(1, 4, 2, 2)
    flat = mus.flatten(1).double()
    centred = flat - flat.mean(0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # eigenvalues ascending: the last two axes
    independent = centred @ vectors[:, [-1, -2]]
    positions = sample_vae.latent_positions(mus).double()
    for axis in range(2):  # an axis has no sign of its own
        assert torch.allclose(positions[:, axis].abs(), independent[:, axis].abs(), atol=1e-4)
    outs = [tmp_path / "a.png", tmp_path / "b.png"]
    for out in outs:  # no randomness: the same map twice
        result = run_script("sample_vae.py", "--model", trained["model"], "--latent-map", image_folder,
                            "--out", out)
        assert result.returncode == 0, result.stderr[-2000:]
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_flags_that_their_mode_uses_are_accepted():
    assert sample_vae.parse_args(["--generate", "4", "--guidance", "2", "--sample-steps", "5"]).guidance == 2
    assert sample_vae.parse_args(["--generate", "4", "--prior", "normal", "--temperature", "0.8"]).temperature == 0.8
    assert sample_vae.parse_args(["--generate", "4", "--prior", "learned", "--guidance", "1"]).guidance == 1
    assert sample_vae.parse_args(["--interpolate", "a", "b", "--steps", "5"]).steps == 5
    assert sample_vae.parse_args(["--generate", "4", "--guidance-interval", "0", "1"]).guidance_interval == (0, 1)
    assert sample_vae.parse_args(["--guidance-interval", "0.2", "0.7"]).guidance_interval == (0.2, 0.7)  # the default


def test_ctrl_c_while_sampling_ends_without_a_traceback(trained, monkeypatch, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(sample_vae, "generate", interrupted)
    monkeypatch.setattr(sys, "argv", ["sample_vae.py", "--model", str(trained["model"]), "--generate", "2"])
    try:
        sample_vae.main()
    except KeyboardInterrupt:  # what Python would print as a traceback
        pytest.fail("Ctrl-C escaped sample_vae.main()")
    except SystemExit as exit_:
        assert exit_.code == 130 and "interrupted" in capsys.readouterr().err
    else:
        pytest.fail("sample_vae.main() returned after Ctrl-C")


@pytest.mark.parametrize("mode", [[], ["--generate", "2"], ["--latent-map", "IMAGES"]])
def test_out_with_a_jpeg_name_writes_a_jpeg_in_every_mode(trained, image_folder, tmp_path, mode):
    mode = [image_folder if flag == "IMAGES" else flag for flag in mode]
    for name in ("x.jpg", "y.JPEG", "z.png"):
        result = run_script("sample_vae.py", "--model", trained["model"], "--no-show", *mode, "--out", tmp_path / name)
        assert result.returncode == 0, result.stderr[-2000:]
        with Image.open(tmp_path / name) as picture:
            assert picture.format == ("PNG" if name.endswith(".png") else "JPEG")


def test_a_folder_is_decoded_into_the_cache_dir_given(trained, image_folder, tmp_path):
    result = run_script("sample_vae.py", "--model", trained["model"], "--latent-map", image_folder,
                        "--cache-dir", tmp_path / "cache", "--no-show", "--out", tmp_path / "map.png")
    assert result.returncode == 0, result.stderr[-2000:]
    [cache] = os.listdir(tmp_path / "cache")
    assert cache.endswith(".npy") and "-32px-pad-" in cache and f"cached in {tmp_path / 'cache'}" in result.stdout


def test_generate_draws_and_decodes_in_batches_the_same_samples(trained, tmp_path, monkeypatch):
    """A batch of 3 (vae_api.BATCH is 64) gives the samples of one batch of 7, a chunk at a time."""
    model = vae_api.load(trained["model"])
    sizes, real_decode = [], model.vae.decode
    monkeypatch.setattr(model.vae, "decode", lambda z: sizes.append(len(z)) or real_decode(z))
    args = sample_vae.parse_args(["--generate", "7", "--prior", "normal", "--out", str(tmp_path / "a.png")])
    sample_vae.generate(model, args, torch.device("cpu"), show=False)
    monkeypatch.setattr(vae_api, "BATCH", 3)
    args.out = str(tmp_path / "b.png")
    sample_vae.generate(model, args, torch.device("cpu"), show=False)
    assert sizes == [7, 3, 3, 1]
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1


def test_a_model_without_a_prior_is_told_why_from_what_training_recorded(trained, tmp_path):
    """A run of --prior-steps 0 records it in its model; a training checkpoint is named as one."""
    checkpoint = torch.load(trained["model"], weights_only=True)
    del checkpoint["prior"], checkpoint["guide"]
    torch.save({**checkpoint, "prior_status": "none asked"}, tmp_path / "no_prior.pth")
    result = run_script("sample_vae.py", "--model", tmp_path / "no_prior.pth", "--prior", "learned", "--generate", 2,
                        "--out", tmp_path / "a.png")
    assert_user_error(result, "holds no learned prior: it was trained with --prior-steps 0",
                      "python train_vae.py --resume --prior-steps 4000")
    result = run_script("sample_vae.py", "--model", trained["results"] / "checkpoint.pth", "--generate", 2,
                        "--out", tmp_path / "b.png")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "it is a training checkpoint (after epoch 2); pass --model with the model its run saved" in result.stdout


def test_a_folder_goes_through_the_encoder_a_batch_at_a_time_from_its_memory_map(trained, image_folder, tmp_path,
                                                                              monkeypatch):
    """--latent-map and --prior data never hold the folder as floats: uint8 pixels, memory-mapped,
    become model input 32 at a time; the means come back on the CPU."""
    model = load_vae(trained["model"])
    pixels = sample_vae.load_folder(image_folder, model, "--latent-map", tmp_path / "cache")
    assert pixels.dtype == torch.uint8 and pixels.shape == (len(os.listdir(image_folder)), 3, 32, 32)
    many = pixels.repeat(6, 1, 1, 1)  # 72 images: three batches
    seen, real_encode = [], model.encode
    monkeypatch.setattr(model, "encode", lambda x: seen.append((len(x), x.dtype)) or real_encode(x))
    mus = vae_api.encode_means(model, many)
    assert seen == [(32, torch.float32), (32, torch.float32), (8, torch.float32)]
    with torch.no_grad():
        assert torch.allclose(mus, real_encode(to_model_range(many))[0], atol=1e-5)


def test_the_latent_map_shows_small_thumbnails_the_mean_of_each_block_of_pixels():
    pixels = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    small = sample_vae.thumbnails(pixels, 16, batch_size=2)
    assert small.shape == (5, 16, 16, 3) and small.dtype == np.uint8
    blocks = pixels.float().view(5, 3, 16, 4, 16, 4).mean((3, 5)).round().permute(0, 2, 3, 1)
    assert np.array_equal(small, blocks.byte().numpy())
