#!/usr/bin/env python
"""Classify questions with a trained adapter:
`scripts/predict.py [--config CONFIG] adapter=DIR [key=value ...] [--json] [--file F] [questions ...]`
(questions from the arguments, a file with one per line, or stdin)."""
import sys

from trec_accel import cli
from trec_accel.predict import main

if __name__ == "__main__":
    sys.exit(cli.main(lambda: main(sys.argv[1:])))
