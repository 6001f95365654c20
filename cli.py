"""What the command lines of train_vae.py and sample_vae.py share: the one-sentence error a user
can fix, checked flag values, the device and its precision, writable outputs, a clean stop."""
import argparse
import contextlib
import math
import os
import signal
import socket
import sys
import tempfile

import torch


class UserError(Exception):
    """A mistake the user can fix: run_main prints it as one sentence and exits with status 2."""


def counted(n, noun):
    return f"{n} {noun}" + ("" if n == 1 else "s")  # 1 epoch, 2 epochs


def run_main(main):
    """sys.exit(main()); a UserError ends in one sentence and status 2, Ctrl-C in status 130."""
    try:
        sys.exit(main())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # every save is atomic, so there is nothing to clean up
        print("\ninterrupted; every file written so far is whole", file=sys.stderr)
        sys.exit(130)


class Stop:
    """True once Ctrl-C or SIGTERM came: the work under way ends, is saved, and the run stops.
    The first look at it after the signal says so: the handler itself prints nothing, since a
    print may be under way (tqdm's) when the signal comes, and print is not re-entrant."""

    def __init__(self):
        self.signals, self.said = [], False

    def __bool__(self):
        if self.signals and not self.said:
            self.said = True
            name = "Ctrl-C" if self.signals[0] == signal.SIGINT else "SIGTERM"
            print(f"\n{name}: saving the work under way, then stopping (again: stop at once)",
                  file=sys.stderr)
        return bool(self.signals)


def stop_on_signals():
    """A Stop set by Ctrl-C or SIGTERM (Slurm, Kubernetes, kill, torchrun); a second one stops
    at once."""
    stop = Stop()

    def on_stop(signum, frame):
        stop.signals.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_stop)
    return stop


# --- Checked flag types: argparse answers a bad value with the rule it broke ------------------
class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help gives every flag's default, but None: there the help text itself says what it is."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose error is said by one process: torchrun starts every process
    with the same flags, so all meet the same mistake."""

    def error(self, message):
        if os.environ.get("RANK", "0") != "0":
            sys.exit(2)
        super().error(message)


def typed_flags(parser, argv=None):
    """The names (dests) of the flags typed in argv: argparse fills in a default only for a name
    the namespace it is given does not have yet."""
    unset = object()
    names = vars(parser.parse_args([] if argv is None else argv))
    typed = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(names, unset)))
    return {name for name, value in vars(typed).items() if value is not unset}


def checked(kind, ok, rule):
    """An argparse type: convert the text with `kind`, then insist on `ok(value)`."""
    def parse(text):
        try:
            value = kind(text)
            if ok(value):
                return value
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
    return parse


positive_int = checked(int, lambda v: v > 0, "a positive whole number")
positive_float = checked(float, lambda v: v > 0, "a positive number")
steps_or_0 = checked(int, lambda v: v >= 0, "zero or a positive whole number")
fraction = checked(float, lambda v: 0 < v < 1, "a number between 0 and 1")
zero_or_positive = checked(float, lambda v: v >= 0, "zero or positive")
angle = checked(float, lambda v: 0 <= v <= 180, "an angle from 0 to 180 degrees")
unet_width = checked(int, lambda v: v >= 8 and v % 8 == 0, "a multiple of 8, like 64")
multiple_of_8 = checked(int, lambda v: v > 0 and v % 8 == 0,
                        "a positive multiple of 8 (the encoder halves the image three times)")
channel_list = checked(lambda text: [int(w) for w in text.split(",")],
                       lambda ws: len(ws) == 3 and all(w >= 4 and w % 4 == 0 for w in ws),
                       "three comma-separated multiples of 4, like 32,64,128")


# --- The device, its fast precision, and the outputs checked before any long work ------------
def pick_device(name):
    """The torch.device for --device: "auto" takes a CUDA GPU, then an Apple GPU, then the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else
                            "mps" if torch.backends.mps.is_available() else "cpu")
    if name.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise UserError(f"the device {name!r} is not one these scripts run on; use --device auto, "
                        "cpu, cuda (cuda:1 for the second GPU) or mps")
    try:
        torch.empty(1, device=name)  # the one sure test that the device exists here
    except (RuntimeError, AssertionError) as error:  # a bad name, or no such device or driver
        raise UserError(f"the device {name!r} is not available here ({str(error).splitlines()[0]}"
                        "); use --device auto to pick the best one") from error
    return torch.device(name)


def bf16_is_fast(device):
    """Whether bfloat16 is native: a GPU of compute capability 8.0+, a CPU with AMX or AVX-512."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    names = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's, looked up
    return device.type == "cpu" and any(getattr(torch.cpu, name, lambda: False)() for name in names)


FEW_STEPS = 100  # optimizer steps below which a run is told it will hardly learn


def check_batch(batch_size, images, processes=1):
    """A batch larger than the training images (each process's share of them) would make every
    epoch one short step, which looks like a run that does not learn."""
    share = math.ceil(images / processes)
    if batch_size > share:
        whose = "each process has" if processes > 1 else "there are"
        raise UserError(f"--batch-size {batch_size} is more than the {share} training images "
                        f"{whose}; pass --batch-size {share} or less, or add images")


def say_few_steps(steps, epochs):
    """Tiny runs are how people try things: too few steps to learn are said, never refused."""
    if steps < FEW_STEPS:
        print(f"note: {counted(steps, 'optimizer step')} in all ({steps // epochs} an epoch), "
              f"fewer than {FEW_STEPS}: too few to learn much; give more epochs or images, or a "
              "smaller --batch-size")


def out_of_memory(error, args):
    """A UserError for an error that says the machine ran out of memory (the CPU's allocator,
    or a CUDA GPU's), naming the size and batch that did not fit; else None."""
    text = str(error)
    cpu = isinstance(error, RuntimeError) and ("can't allocate memory" in text
                                               or "not enough memory" in text)
    if not (cpu or isinstance(error, torch.cuda.OutOfMemoryError)):
        return None
    where = "GPU" if isinstance(error, torch.cuda.OutOfMemoryError) else "machine"
    size, batch = getattr(args, "image_size", None), getattr(args, "batch_size", None)
    return UserError(f"the {where} ran out of memory training at {size} px, batch {batch}; "
                     "pass a smaller --batch-size or --image-size")


def check_writable(path, flag):
    """Say now, not after an hour of training, that `path` cannot be written."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; pass {flag} with the path of a file")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    try:  # an unnamed temporary file in the nearest existing folder proves it, leaving nothing
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise UserError(f"cannot write to the folder {folder} ({error.strerror}); pass {flag} "
                        "with a path in a folder you can write to") from error


# --- One run per results folder ----------------------------------------------------------------
LOCK_NAME = ".lock"  # in a results folder: "host pid" of the run writing there


@contextlib.contextmanager
def folder_lock(folder, flag, hold=True):
    """Hold `folder` for this process within the `with`: a second run writing there would mix its
    files with this one's. A lock left by a process that died on this machine is taken over;
    one from another machine is honoured, since its process cannot be checked from here.
    hold=False (under torchrun, the processes other than rank 0) holds nothing."""
    if not hold:
        yield None
        return
    path, me = os.path.join(folder, LOCK_NAME), f"{socket.gethostname()} {os.getpid()}"
    made = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    while True:
        try:
            with open(path, "x") as file:
                file.write(me + "\n")
            break
        except FileExistsError:
            holder = read_lock(path)
        if holder is None:  # released while we looked
            continue
        host, pid = holder
        if host != socket.gethostname():
            raise UserError(f"{folder} is in use by a training run on {host} (process {pid}); "
                            f"if it has ended, delete {path}, or pass {flag} with another folder")
        if is_alive(pid):
            raise UserError(f"{folder} is in use by a training run (process {pid} on this "
                            f"machine); wait for it to end or pass {flag} with another folder")
        if read_lock(path) == holder:  # the dead process's lock, still: taken over
            os.remove(path)
    try:
        yield path
    finally:
        unlock_folder(folder, path, me, made)


def read_lock(path):
    """(host, pid) of the lock at path, or None if it is gone."""
    try:
        with open(path) as file:
            host, pid = file.read().split()
    except FileNotFoundError:
        return None
    except ValueError:  # cut short: the process died while writing it
        return socket.gethostname(), 0
    return host, int(pid)


def is_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: whether the process exists, sending nothing
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return pid > 0


def unlock_folder(folder, path, me, made):
    """Remove this process's lock, and the folder if the run made it and left nothing in it."""
    try:
        with open(path) as file:
            mine = file.read().strip() == me
        if mine:
            os.remove(path)
        if made:
            os.rmdir(folder)  # only if empty: a bad input leaves no folder behind
    except OSError:
        pass
