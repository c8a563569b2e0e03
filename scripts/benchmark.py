#!/usr/bin/env python
"""Speed and memory on one GPU: the notebook's recipe, a fast Trainer and trec-accel (see trec_accel/benchmark.py)."""
import sys

from trec_accel import cli
from trec_accel.benchmark import main

if __name__ == "__main__":
    sys.exit(cli.main(main))
