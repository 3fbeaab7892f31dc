"""Run one training job as N local processes on JAX's distributed runtime (tests, demos):

    python -m engine.launch --processes 2 -- --config tiny --mesh.data=8

Each process gets `--devices_per_process` virtual CPU devices (default: 8 / N) and the
`--distributed.*` flags of its rank; together they form one mesh across all of them. Process 0
prints the log; the others print only warnings and errors. If one process fails, the others
stop on their own within the heartbeat timeout; any still running after `--grace_s` more are
killed. SIGTERM or SIGINT (Ctrl-C) reaches every process as SIGTERM: they stop together at the
same step and save. Exit code: the first failure's, or 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(processes: int, train_args: list[str], devices_per_process: int, grace_s: float) -> int:
    address = f"localhost:{free_port()}"
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
    )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine.train",
                *train_args,
                f"--distributed.coordinator_address={address}",
                f"--distributed.num_processes={processes}",
                f"--distributed.process_id={rank}",
            ],
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C reaches the launcher alone
        )  # fmt: skip
        for rank in range(processes)
    ]

    def forward(signum, frame):
        # As SIGTERM: every process then stops at JAX's preemption sync point and saves.
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        failed_at, code = None, 0
        while any(p.poll() is None for p in procs):
            failures = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failures and failed_at is None:
                failed_at, code = time.monotonic(), failures[0]
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for rank, p in enumerate(procs):
                    if p.poll() is None:
                        print(f"launch: killing process {rank}, still running", file=sys.stderr)
                        p.kill()
            time.sleep(0.1)
        return code or next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in procs:  # the launcher failed itself: leave no process behind
            if p.poll() is None:
                p.kill()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m engine.launch", usage="%(prog)s --processes N [options] -- TRAIN_ARGS"
    )
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument(
        "--devices_per_process", type=int, default=0, help="virtual CPU devices (default 8/N)"
    )
    parser.add_argument("--grace_s", type=float, default=120, help="then kill the survivors")
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error(f"--processes={args.processes} must be at least 1.")
    devices = args.devices_per_process or max(1, 8 // args.processes)
    return launch(args.processes, train_args, devices, args.grace_s)


if __name__ == "__main__":
    sys.exit(main())
