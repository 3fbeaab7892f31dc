"""Command line: `python -m engine.train [--config PRESET_OR_FILE] [--section.key=value ...]`."""

from __future__ import annotations

import os
import sys

from engine.config import (
    ConfigError,
    TrainingHalted,
    config_warnings,
    explicit_keys,
    parse_args,
)
from sharding import ShardingError


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        for warning in config_warnings(cfg) if cfg.distributed.process_id <= 0 else ():
            print(f"warning: {warning}", file=sys.stderr)
        # After parsing: --help should not wait for JAX.
        from engine.distributed import initialize
        from engine.trainer import train

        initialize(cfg.distributed)  # before anything touches a device
        if cache := cfg.compile_cache_dir():
            import jax

            jax.config.update("jax_compilation_cache_dir", cache)
        if cfg.mesh.auto:
            from engine.autoplan import auto_plan, describe_choice

            cfg, _, chosen, fastest = auto_plan(cfg, fixed_keys=explicit_keys(argv))
            if cfg.distributed.process_id <= 0:
                print(describe_choice(chosen, fastest), flush=True)
        train(cfg)
    except (ConfigError, ShardingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingHalted as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Exception as e:
        import jax

        if jax.process_count() == 1:
            raise
        # A peer died or lost contact: say so in one line, then leave without the distributed
        # shutdown barrier, which would only abort after waiting for the dead peer.
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        print(
            f"error: process {jax.process_index()} of {jax.process_count()} stopped: {first}. "
            "Another process probably failed or lost contact (see its log); run the same "
            "command again to resume from the last checkpoint.",
            file=sys.stderr,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(4)
    return 0


if __name__ == "__main__":
    sys.exit(main())
