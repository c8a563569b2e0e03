#!/usr/bin/env python
"""Evaluate a base model or a trained adapter on a split of its task's data:

    accelerate launch -q scripts/evaluate.py --config configs/NAME.yaml [adapter=DIR] [eval.split=test] \\
        [key=value ...]

Without --config, an adapter is evaluated with its own training config (its config.yaml: model, task, data).
"""
import sys

from trec_accel import cli
from trec_accel.evaluate import run


def body():
    _, cfg = cli.parse(sys.argv[1:], __doc__)
    run(cfg)


if __name__ == "__main__":
    sys.exit(cli.main(body))
