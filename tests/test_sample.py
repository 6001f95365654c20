"""sample_vae.py: every mode, headless, on the model trained in conftest."""
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample_vae
from conftest import assert_user_error, blob_image, grid_pixels, run_script
from torchvision.transforms.v2.functional import pil_to_tensor
from train_vae import open_rgb, to_model_range, to_square
from vae_model import load_vae


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


def test_generate_normal_prior(trained, tmp_path):
    out = tmp_path / "gen.png"
    result = run_script("sample_vae.py", "--model", trained["model"], "--no-show", "--generate", 16, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    with Image.open(out) as grid:  # 8 per row, 32 px each, 2 px padding
        assert grid.size == (8 * 34 + 2, 2 * 34 + 2)


def test_generate_is_repeatable_with_seed(trained, tmp_path):
    outs = []
    for name in ("a.png", "b.png"):
        outs.append(tmp_path / name)
        run_script("sample_vae.py", "--model", trained["model"], "--generate", 4, "--seed", 3, "--out", outs[-1])
    assert outs[0].read_bytes() == outs[1].read_bytes()


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
    images = torch.rand(70, 3, 32, 32) * 2 - 1  # more than one batch of encode_means
    mean, std = sample_vae.fit_data_prior(model, images)
    with torch.no_grad():
        mus = model.encode(images)[0]
    assert torch.allclose(mean, mus.mean(0), atol=1e-5) and torch.allclose(std, mus.std(0), atol=1e-5)
    z = sample_vae.draw_latents(20000, mean, std, seed=0)
    assert torch.allclose(z.mean(0), mean, atol=0.05 * std.max().item() + 1e-3)
    assert torch.allclose(z.std(0), std, rtol=0.05)


def test_interpolation_decodes_the_straight_line_between_the_latent_means(trained, image_folder, tmp_path):
    a, b = (os.path.join(image_folder, name) for name in ("blob_01.png", "blob_05.png"))
    out = tmp_path / "walk.png"
    result = run_script("sample_vae.py", "--model", trained["model"], "--interpolate", a, b,
                        "--steps", 5, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    model = load_vae(trained["model"])
    xa, xb = (sample_vae.load_image(path, model) for path in (a, b))
    with torch.no_grad():
        mu_a, mu_b = model.encode(xa)[0], model.encode(xb)[0]
        expected = model.decode(torch.cat([(1 - t) * mu_a + t * mu_b for t in (0, 0.25, 0.5, 0.75, 1)]))
    assert torch.allclose(sample_vae.interpolation(model, xa, xb, 5), expected, atol=1e-5)
    with Image.open(out) as strip:
        assert np.abs(np.asarray(strip.convert("RGB")).astype(int) - grid_pixels(expected, nrow=5)).max() <= 1
    with Image.open(tmp_path / "walk.gif") as gif:
        assert gif.n_frames == 8  # 5 there, 3 back


def test_latent_map_positions_are_the_principal_components_whatever_the_seed(trained, image_folder, tmp_path):
    mus = torch.randn(30, 4, 2, 2) * torch.linspace(0.1, 3, 16).view(1, 4, 2, 2)
    flat = mus.flatten(1).double()
    centred = flat - flat.mean(0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # eigenvalues ascending: the last two axes
    independent = centred @ vectors[:, [-1, -2]]
    positions = sample_vae.latent_positions(mus).double()
    for axis in range(2):  # an axis has no sign of its own
        assert torch.allclose(positions[:, axis].abs(), independent[:, axis].abs(), atol=1e-4)
    outs = [tmp_path / "a.png", tmp_path / "b.png"]
    for seed, out in zip((1, 2), outs):
        result = run_script("sample_vae.py", "--model", trained["model"], "--latent-map", image_folder,
                            "--seed", seed, "--out", out)
        assert result.returncode == 0, result.stderr[-2000:]
    assert outs[0].read_bytes() == outs[1].read_bytes()


@pytest.mark.parametrize("args,phrase", [
    (["--generate", "0"], "positive"),
    (["--generate", "4", "--guidance", "0.5"], "at least 1"),
    (["--generate", "4", "--guidance-interval", "0.2", "1.5"], "a noise level from 0 to 1"),
    (["--generate", "4", "--guidance-interval", "0.7", "0.2"], "LO must not exceed HI"),
    (["--generate", "4", "--temperature", "0"], "must be a positive number"),
    (["--interpolate", "a.png", "b.png", "--steps", "1"], "at least 2"),
    (["--generate", "4", "--prior", "data"], "data needs --data"),
    (["--prior", "normal"], "only --generate uses it; add --generate N"),  # would reconstruct, ignoring it
    (["--generate", "4", "--data", "."], "only --prior data uses it"),  # would draw from the learned prior
])
def test_bad_mode_arguments(trained, args, phrase):
    assert_user_error(run_script("sample_vae.py", "--model", trained["model"], *args), phrase)


@pytest.mark.parametrize("args,phrase", [
    (["--guidance", "2"], "argument --guidance: only --generate uses it; add --generate N"),
    (["--sample-steps", "5", "--latent-map", "."], "argument --sample-steps: only --generate uses it"),
    (["--steps", "5"], "argument --steps: only --interpolate uses it; add --interpolate A B"),
    (["--generate", "4", "--steps", "5"], "argument --steps: only --interpolate uses it"),
    (["--generate", "4", "--prior", "normal", "--guidance", "2"], "--guidance: only the learned prior uses it"),
    (["--generate", "4", "--prior", "data", "--data", ".", "--sample-steps", "9"], "only the learned prior uses it"),
    (["--guidance-interval", "0", "1"], "argument --guidance-interval: only --generate uses it"),
    (["--temperature", "0.8", "--latent-map", "."], "argument --temperature: only --generate uses it"),
    (["--generate", "4", "--prior", "normal", "--guidance-interval", "0", "1"], "only the learned prior uses it"),
])
def test_a_flag_the_chosen_mode_would_ignore_is_an_error(args, phrase, capsys):
    with pytest.raises(SystemExit) as exit:
        sample_vae.parse_args(args)
    assert exit.value.code == 2 and phrase in capsys.readouterr().err


def test_flags_that_their_mode_uses_are_accepted():
    assert sample_vae.parse_args(["--generate", "4", "--guidance", "2", "--sample-steps", "5"]).guidance == 2
    assert sample_vae.parse_args(["--generate", "4", "--prior", "normal", "--temperature", "0.8"]).temperature == 0.8
    assert sample_vae.parse_args(["--generate", "4", "--prior", "learned", "--guidance", "1"]).guidance == 1
    assert sample_vae.parse_args(["--interpolate", "a", "b", "--steps", "5"]).steps == 5
    assert sample_vae.parse_args(["--generate", "4", "--guidance-interval", "0", "1"]).guidance_interval == (0, 1)
    assert sample_vae.parse_args(["--guidance-interval", "0.2", "0.7"]).guidance_interval == (0.2, 0.7)  # the default


def test_latent_map_of_a_folder_without_images(trained, tmp_path):
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "readme.txt").write_text("no images here")
    result = run_script("sample_vae.py", "--model", trained["model"], "--latent-map", tmp_path / "text")
    assert_user_error(result, "0 readable image(s)")
    # Each message names the flag the user gave (the training script's is --data).
    (tmp_path / "empty").mkdir()
    for folder, phrase in ((tmp_path / "empty", "holds no image files"), (tmp_path / "nope", "does not exist")):
        for args in (["--latent-map", folder], ["--generate", 2, "--prior", "data", "--data", folder]):
            message = assert_user_error(run_script("sample_vae.py", "--model", trained["model"], *args), phrase)
            assert f"pass {args[-2]} with" in message or f"pass another {args[-2]}" in message, message


def test_interpolate_with_a_missing_image(trained, image_folder, tmp_path):
    result = run_script("sample_vae.py", "--model", trained["model"], "--interpolate",
                        os.path.join(image_folder, "blob_01.png"), tmp_path / "missing.png")
    message = assert_user_error(result, "missing.png does not exist", "pass --interpolate")
    assert "--image" not in message  # the flag the user gave, not the default mode's


# ------------------------------------------------------------------ images of every mode

def open_rgb_from(image):
    """Save the image to a file in memory and open it the way the scripts do."""
    import io
    buffer = io.BytesIO()
    image.save(buffer, format={"CMYK": "JPEG", "I": "TIFF"}.get(image.mode, "PNG"))
    buffer.seek(0)
    return open_rgb(buffer)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_transparent_pixels_become_white(mode):
    image = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # fully transparent black
    image.paste((200, 30, 30, 255), (5, 5, 15, 15))
    converted = open_rgb_from(image.convert(mode) if mode != "PA" else image.convert("P"))
    assert converted.mode == "RGB"
    assert converted.getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency_becomes_white():
    image = Image.new("P", (10, 10), 0)
    image.putpalette([0, 0, 0, 250, 0, 0] + [0] * 762)
    image.paste(1, (3, 3, 7, 7))
    image.info["transparency"] = 0
    converted = open_rgb_from(image)
    assert converted.getpixel((0, 0)) == (255, 255, 255)
    assert converted.getpixel((5, 5)) == (250, 0, 0)


@pytest.mark.parametrize("mode", ["L", "I;16", "I", "CMYK", "1", "RGB"])
def test_every_mode_loads_as_rgb(mode):
    image = blob_image(0, (24, 16))
    if mode.startswith("I"):  # real 16-bit data spans 0..65535
        image = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257).convert(mode)
    else:
        image = image.convert(mode)
    converted = open_rgb_from(image)
    assert converted.mode == "RGB" and converted.size == (24, 16)
    assert converted.getpixel((0, 0))[0] > 200  # white stays (nearly) white


def test_sixteen_bit_grey_keeps_its_brightness():
    image = Image.new("I;16", (4, 4), 32768)
    assert abs(open_rgb_from(image).getpixel((0, 0))[0] - 128) <= 1


@pytest.mark.parametrize("size", [(16, 16), (4000, 3000), (30, 90)])
def test_to_square_keeps_the_shape_and_pads_white(size):
    square = to_square(Image.new("RGB", size, (0, 0, 0)), 32)
    assert square.size == (32, 32)
    if size[0] != size[1]:
        assert square.getpixel((0, 0)) == (255, 255, 255)  # padding, not stretching
    assert square.getpixel((16, 16)) == (0, 0, 0)


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
