"""explore_vae.py: the page's functions through gradio_client against a launched server, the
atlas it starts from, its flags; and one test in a real headless Chromium."""
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import explore_vae
import image_data
import train_vae
import vae_api
from cli import UserError
from conftest import HF_HOME, ROOT, assert_user_error, run_script


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args):
    """python explore_vae.py *args on a free port; (process, its URL) once it serves."""
    port = free_port()
    env = {**os.environ, "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1", "HF_HOME": HF_HOME}
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "explore_vae.py"), *map(str, args),
                                "--port", str(port), "--device", "cpu"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        found = re.search(r"Running on local URL:\s+(\S+)", line)
        if found:
            return process, found.group(1).rstrip("/") + "/"
    raise AssertionError("".join(lines))


@pytest.fixture(scope="module")
def server(trained):
    process, url = launch("--model", trained["model"])
    yield url
    process.terminate()
    process.wait(30)


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client
    return Client(server, verbose=False)


def pixels(path):
    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB")).astype(int)


def test_it_serves_on_this_machine_only_unless_told(server):
    assert server.startswith("http://127.0.0.1:")


def test_reconstruct_gives_the_picture_its_reconstruction_channels_and_psnr(client, trained, image_folder):
    from gradio_client import handle_file
    image = os.path.join(image_folder, "blob_03.png")
    original, again, channels, line = client.predict(handle_file(image), api_name="/reconstruct")
    model = vae_api.load(trained["model"])
    x = vae_api.to_input(model, image)
    with torch.no_grad():
        recon = model.vae.decode(model.vae.encode(x)[0])
    from vae_model import psnr
    assert line == f"reconstruction PSNR {psnr(recon, x):.2f} dB"
    shown = np.asarray(vae_api.pictures(recon)[0].resize((256, 256), Image.Resampling.NEAREST)).astype(int)
    assert np.abs(pixels(again) - shown).max() <= 1
    assert pixels(original).shape == (256, 256, 3) and pixels(channels).shape[1] > pixels(channels).shape[0]


def test_a_bad_upload_is_one_sentence_on_the_page(client, tmp_path):
    from gradio_client import handle_file
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 10)
    with pytest.raises(Exception, match="that file is not a readable image .* upload a PNG or JPEG"):
        client.predict(handle_file(str(broken)), api_name="/reconstruct")


def test_walking_moves_the_picture_along_the_principal_directions(client, trained):
    model = vae_api.load(trained["model"])
    atlas = torch.load(trained["model"], weights_only=True)["atlas"]
    still = client.predict(2, 0, 0, 0, 0, api_name="/walk")
    expected = vae_api.decode(model, atlas["starts"][2:3])[0].resize((256, 256), Image.Resampling.NEAREST)
    assert np.abs(pixels(still) - np.asarray(expected).astype(int)).max() <= 1
    moved = client.predict(2, 2.5, 0, 0, 0, api_name="/walk")
    z = atlas["starts"][2:3] + 2.5 * atlas["spread"][0] * atlas["directions"][0]
    expected = vae_api.decode(model, z)[0].resize((256, 256), Image.Resampling.NEAREST)
    assert np.abs(pixels(moved) - np.asarray(expected).astype(int)).max() <= 1
    assert np.abs(pixels(moved) - pixels(still)).mean() > 1


def test_interpolate_and_generate(client, trained):
    model = vae_api.load(trained["model"])
    atlas = torch.load(trained["model"], weights_only=True)["atlas"]
    at_a = client.predict(4, 7, 0.0, api_name="/interpolate")
    expected = vae_api.decode(model, atlas["starts"][4:5])[0].resize((256, 256), Image.Resampling.NEAREST)
    assert np.abs(pixels(at_a) - np.asarray(expected).astype(int)).max() <= 1
    first, again = (client.predict(3, 1.5, api_name="/generate") for _ in range(2))
    assert len(first) == explore_vae.GALLERY
    assert all(np.array_equal(pixels(a["image"]), pixels(b["image"])) for a, b in zip(first, again))


def test_the_atlas_comes_from_the_model_or_data_or_the_prior(trained, image_folder, tmp_path, capsys):
    """Training stores it; a model without one takes it from --data, or from its prior's samples."""
    checkpoint = torch.load(trained["model"], weights_only=True)
    stored = checkpoint["atlas"]
    assert stored["directions"].shape == (vae_api.ATLAS_DIRECTIONS, *stored["mean"].shape)
    train_rows, _ = image_data.split(12, train_vae.VAL_FRACTION, train_vae.SEED)
    assert stored["starts"].shape[0] == len(train_rows)  # all training images: fewer than 32
    sizes = sum(t.numel() * t.element_size() for t in stored.values())
    assert sizes < 500_000
    del checkpoint["atlas"]
    torch.save(checkpoint, tmp_path / "old.pth")
    _, from_data = explore_vae.load_explorer(str(tmp_path / "old.pth"), image_folder, "cpu", tmp_path / "cache")
    assert from_data["starts"].shape[0] == 12  # every image of the folder
    _, from_prior = explore_vae.load_explorer(str(tmp_path / "old.pth"), None, "cpu")
    assert "holds no atlas" in capsys.readouterr().out and len(from_prior["starts"]) == 32
    del checkpoint["prior"], checkpoint["guide"]
    torch.save(checkpoint, tmp_path / "older.pth")
    with pytest.raises(UserError, match="neither an atlas .* nor a prior; pass --data"):
        explore_vae.load_explorer(str(tmp_path / "older.pth"), None, "cpu")


def test_its_flags_and_a_missing_model_are_one_sentence(tmp_path):
    assert_user_error(run_script("explore_vae.py", "--model", tmp_path / "none.pth"), "no trained model")
    assert_user_error(run_script("explore_vae.py", "--model", tmp_path), "is a folder, not a checkpoint file")
    result = run_script("explore_vae.py", "--port", 0)
    assert result.returncode == 2 and "--port: must be a port from 1 to 65535" in result.stderr


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="no chromium here (Debian: apt-get install chromium)")
def test_in_a_real_browser_a_slider_changes_the_picture_and_nothing_leaves_the_machine(server):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    outside = []
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page()
        page.on("request", lambda request: outside.append(request.url)
                if not request.url.startswith((server, "data:", "blob:")) else None)
        page.goto(server)
        page.get_by_role("tab", name="Walk the latent").click()
        picture = page.locator("img[src*='gradio_api/file=']:visible")  # the walk's only picture
        picture.wait_for(timeout=60000)
        before = picture.get_attribute("src")
        slider = page.get_by_role("slider").first  # direction 1
        slider.focus()
        for _ in range(10):
            slider.press("ArrowRight")
        deadline = time.time() + 30
        while picture.get_attribute("src") == before and time.time() < deadline:
            page.wait_for_timeout(200)
        assert picture.get_attribute("src") != before
        browser.close()
    assert outside == []
