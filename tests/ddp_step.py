"""One step of train_vae.train_one_epoch on 6 fixed images, augmentation and noise off: run by
test_distributed.py in its own process with batch 6, and under torchrun as 2 processes with
batch 3 each. Saves rank 0's gradients and the epoch's losses to the path given."""
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distributed  # noqa: E402
import train_vae  # noqa: E402
from vae_model import VAE  # noqa: E402


def one_step(batch_size):
    device = distributed.join("cpu")
    torch.manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    index = torch.tensor([9, 2, 7, 0, 4, 5])  # the training images among them
    model = VAE(16, 2, (8, 8, 8))
    model.reparameterize = lambda mu, log_var: mu  # no noise: the same z in every process
    step_model = DDP(model) if distributed.WORLD_SIZE > 1 else model
    args = train_vae.parse_args(["--batch-size", str(batch_size)])
    args.epochs, args.use_amp, args.amp_dtype = 1, False, "bfloat16"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = train_vae.train_one_epoch(step_model, images, index, 1, optimizer=optimizer,
                                       scheduler=scheduler, scaler=scaler, augment=lambda b: b,
                                       shuffle=torch.Generator().manual_seed(5), args=args,
                                       device=device)
    return [p.grad.clone() for p in model.parameters()], losses


if __name__ == "__main__":
    gradients, losses = one_step(int(sys.argv[1]))
    if distributed.MASTER:
        torch.save({"gradients": gradients, "losses": losses}, sys.argv[2])
