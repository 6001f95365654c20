"""Every mistake a user can make ends with one clear sentence, exit status 2, no traceback."""
import os

import pytest
import torch

from conftest import assert_user_error, make_folder, run_script
from vae_model import VAE, vae_checkpoint


# ------------------------------------------------------------------ train_vae.py

def test_data_folder_missing(tmp_path):
    assert_user_error(run_script("train_vae.py", "--data", tmp_path / "nope"), "does not exist", "--data")


def test_data_is_a_file(tmp_path):
    (tmp_path / "one.png").write_bytes(b"")
    assert_user_error(run_script("train_vae.py", "--data", tmp_path / "one.png"), "is a file", "folder of images")


def test_data_folder_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(run_script("train_vae.py", "--data", tmp_path / "empty"), "no image files")


def test_data_folder_without_readable_images(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(3):
        (folder / f"x{i}.png").write_bytes(os.urandom(300))
    result = run_script("train_vae.py", "--data", folder, "--results-dir", tmp_path / "r")
    assert_user_error(result, "0 readable image")
    assert sorted(os.listdir(tmp_path)) == ["bad"]  # no results folder for a run that never started


def test_hub_unreachable_fails_fast(tmp_path):
    result = run_script("train_vae.py", "--data", "someone/some-dataset", "--results-dir", tmp_path / "r",
                        env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}, timeout=60)
    assert_user_error(result, "cannot reach the Hugging Face Hub", "--data")
    assert not (tmp_path / "r").exists()


def test_hub_data_set_that_does_not_exist(tmp_path):
    """A Hub that answers 404 (a server on this machine standing in for it)."""
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()
        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = run_script("train_vae.py", "--data", "someone/no-such-dataset", "--results-dir", tmp_path / "r",
                            env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}"},
                            timeout=120)
    finally:
        server.shutdown()
    assert_user_error(result, "could not load the Hub data set", "--data")


@pytest.mark.parametrize("flag,value,phrase", [
    ("--channels", "32,64", "three comma-separated"), ("--val-fraction", "1.5", "between 0 and 1"),
    ("--image-size", "100", "multiple of 8"), ("--image-size", "0", "positive"),
    ("--epochs", "0", "positive"), ("--epochs", "ten", "positive whole number"),
    ("--batch-size", "-4", "positive"), ("--lr", "0", "positive"), ("--kl-weight", "-1", "zero or positive"),
    ("--rotation", "360", "0 to 180 degrees"), ("--warmup", "1", "between 0 and 1"),
    ("--device", "cuda:7", "not available"), ("--fit", "stretch", "invalid choice"),
])
def test_bad_flag_values(tmp_path, flag, value, phrase):
    if flag == "--device" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that device")
    assert_user_error(run_script("train_vae.py", flag, value, "--results-dir", tmp_path / "r"), phrase)


def test_resume_without_checkpoint(tmp_path):
    result = run_script("train_vae.py", "--resume", "--results-dir", tmp_path / "r")
    assert_user_error(result, "no resumable checkpoint")


@pytest.mark.parametrize("flag, where, phrase", [
    ("--out", "file/m.pth", "cannot write to the folder"),  # a folder that is a file
    ("--out", "folder", "is a folder"),
    ("--results-dir", "file", "cannot write to the folder"),
])
def test_an_output_that_cannot_be_written_is_said_before_training(tmp_path, image_folder, flag, where, phrase):
    (tmp_path / "file").write_text("a file, not a folder")
    (tmp_path / "folder").mkdir()
    # --out in a new folder: it must not be created when --results-dir is the wrong one.
    paths = {"--out": tmp_path / "new" / "m.pth", "--results-dir": tmp_path / "r", flag: tmp_path / where}
    result = run_script("train_vae.py", "--data", image_folder, "--epochs", 1, "--image-size", 32,
                        "--prior-steps", 0, "--device", "cpu", *[str(x) for pair in paths.items() for x in pair])
    assert_user_error(result, phrase, flag)
    assert "train mse" not in result.stdout and sorted(os.listdir(tmp_path)) == ["file", "folder"]


# ------------------------------------------------------------------ sample_vae.py

def test_model_missing(tmp_path):
    result = run_script("sample_vae.py", "--model", tmp_path / "none.pth", "--no-show")
    assert_user_error(result, "no trained model", "train_vae.py")


@pytest.mark.parametrize("mode", [[], ["--generate", "2"], ["--latent-map", "."]])
def test_an_out_that_cannot_be_written(trained, tmp_path, mode):
    (tmp_path / "file").write_text("a file, not a folder")
    result = run_script("sample_vae.py", "--model", trained["model"], *mode, "--out", tmp_path / "file" / "x.png")
    assert_user_error(result, "cannot write to the folder", "--out")


@pytest.mark.parametrize("content", [b"", os.urandom(2000), b"hello, I am a text file\n"])
def test_model_file_is_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    result = run_script("sample_vae.py", "--model", path, "--no-show")
    assert_user_error(result, "not a readable PyTorch checkpoint")
    assert path.read_bytes() == content  # left as it was


def test_foreign_torch_file(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pth")
    assert_user_error(run_script("sample_vae.py", "--model", tmp_path / "other.pth", "--no-show"),
                      "not a checkpoint of this VAE")


def test_weights_do_not_fit_config(tmp_path):
    checkpoint = vae_checkpoint(VAE(32, 4, channels=(8, 8, 8)))
    checkpoint["config"]["latent_channels"] = 8
    torch.save(checkpoint, tmp_path / "mismatch.pth")
    result = run_script("sample_vae.py", "--model", tmp_path / "mismatch.pth", "--no-show")
    assert_user_error(result, "do not fit its own config")


def test_pickled_code_in_model_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    source = ("import os, torch\n"
              "class E:\n"
              f"    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
              f"torch.save({{'config': {{}}, 'model': E()}}, r'{tmp_path / 'evil.pth'}')\n")
    (tmp_path / "make.py").write_text(source)
    import subprocess, sys
    subprocess.run([sys.executable, str(tmp_path / "make.py")], check=True)
    result = run_script("sample_vae.py", "--model", tmp_path / "evil.pth", "--no-show")
    assert_user_error(result, "not a readable PyTorch checkpoint")
    assert not marker.exists()


def test_image_missing(trained, tmp_path):
    result = run_script("sample_vae.py", "--model", trained["model"], "--image", tmp_path / "no.png", "--no-show")
    assert_user_error(result, "does not exist", "--image")


@pytest.mark.parametrize("kind", ["text", "truncated"])
def test_image_unreadable(trained, tmp_path, kind):
    path = tmp_path / "bad.png"
    if kind == "text":
        path.write_text("not a picture")
    else:
        folder = make_folder(tmp_path / "ok", count=1)
        path.write_bytes(open(os.path.join(folder, "blob_00.png"), "rb").read()[:120])
    result = run_script("sample_vae.py", "--model", trained["model"], "--image", path, "--no-show",
                        "--out", tmp_path / "fig.png")
    assert_user_error(result, "not a readable image")
    assert not (tmp_path / "fig.png").exists()
