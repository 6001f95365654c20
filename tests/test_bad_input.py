"""Every mistake a user can make ends with one clear sentence, exit status 2, no traceback and
no file changed: each script run as a user runs it. (A module's own errors are unit-tested
beside it; here is what a user meets.)"""
import io
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import sample_vae
from conftest import assert_user_error, make_folder, run_script
from vae_model import VAE, load_vae, vae_checkpoint


# ------------------------------------------------------------------ train_vae.py

def test_data_folder_missing(tmp_path):
    assert_user_error(run_script("train_vae.py", "--data", tmp_path / "nope"), "does not exist", "--data")


def test_data_is_a_file(tmp_path):
    (tmp_path / "one.png").write_bytes(b"")
    assert_user_error(run_script("train_vae.py", "--data", tmp_path / "one.png"), "is a file", "folder of images")


def test_data_folder_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(run_script("train_vae.py", "--data", tmp_path / "empty"), "no image files")


@pytest.mark.parametrize("readable", [0, 1])
def test_data_folder_without_two_readable_images(tmp_path, readable):
    folder = tmp_path / "bad"
    make_folder(folder, count=readable)
    for i in range(3):
        (folder / f"x{i}.png").write_bytes(os.urandom(300))
    result = run_script("train_vae.py", "--data", folder, "--results-dir", tmp_path / "r",
                        "--cache-dir", tmp_path / "cache")
    assert_user_error(result, f"holds {readable} readable image(s) and at least 2 are needed")
    assert f"decoding {3 + readable} files once" in result.stdout
    # No results folder for a run that never started, and no cache of a folder it cannot use.
    assert sorted(os.listdir(tmp_path)) == ["bad", "cache"] and os.listdir(tmp_path / "cache") == []


def test_hub_unreachable_fails_fast(tmp_path):
    result = run_script("train_vae.py", "--data", "someone/some-dataset", "--results-dir", tmp_path / "r",
                        env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}, timeout=60)
    assert_user_error(result, "someone/some-dataset is no folder here, and the Hugging Face Hub",
                      "cannot be reached", "check the path given to --data")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag, kind, said", [
    ("--image", "folder", "is a folder, not an image; pass --image with the path of an image file"),
    ("--model", "folder", "is a folder, not a checkpoint file; pass --model with a checkpoint"),
    ("--latent-map", "file", "is a file, not a folder; pass --latent-map with a folder of images")])
def test_a_path_of_the_wrong_kind_is_named_as_what_it_is(trained, image_folder, tmp_path, flag, kind, said):
    path = image_folder if kind == "folder" else os.path.join(image_folder, "blob_00.png")
    model = () if flag == "--model" else ("--model", trained["model"])
    result = run_script("sample_vae.py", *model, flag, path, "--no-show", "--out", tmp_path / "x.png")
    assert_user_error(result, f"{path} {said}")


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
    ("--device", "tpu", "'tpu' is not one these scripts run on; use --device auto, cpu, cuda"),
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


@pytest.mark.parametrize("flag,value,phrase", [
    ("--prior-steps", "-1", "zero or a positive"), ("--prior-width", "20", "multiple of 8"),
    ("--prior-lr", "0", "positive"),
    ("--prior-guide-steps", "-1", "zero or a positive"), ("--prior-guide-width", "12", "multiple of 8"),
])
def test_bad_prior_flags(tmp_path, flag, value, phrase):
    assert_user_error(run_script("train_vae.py", flag, value, "--results-dir", tmp_path / "r"), phrase)


def test_a_diverging_run_says_what_to_do(tmp_path, image_folder):
    result = run_script("train_vae.py", "--data", image_folder, "--epochs", 3, "--image-size", 32, "--prior-steps", 0,
                        "--device", "cpu", "--lr", "1e30", "--out", tmp_path / "m.pth", "--results-dir", tmp_path / "r")
    assert_user_error(result, "lower --lr", "--kl-weight")
    assert not (tmp_path / "m.pth").exists()


def only_these_files(folder, *names):
    return sorted(os.listdir(folder)) == sorted(names)


def test_bad_input_creates_no_file(tmp_path):
    (tmp_path / "empty").mkdir()
    for data in (tmp_path / "nope", tmp_path / "empty"):
        result = run_script("train_vae.py", "--data", data, "--results-dir", tmp_path / "r",
                            "--out", tmp_path / "m.pth", cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
    assert only_these_files(tmp_path, "empty")


def test_a_cache_dir_that_is_a_file_is_one_sentence(tmp_path, image_folder):
    (tmp_path / "file").write_text("not a folder")
    result = run_script("train_vae.py", "--data", image_folder, "--image-size", 32, "--epochs", 1,
                        "--prior-steps", 0, "--device", "cpu", "--cache-dir", tmp_path / "file" / "cache",
                        "--results-dir", tmp_path / "r", "--out", tmp_path / "m.pth")
    assert_user_error(result, "cannot write the image cache", "--cache-dir")
    assert sorted(os.listdir(tmp_path)) == ["file"]


# ------------------------------------------------------------------ sample_vae.py

def test_model_missing(tmp_path):
    result = run_script("sample_vae.py", "--model", tmp_path / "none.pth", "--no-show")
    assert_user_error(result, "no trained model", "train_vae.py")


@pytest.mark.parametrize("mode", [[], ["--generate", "2"], ["--latent-map", "."]])
def test_an_out_that_cannot_be_written(trained, tmp_path, mode):
    (tmp_path / "file").write_text("a file, not a folder")
    result = run_script("sample_vae.py", "--model", trained["model"], *mode, "--out", tmp_path / "file" / "x.png")
    assert_user_error(result, "cannot write to the folder", "--out")


@pytest.mark.parametrize("mode, out, allowed", [
    ([], "x.tif", ".png, .jpg, .jpeg"), (["--generate", "2"], "grid.webp", ".png, .jpg, .jpeg"),
    (["--latent-map", "."], "map", ".png, .jpg, .jpeg"), (["--interpolate", "a.png", "b.png"], "walk.mp4", ".png, .jpg, .jpeg, .gif")])
def test_an_out_whose_suffix_this_mode_cannot_write_is_refused_before_any_work(tmp_path, mode, out, allowed):
    """Refused before the model is loaded: a model that is not there is not even looked for."""
    result = run_script("sample_vae.py", "--model", tmp_path / "none.pth", *mode, "--out", tmp_path / out)
    assert_user_error(result, f"this mode writes {allowed} files", "pass --out with a name that ends in one")
    assert not (tmp_path / out).exists()


def cut_short():
    """The first half of a checkpoint, as a crash while copying it leaves it."""
    buffer = io.BytesIO()
    torch.save(vae_checkpoint(VAE(32, 4, channels=(8, 8, 8))), buffer)
    return buffer.getvalue()[:len(buffer.getvalue()) // 2]


@pytest.mark.parametrize("content, what", [
    (b"", "the file is empty"), (os.urandom(2000), "it is not a file that torch.save wrote"),
    (b"hello, I am a text file\n", "it is not a file that torch.save wrote"), (cut_short(), "it is cut short or damaged")])
def test_model_file_is_not_a_checkpoint(tmp_path, content, what):
    """The message says in words what is wrong with the file, not an exception's name."""
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    result = run_script("sample_vae.py", "--model", path, "--no-show")
    assert_user_error(result, f"is not a readable PyTorch checkpoint: {what}; pass --model")
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
    subprocess.run([sys.executable, str(tmp_path / "make.py")], check=True)
    result = run_script("sample_vae.py", "--model", tmp_path / "evil.pth", "--no-show")
    assert_user_error(result, "not a readable PyTorch checkpoint: it holds pickled code")
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


@pytest.fixture
def model_without_prior(trained, tmp_path):
    path = tmp_path / "old.pth"
    torch.save(vae_checkpoint(load_vae(trained["model"])), path)
    return path


def test_asking_for_a_learned_prior_that_is_not_there(model_without_prior, tmp_path):
    result = run_script("sample_vae.py", "--model", model_without_prior, "--generate", 3,
                        "--prior", "learned", "--out", tmp_path / "a.png")
    assert_user_error(result, "no learned prior", "--prior normal")
    assert not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("part", ["prior", "guide"])
def test_prior_that_does_not_fit_its_config(trained, tmp_path, part):
    checkpoint = torch.load(trained["model"], weights_only=True)
    checkpoint[part]["config"]["width"] = 24
    torch.save(checkpoint, tmp_path / "bad.pth")
    result = run_script("sample_vae.py", "--model", tmp_path / "bad.pth", "--generate", 2)
    assert_user_error(result, f"{part} that does not fit its own config")


@pytest.mark.parametrize("flags, said", [
    (("--batch-size", "12"), "--batch-size 12 is more than the 11 training images there are; pass --batch-size 11"),
    (("--val-fraction", "0.95"), "--batch-size 2 is more than the 1 training images there are")])
def test_a_batch_larger_than_the_training_images_is_refused(image_folder, tmp_path, flags, said):
    """12 images, 1 held out: 11 to train on; at --val-fraction 0.95, 11 held out and 1 left."""
    result = run_script("train_vae.py", "--data", image_folder, "--image-size", 32, "--epochs", 2, "--device", "cpu",
                        "--prior-steps", 0, "--cache-dir", tmp_path / "cache", "--results-dir", tmp_path / "r",
                        *flags)
    assert_user_error(result, said, "or add images")
    assert not (tmp_path / "r").exists()


def test_a_run_of_few_steps_is_told_so_and_trains(image_folder, tmp_path):
    result = run_script("train_vae.py", "--data", image_folder, "--image-size", 32, "--epochs", 2, "--batch-size", 4,
                        "--device", "cpu", "--prior-steps", 0, "--results-dir", tmp_path / "r", "--out", tmp_path / "m.pth")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "note: 6 optimizer steps in all (3 an epoch), fewer than 100: too few to learn much" in result.stdout


def test_an_image_over_the_pixel_limit_is_named_with_its_size_when_skipped_and_refused(trained, tmp_path):
    """A 14000 x 14000 PNG of one colour (Pillow writes it in about a second): known from its
    header, never decoded, and no raw Pillow warning."""
    folder = make_folder(tmp_path / "images", count=3)
    big = os.path.join(folder, "big.png")
    Image.new("RGB", (14000, 14000), (255, 255, 255)).save(big)
    result = run_script("sample_vae.py", "--model", trained["model"], "--image", big, "--no-show",
                        "--out", tmp_path / "x.png")
    assert_user_error(result, f"{big} is too large: 14000 x 14000 px, over the limit of 100 megapixels",
                      "pass a smaller image")
    result = run_script("sample_vae.py", "--model", trained["model"], "--latent-map", folder, "--no-show",
                        "--cache-dir", tmp_path / "cache", "--out", tmp_path / "map.png")
    assert result.returncode == 0, result.stderr[-2000:]
    said = f"skipped 1 file(s): 1 over the limit of 100 megapixels: {big} (14000 x 14000 px)"
    assert said in result.stdout and "DecompressionBomb" not in result.stdout + result.stderr
    assert "decoding 4 files once" in result.stdout
    again = run_script("sample_vae.py", "--model", trained["model"], "--latent-map", folder, "--no-show",
                       "--cache-dir", tmp_path / "cache", "--out", tmp_path / "map.png")
    assert "decoding" not in again.stdout and said in again.stdout  # named from the cache too


@pytest.mark.parametrize("patch, where", [("cpu-out-of-memory", "machine"), ("gpu-out-of-memory", "GPU")])
def test_out_of_memory_is_one_sentence_naming_the_size_and_the_batch(image_folder, tmp_path, patch, where):
    """The CPU's allocator failing (as under ulimit -v) or a CUDA GPU's, in a plain run."""
    env = {"PATCH": patch}
    result = run_script(os.path.join("tests", "patched_run.py"), "--data", image_folder, "--image-size", 32,
                        "--epochs", 3, "--batch-size", 4, "--device", "cpu", "--prior-steps", 0,
                        "--results-dir", tmp_path / "r", "--out", tmp_path / "m.pth", env=env)
    assert_user_error(result, f"the {where} ran out of memory training at 32 px, batch 4",
                      "pass a smaller --batch-size or --image-size")
