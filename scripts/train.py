#!/usr/bin/env python
"""Fine-tune with LoRA on TREC: `accelerate launch -q scripts/train.py --config configs/NAME.yaml [key=value ...]`."""
import sys

from trec_accel import cli
from trec_accel.train import run


def body():
    _, cfg = cli.parse(sys.argv[1:], __doc__)
    run(cfg)


if __name__ == "__main__":
    sys.exit(cli.main(body))
