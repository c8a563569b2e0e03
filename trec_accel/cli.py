"""What the scripts share: `--config FILE [key=value ...]`, and one-line errors instead of tracebacks."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from .config import ConfigError, load_config, reference_markdown
from .launcher import LaunchError


def parse(argv: list[str] | None, description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    parser = argparse.ArgumentParser(description=description,
                                     epilog="Overrides are dotted config keys, e.g. train.lr=1e-4 data.task=fine.")
    parser.add_argument("--config", help="YAML run config (configs/*.yaml); defaults apply where omitted; without "
                        "it, an adapter=DIR override's own config.yaml")
    parser.add_argument("--help-config", action="store_true", help="print every config key with its default and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    if args.help_config:
        print(reference_markdown())
        sys.exit(0)
    if args.config is None:  # an adapter's own training config, where one is given
        from .model import adapter_config
        return args, load_config(adapter_config(args.overrides), args.overrides)
    return args, load_config(args.config, args.overrides)


def require_cuda(message: str) -> None:
    """A script that times or captures CUDA kernels, on a machine without CUDA: `message` as its one error line (exit
    code 2 under `main`)."""
    import torch
    if not torch.cuda.is_available():
        raise LaunchError(message)


def expected_errors() -> tuple[type[Exception], ...]:
    from .batching import PromptTokenError
    from .checkpoint import CheckpointError
    from .data import DataError
    from .evaluate import EvalError
    from .memory import OutOfMemory
    from .model import ModelLoadError
    from .offline_models import OfflineModelError
    from .task import TaskError
    return (CheckpointError, ConfigError, DataError, EvalError, LaunchError, ModelLoadError, OfflineModelError,
            OutOfMemory, PromptTokenError, TaskError)


def main(body: Callable[[], object]) -> int:
    """Run a script body; a known bad input ends it with `error: ...` and exit code 2. The exit code is the body's
    where it returns one (an int), else 0."""
    try:
        result = body()
    except expected_errors() as e:
        # One write of the whole line: processes of one launch that fail together do not interleave their lines.
        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        return 2
    return result if type(result) is int else 0
