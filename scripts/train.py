#!/usr/bin/env python
"""Fine-tune with LoRA on TREC: `accelerate launch -q scripts/train.py --config configs/NAME.yaml [key=value ...]`."""
import sys

from trec_accel import signals

signals.install_for_process()  # before the heavy imports: a signal during start-up ends the run cleanly too

from trec_accel import cli  # noqa: E402
from trec_accel.train import run  # noqa: E402


def body():
    _, cfg = cli.parse(sys.argv[1:], __doc__)
    run(cfg)


if __name__ == "__main__":
    code = cli.main(body)
    signals.ignore_while_exiting()
    sys.exit(code)
