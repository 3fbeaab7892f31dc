"""Command line: `python -m engine.train [--config PRESET_OR_FILE] [--section.key=value ...]`."""

from __future__ import annotations

import sys

from engine.config import ConfigError, TrainingHalted, parse_args
from sharding import ShardingError


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        from engine.trainer import train  # after parsing: --help should not wait for JAX

        train(cfg)
    except (ConfigError, ShardingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingHalted as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
