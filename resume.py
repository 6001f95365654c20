"""Resuming a training run: what its checkpoint holds, so that it goes on exactly as if never
stopped (every process's random state included), and which settings a resumed run takes.

    python train_vae.py --resume                  # on from vae_results/checkpoint.pth
    python train_vae.py --resume --data /scratch/pokemon --device cuda   # elsewhere, same images
"""
import argparse
import shlex
import sys

import distributed
from cli import UserError
from distributed import MASTER, RANK, WORLD_SIZE
from vae_model import CheckpointError, load_checkpoint, vae_checkpoint


def training_checkpoint(model, optimizer, scheduler, scaler, shuffle, rng_states, epoch,
                        metrics, args):
    """Everything that changes during training (rank 0's model, optimizer, schedule, loss
    scale, shuffling; every rank's random state), and the run's settings."""
    return {**vae_checkpoint(model), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "shuffle_state": shuffle.get_state(), "rng_states": rng_states, "epoch": epoch,
            "metrics": metrics, "world_size": WORLD_SIZE, "args": vars(args)}


# Where and how a resumed run goes on may change; what it trains may not. Its prior may: new prior
# flags train the prior again. The others keep the run's values unless typed.
FROM_COMMAND_LINE = ("device", "results_dir", "cache_dir", "resume")
TYPED_OR_THE_RUNS = ("out", "data")


def resume_settings(args, typed, checkpoint_path):
    """(settings, checkpoint) to resume: the run's, with what may change taken from the flags
    typed (`typed`, their names); a typed value that differs where nothing may is refused."""
    checkpoint = None
    if MASTER:
        checkpoint = resumable(checkpoint_path)
    checkpoint = distributed.from_rank0(checkpoint)
    if checkpoint is None:
        raise UserError(f"there is no resumable checkpoint at {checkpoint_path}; "
                        "start a new run without --resume")
    if checkpoint.get("world_size", 1) != WORLD_SIZE:  # each process's share and random draws
        raise UserError(f"this run was trained by {checkpoint.get('world_size', 1)} process(es); "
                        f"resume it with as many, not {WORLD_SIZE}, or start a new run")
    run, given = checkpoint["args"], vars(args)
    prior = [key for key in typed if key.startswith("prior_")]
    kept = set(typed) - set(prior) - set(FROM_COMMAND_LINE) - set(TYPED_OR_THE_RUNS)
    refused = sorted(f"--{key.replace('_', '-')} {given[key]}" for key in kept
                     if key in run and given[key] != run[key])
    if refused:
        raise UserError(f"a resumed run keeps the settings it started with; drop "
                        f"{', '.join(refused)}, or start a new run without --resume")
    fresh = {key: given[key] for key in FROM_COMMAND_LINE}
    fresh.update({key: given[key] for key in typed if key in TYPED_OR_THE_RUNS or key in prior})
    fresh["new_prior"] = any(given[key] != run.get(key) for key in prior)
    return argparse.Namespace(**{**given, **run, **fresh}), checkpoint


def resumable(checkpoint_path):
    """The training checkpoint at checkpoint_path, or None where there is none to resume."""
    try:
        checkpoint = load_checkpoint(checkpoint_path)
    except (FileNotFoundError, CheckpointError):
        return None
    return checkpoint if "args" in checkpoint else None  # a final model has no training state


def restore(checkpoint, model, optimizer, scheduler, scaler, shuffle, device):
    """Everything that changes during training as it was saved: (epoch, metrics)."""
    for part, key in ((model, "model"), (optimizer, "optimizer"), (scheduler, "scheduler")):
        part.load_state_dict(checkpoint[key])
    scaler.load_state_dict(checkpoint.get("scaler") or scaler.state_dict())
    shuffle.set_state(checkpoint["shuffle_state"])
    states = checkpoint.get("rng_states", [checkpoint.get("rng_state")])
    distributed.set_rng_state(states[RANK], device)
    return checkpoint["epoch"], checkpoint["metrics"]


def finished(args, checkpoint):
    """Nothing left to resume: all epochs done, the model saved, its prior too unless none asked."""
    try:  # a model file that is gone or damaged is written again
        prior = load_checkpoint(args.out).get("prior")
    except (FileNotFoundError, CheckpointError):
        return False
    done = checkpoint["epoch"] == args.epochs
    return done and (args.prior_steps == 0 or prior is not None and not args.new_prior)


def say_interrupted(done, checkpoint_path, args, default_dir):
    saved = "epoch 1 is" if done == 1 else f"epochs 1-{done} are"
    again = resume_command(args, default_dir)
    go_on = f"{saved} saved in {checkpoint_path}: continue with `{again}`"
    if MASTER:
        print(f"interrupted after epoch {done}; " + (go_on if done else "start it again"),
              file=sys.stderr)


def resume_command(args, default_dir):
    where = f" --results-dir {shlex.quote(args.results_dir)}"
    start = "python" if WORLD_SIZE == 1 else "torchrun [the same options]"
    return f"{start} train_vae.py --resume" + (where if args.results_dir != default_dir else "")
