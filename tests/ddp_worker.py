"""Run under torchrun by tests/test_pretrain.py: pretrain, then save this rank's weights."""
import sys
from pathlib import Path

import torch

from fcmae import distributed
from fcmae.cli.pretrain import build_parser
from fcmae.pretrain import run_pretraining

if __name__ == "__main__":
    args = build_parser().parse_args(sys.argv[1:])
    _, model = run_pretraining(args)
    torch.save(model.state_dict(), Path(args.output_dir) / f"rank{distributed.rank()}.pt")
    distributed.cleanup()
