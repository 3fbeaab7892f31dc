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
import re
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# Gloo reports every pairwise connection at start-up: noise, N^2 lines of it, printed by
# several threads at once, so they reach the pipe cut and run together at any character (seen:
# "[Gloo] Rank 0[Gloo] Rank  is connected to 3 peer ranks. Expected ... is : 3"). Dropped: a
# line that is a piece of the message, or that holds one with its "is connected to".
GLOO = "[Gloo]Rankisconnectedtopeerranks.Expectednumberofconnectedpeerranksis:"
NOT_TEXT = re.compile(r"[\d\s]+")  # digits and spaces: where the fragments cut


def _is_noise(line: str) -> bool:
    text = NOT_TEXT.sub("", line)  # a stray digit leaves "", which GLOO holds
    return bool(line.strip()) and (text in GLOO or ("[Gloo]" in text and "isconnectedto" in text))


def _relay(stream, out, rank: int, processes: int) -> None:
    """A process's output, line by line, without Gloo's chatter; process 0's log as it is,
    every other line marked with its process (errors of several never run together)."""
    for line in stream:
        if _is_noise(line):
            continue
        marked = out is sys.stderr or rank > 0
        out.write(f"[process {rank}/{processes}] {line}" if marked and line.strip() else line)
        out.flush()


def _with_device_count(flags: str, devices: int) -> str:
    """The user's XLA flags, with this many virtual CPU devices in place of any count given."""
    kept = [f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])


def launch(processes: int, train_args: list[str], devices_per_process: int, grace_s: float) -> int:
    address = f"localhost:{free_port()}"
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",  # whole lines, so the relay never splits one
        XLA_FLAGS=_with_device_count(os.environ.get("XLA_FLAGS", ""), devices_per_process),
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
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a terminal's Ctrl-C reaches the launcher alone
        )  # fmt: skip
        for rank in range(processes)
    ]
    readers = [
        threading.Thread(target=_relay, args=(stream, out, rank, processes), daemon=True)
        for rank, p in enumerate(procs)
        for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr))
    ]
    for reader in readers:
        reader.start()

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
        for reader in readers:
            reader.join(timeout=5)
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
    if not args.devices_per_process and 8 % args.processes:
        parser.error(
            f"--processes={args.processes} does not split the 8 default virtual devices evenly; "
            "pass --devices_per_process=N to give each process N devices."
        )
    devices = args.devices_per_process or 8 // args.processes
    print(f"launch: {args.processes} processes x {devices} CPU devices", file=sys.stderr)
    return launch(args.processes, train_args, devices, args.grace_s)


if __name__ == "__main__":
    sys.exit(main())
