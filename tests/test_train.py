"""train_vae.py end to end, as a subprocess on generated images."""
import json
import os
import signal
import subprocess
import sys
import time

import torch
from PIL import Image

from conftest import ROOT, HF_HOME, assert_user_error, blob_image, make_folder, run_script
from vae_model import load_prior, load_vae


def read_metrics(results):
    with open(os.path.join(results, "metrics.jsonl")) as file:
        return [json.loads(line) for line in file]


def test_training_writes_model_grids_metrics_and_curve(trained):
    results = trained["results"]
    model = load_vae(trained["model"])
    assert model.image_size == 32 and model.config["latent_channels"] == 8
    rows = read_metrics(results)
    assert [row["epoch"] for row in rows] == [1, 2]
    for key in ("train_mse", "train_kl", "val_loss", "val_psnr", "val_kl", "images_per_s", "elapsed_s"):
        assert all(isinstance(row[key], float) for row in rows), key
    for name in ("recon_epoch_001.png", "recon_epoch_002.png", "samples_epoch_002.png", "loss_curve.png"):
        with Image.open(results / name) as image:
            image.verify()
    with Image.open(results / "recon_epoch_002.png") as grid:  # originals above reconstructions
        assert grid.height == 2 * 32 + 3 * 2
    assert "CPU defaults" in trained["stdout"]


def test_scripts_write_only_under_the_paths_their_flags_name(trained):
    assert sorted(os.listdir(trained["work"])) == ["out"]
    assert sorted(os.listdir(trained["work"] / "out")) == ["model.pth", "results"]
    assert not any(name.endswith(".tmp") or ".tmp" in name for name in os.listdir(trained["results"]))


def test_ctrl_c_saves_and_resume_finishes_the_same_epochs(tmp_path, image_folder):
    results = tmp_path / "results"
    args = [sys.executable, os.path.join(ROOT, "train_vae.py"), "--data", image_folder,
            "--epochs", "60", "--image-size", "32", "--batch-size", "4", "--save-every", "100", "--prior-steps", "0",
            "--out", str(tmp_path / "m.pth"), "--results-dir", str(results)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": HF_HOME, "MPLBACKEND": "Agg"}
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (
            (results / "metrics.jsonl").exists() and len(read_metrics(results)) >= 3):
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "--resume" in stderr
    stopped = torch.load(results / "checkpoint.pth", weights_only=True)["epoch"]
    assert 2 <= stopped < 60
    assert not (tmp_path / "m.pth").exists()

    # Flags that would change the run are named and ignored, never silently dropped.
    result = run_script("train_vae.py", "--resume", "--results-dir", results, "--epochs", 5, "--lr", 0.5,
                        "--prior-steps", 0)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ignoring --epochs, --lr" in result.stdout
    assert f"resuming after epoch {stopped} of 60" in result.stdout
    assert [row["epoch"] for row in read_metrics(results)] == list(range(1, 61))
    assert load_vae(tmp_path / "m.pth").image_size == 32


def test_folder_with_odd_images_trains_on_the_rest_and_counts_the_skipped(tmp_path):
    folder = make_folder(tmp_path / "images", count=4)
    (tmp_path / "images" / "broken.png").write_bytes(os.urandom(500))
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    good = tmp_path / "images" / "blob_00.png"
    (tmp_path / "images" / "truncated.png").write_bytes(good.read_bytes()[:150])
    # Every mode a user's folder may hold must load.
    blob_image(1, (40, 30)).convert("RGBA").save(tmp_path / "images" / "rgba.png")
    blob_image(2, (30, 40)).convert("LA").save(tmp_path / "images" / "la.png")
    blob_image(3).convert("P").save(tmp_path / "images" / "palette.png", transparency=0)
    blob_image(4).convert("L").save(tmp_path / "images" / "grey.png")
    blob_image(5).convert("I;16").save(tmp_path / "images" / "grey16.png")
    blob_image(6).convert("CMYK").save(tmp_path / "images" / "cmyk.jpg")
    blob_image(7, (16, 16)).save(tmp_path / "images" / "tiny.png")
    blob_image(8, (4000, 3000)).save(tmp_path / "images" / "huge.jpg")
    result = run_script("train_vae.py", "--data", folder, "--epochs", 1, "--image-size", 32, "--prior-steps", 0,
                        "--out", tmp_path / "m.pth", "--results-dir", tmp_path / "r")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped 2 file(s)" in result.stdout
    assert "11 training and 1 validation images" in result.stdout


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path, image_folder):
    result = run_script("train_vae.py", "--data", image_folder, "--epochs", 3, "--image-size", 32, "--prior-steps", 0,
                        "--lr", "1e30", "--out", tmp_path / "m.pth", "--results-dir", tmp_path / "r")
    assert_user_error(result, "lower --lr", "--kl-weight")
    assert not (tmp_path / "m.pth").exists()


def test_amp_code_path_runs_on_the_cpu(tmp_path, image_folder):
    result = run_script("train_vae.py", "--data", image_folder, "--epochs", 1, "--image-size", 32,
                        "--amp", "on", "--prior-steps", 5, "--prior-width", 8,
                        "--out", tmp_path / "m.pth", "--results-dir", tmp_path / "r")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bfloat16 autocast" in result.stdout
    assert load_vae(tmp_path / "m.pth").image_size == 32
    assert load_prior(tmp_path / "m.pth").config["width"] == 8  # stage two ran under autocast too


def test_amp_auto_follows_the_hardware_check(tmp_path, image_folder):
    import train_vae
    result = run_script("train_vae.py", "--data", image_folder, "--epochs", 1, "--image-size", 32,
                        "--device", "cpu", "--prior-steps", 0, "--out", tmp_path / "m.pth",
                        "--results-dir", tmp_path / "r")
    assert result.returncode == 0, result.stderr[-2000:]
    fast = train_vae.bf16_is_fast(torch.device("cpu"))
    assert ("bfloat16 autocast" in result.stdout.splitlines()[0]) == fast
    # Without a GPU and without --batch-size, the CPU's batch size is the one used.
    assert f"batch {train_vae.CPU_BATCH_SIZE}" in result.stdout.splitlines()[0].split("(")[0]


def test_augmentation_flips_rotates_and_keeps_uint8():
    import train_vae
    torch.manual_seed(0)
    batch = torch.full((4, 3, 32, 32), 255, dtype=torch.uint8)
    batch[:, :, :, :8] = 0  # a black stripe on the left edge of every image
    left_dark, right_dark, rotated = 0, 0, 0
    for _ in range(40):
        out = train_vae.make_augment()(batch)
        assert out.dtype == torch.uint8 and out.shape == batch.shape
        left_dark += int(out[0, :, 12:20, :4].float().mean() < 128)
        right_dark += int(out[0, :, 12:20, -4:].float().mean() < 128)
        # A rotation tilts the stripe's edge: its top and bottom rows then differ.
        rotated += int((out[0, 0, 2] < 128).sum() != (out[0, 0, -3] < 128).sum())
    assert left_dark > 5 and right_dark > 5 and left_dark + right_dark == 40
    assert rotated > 20


def test_metrics_and_pictures_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    import train_vae
    train_vae.write_metrics([{"epoch": 1, "val_psnr": 20.0}], tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_vae.json, "dumps", crash)  # dies halfway through the rewrite
    try:
        train_vae.write_metrics([{"epoch": 1}, {"epoch": 2}], tmp_path)
    except KeyboardInterrupt:
        pass
    assert (tmp_path / "metrics.jsonl").read_text() == before
    monkeypatch.undo()

    picture = tmp_path / "grid.png"
    train_vae.save_png(torch.zeros(1, 3, 8, 8), picture)
    good = picture.read_bytes()
    import torchvision.utils
    monkeypatch.setattr(torchvision.utils, "save_image", crash)
    try:
        train_vae.save_png(torch.ones(1, 3, 8, 8), picture)
    except KeyboardInterrupt:
        pass
    assert picture.read_bytes() == good
