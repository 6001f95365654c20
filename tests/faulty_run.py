"""train_vae.py with one fault in one process, as a user's run under torchrun meets it; the
fault is named by the environment variable FAULT:

    diverge-on-rank-0   rank 0's validation loss becomes nan in epoch 2 (others see no fault)
    no-data-on-rank-1   rank 1's --data names a folder that is not there (a second machine's)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_vae  # noqa: E402
from cli import run_main  # noqa: E402

FAULT = os.environ["FAULT"]
RANK = int(os.environ.get("RANK", 0))

if FAULT == "diverge-on-rank-0":
    real_check = train_vae.check_finite

    def check_finite(row, model, args, epoch):
        return real_check({**row, "val_loss": float("nan")} if epoch == 2 else row, model, args,
                          epoch)
    train_vae.check_finite = check_finite
elif FAULT == "no-data-on-rank-1" and RANK == 1:
    sys.argv[sys.argv.index("--data") + 1] = "/nowhere/pokemon"

if __name__ == "__main__":
    run_main(train_vae.main)
