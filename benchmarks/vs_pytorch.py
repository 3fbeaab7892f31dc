"""shardtrain against Hugging Face `transformers` + PyTorch: the same Llama, weights, batches,
optimizer and schedule, trained side by side.

    python benchmarks/vs_pytorch.py                              # `default`, fp32, CPU
    python benchmarks/vs_pytorch.py --config small --precision bf16 --batch_size 4 \
        --data.seq_len 256                                       # `small`, bf16, CPU
    python benchmarks/vs_pytorch.py --config small --precision bf16   # one GPU: cuDNN vs SDPA
    python benchmarks/vs_pytorch.py --config 1b                       # one GPU, real size

Variants, all on one device:
  shardtrain      the engine's compiled train step (engine.setup), batches already on device;
  torch eager     `LlamaForCausalLM` (SDPA attention) + `torch.optim.AdamW` (decay on matrices
                  only, as ours), global-norm clipping, the same warmup + cosine schedule;
  torch.compile   the same model and step under `torch.compile` (inductor).
Where our config recomputes activations (`--model.remat`, e.g. `1b`), the torch twin does too,
through Hugging Face's gradient checkpointing, which recomputes whole layers
(`--torch_checkpointing auto`, the default; `yes`/`no` force it): on an H100, `1b`'s eager step
without it ran out of the card's 80 GB. bf16 is the same policy on both sides: fp32 weights and
AdamW state, bf16 compute (`jax`: `--precision bf16`; torch: `autocast(bfloat16)`), loss in fp32.

First the equivalence check: the torch model is loaded from our initial params through the
Hugging Face export (`engine.hf.save_params`), and the first step's loss on the same batch
must agree to 1e-4 (fp32, full-precision matmuls on both sides) before anything is timed.
Then rounds alternate the variants (after warm-up steps, compiles excluded); prints each
round's tokens/s, the medians and the ratio shardtrain / each torch variant. Each variant runs
in a process of its own (`--isolate yes`, the default), the processes alternating for
`--cycles` cycles: two frameworks' allocators cannot share one card (on an H100, `small`'s JAX
step and PyTorch's together ran out of its 80 GB), and on a CPU their thread pools slow each
other (`small` in bf16 on 2 cores, one process against a process each: shardtrain 208 against
264 tokens/s, torch eager 351 against 405). `--isolate no` times them in one process. Any
`engine.train` flag applies; `--model.attention` is `auto`, so cuDNN's kernel on a GPU in bf16.
Importing the engine sets glibc's malloc for one CPU device (engine.hostmem); the torch
variants' processes keep glibc's own settings, as PyTorch runs, unless `--torch_host_memory
engine`.

`--phases` says where a gap is: each variant's forward (the loss alone), forward + backward
(the gradients, not applied) and whole step, timed apart in the same rounds, in ms per step,
with the backward as their difference. On our side the first two are `jax.jit`s of the step's
own loss function (engine.step); the gradient alone returns fresh buffers the step reuses.
"""

from __future__ import annotations

import os
import sys

if "XLA_FLAGS" not in os.environ:  # ignored when there is an accelerator
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
# The equivalence check puts both frameworks on one GPU: JAX must not take 75 % of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from engine.config import Config, parse_args  # noqa: E402
from engine.hf import save_params  # noqa: E402
from engine.precision import POLICIES  # noqa: E402
from engine.setup import Run, setup  # noqa: E402
from engine.step import make_loss_fn  # noqa: E402


def torch_twin(run: Run, device: str = "cpu", checkpointing: str = "auto"):
    """The run's model as `transformers.LlamaForCausalLM` with its initial weights, and the
    optimizer and schedule of `run.cfg` in torch: (model, optimizer, scheduler). Checkpointing
    `auto` recomputes layers where `run.cfg.model.remat` recomputes anything."""
    cfg = run.cfg
    with tempfile.TemporaryDirectory() as hf_dir:
        save_params(nnx.to_pure_dict(run.state.params), cfg.model.arch, hf_dir)
        model = transformers.LlamaForCausalLM.from_pretrained(
            hf_dir, dtype=torch.float32, attn_implementation="sdpa"
        ).to(device)
    model.train()
    if checkpointing == "yes" or (checkpointing == "auto" and cfg.model.remat != "none"):
        # transformers >= 5.24 renamed it (the old name warns); the GPU image has 5.17.
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})
    o = cfg.optim
    matrices = [p for p in model.parameters() if p.ndim >= 2]  # decay matrices, as ours
    others = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": o.weight_decay},
              {"params": others, "weight_decay": 0.0}]  # fmt: skip
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    warmup = min(o.warmup_steps, max(cfg.steps - 1, 0))
    decay = max(cfg.steps, warmup + 1) - warmup

    def factor(step):  # optax.warmup_cosine_decay_schedule, as engine.optim.learning_rate
        if step < warmup:
            return step / max(warmup, 1)
        cosine = 0.5 * (1 + math.cos(math.pi * min(step - warmup, decay) / decay))
        return (1 - o.min_lr_ratio) * cosine + o.min_lr_ratio

    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def torch_loss_fn(model, cfg: Config):
    """The mean loss over counted tokens of a batch of torch tensors, in `cfg`'s precision."""
    autocast = (
        torch.autocast(device_type=next(model.parameters()).device.type, dtype=torch.bfloat16)
        if cfg.precision == "bf16"
        else contextlib.nullcontext()
    )

    def loss_fn(inputs, targets, mask):
        with autocast:
            logits = model(input_ids=inputs).logits
        losses = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), reduction="none"
        )
        return (losses * mask.flatten()).sum() / mask.sum()

    return loss_fn


def torch_step_fn(model, optimizer, scheduler, cfg: Config):
    """One training step on a batch of torch tensors; returns the loss (a 0-d tensor)."""
    loss_fn = torch_loss_fn(model, cfg)

    def step(inputs, targets, mask):
        loss = loss_fn(inputs, targets, mask)
        loss.backward()
        if cfg.optim.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def torch_batch(batch: dict[str, np.ndarray], device: str = "cpu") -> tuple:
    kinds = {"inputs": torch.long, "targets": torch.long, "mask": torch.float32}
    return tuple(torch.from_numpy(np.asarray(batch[k])).to(device, t) for k, t in kinds.items())


def first_losses(
    cfg: Config, steps: int = 1, device: str = "cpu"
) -> tuple[list[float], list[float]]:
    """The first `steps` losses of shardtrain and of the torch twin from the same initial
    weights and batches (one device)."""
    run = setup(cfg, jax.devices()[:1])
    step = torch_step_fn(*torch_twin(run, device), cfg)
    state, ours, theirs = run.state, [], []
    for i in range(steps):
        batch = run.task.train_batch(i)
        state, metrics = run.train_step(state, run.put_batch(batch))
        ours.append(float(metrics["loss"]))
        theirs.append(float(step(*torch_batch(batch, device))))
    return ours, theirs


VARIANTS = ("shardtrain", "torch eager", "torch.compile")
PHASES = ("forward", "forward+backward", "step")
TIMES = "times: "  # how a variant's own process reports its seconds per step of each phase


def _rounds(fn, batches: list, wait):
    """A function that calls `fn` on n of `batches` (cycled), waits for the last result and
    returns it as a float."""

    def run_n(n):
        for i in range(n):
            out = fn(*batches[i % len(batches)])
        return wait(out)

    return run_n


def make_variant(
    name: str, run: Run, batches: list, device: str, checkpointing: str = "auto",
    phases: tuple[str, ...] = ("step",),
) -> dict:  # fmt: skip
    """For each of `phases` a function that runs `name`'s phase n times on `batches` and waits
    for the device, returning the last loss: `forward` (the loss alone), `forward+backward`
    (the loss and the gradients, not applied), `step` (a whole train step)."""
    if name == "shardtrain":
        on_device = [(run.put_batch(b),) for b in batches]
        state = run.state

        def step(batch):
            nonlocal state
            state, metrics = run.train_step(state, batch)
            return metrics["loss"]

        fns = {"step": step}
        if set(phases) - {"step"}:
            params = jax.tree.map(jnp.copy, state.params)  # the step donates the state's
            loss_fn = make_loss_fn(
                run.graphdef, POLICIES[run.cfg.precision], run.plan.loss_chunks,
                load_balance=run.plan.context_load_balance,  # as engine.setup builds the step's
            )  # fmt: skip

            def mean_loss(params, batch):
                loss_sum, count, _ = loss_fn(params, batch)
                return loss_sum / count

            # Params as arguments, not closed over (which would compile them in as constants);
            # the gradients as outputs, or XLA would drop the backward pass.
            fns["forward"] = functools.partial(jax.jit(mean_loss), params)
            fns["forward+backward"] = functools.partial(
                jax.jit(jax.value_and_grad(mean_loss)), params
            )

        def wait(out):  # a loss, or (loss, gradients)
            jax.block_until_ready(out)
            return float(out[0] if isinstance(out, tuple) else out)

        return {p: _rounds(fns[p], on_device, wait) for p in phases}
    model, optimizer, scheduler = torch_twin(run, device, checkpointing)
    model = torch.compile(model) if name == "torch.compile" else model
    loss_fn = torch_loss_fn(model, run.cfg)

    def forward(*batch):
        with torch.no_grad():
            return loss_fn(*batch)

    def forward_backward(*batch):
        loss = loss_fn(*batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    fns = {
        "forward": forward,
        "forward+backward": forward_backward,
        "step": torch_step_fn(model, optimizer, scheduler, run.cfg),
    }
    torch_batches = [torch_batch(b, device) for b in batches]
    return {p: _rounds(fns[p], torch_batches, float) for p in phases}


def timed(names, cfg: Config, args, device: str) -> dict[str, dict[str, list[float]]]:
    """Seconds per step of each phase (`--phases`, else the whole step) of each variant in
    `names`, built in this process, over alternating rounds."""
    devices = jax.devices()[:1]
    if "shardtrain" not in names:  # only the initial weights are needed: keep them off the GPU
        cfg, devices = cfg.replace(model={"attention": "xla"}), jax.devices("cpu")[:1]
    run = setup(cfg, devices)
    batches = [run.task.train_batch(i) for i in range(args.steps_per_round)]
    phases = PHASES if args.phases else ("step",)
    variants = {
        name: make_variant(name, run, batches, device, args.torch_checkpointing, phases)
        for name in names
    }
    for name, fns in variants.items():
        start = time.perf_counter()
        for fn in fns.values():
            fn(args.warmup)
        print(f"warm-up {name}: {time.perf_counter() - start:.1f}s (compiles included)")
    seconds = {name: {phase: [] for phase in phases} for name in variants}
    for r in range(args.rounds):
        line = []
        for name, fns in variants.items():
            for phase, fn in fns.items():
                start = time.perf_counter()
                fn(args.steps_per_round)
                seconds[name][phase].append((time.perf_counter() - start) / args.steps_per_round)
            line.append(f"{name} {_show({p: s[-1] for p, s in seconds[name].items()}, cfg)}")
        print(f"round {r + 1}: " + " | ".join(line))
    return seconds


def _show(seconds: dict[str, float], cfg: Config) -> str:
    """A whole step as tokens/s; phases as ms per step each, in PHASES' order."""
    if list(seconds) == ["step"]:
        return f"{cfg.batch_size * cfg.data.seq_len / seconds['step']:,.0f} tokens/s"
    return " / ".join(f"{s * 1e3:,.1f}" for s in seconds.values()) + " ms"


def isolated(names, cfg: Config, args, argv: list[str]) -> dict[str, dict[str, list[float]]]:
    """`timed`, with each variant in a process of its own, the processes alternating for
    `--cycles` cycles: two frameworks' allocators (and `1b`'s optimizer states) do not share
    one GPU."""
    seconds = {name: {} for name in names}
    for cycle in range(args.cycles):
        for name in names:
            command = [sys.executable, __file__, *argv, "--variant", name]
            env = dict(os.environ)
            if name != "shardtrain" and args.torch_host_memory == "glibc":
                env["SHARDTRAIN_KEEP_HOST_MEMORY"] = "0"  # importing the engine sets none
            began = time.perf_counter()
            # Its stderr passes through: at a time limit its fault handler's stacks say where
            # it was (a GPU run lost them when they were captured, 2026-11-27).
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
            took = time.perf_counter() - began
            lines = done.stdout.splitlines()
            found = [json.loads(x.removeprefix(TIMES)) for x in lines if x.startswith(TIMES)]
            if done.returncode or not found:
                tail = done.stdout.strip().splitlines()[-3:]
                raise SystemExit(f"error: {name} failed (rc {done.returncode}): {' / '.join(tail)}")
            for phase, times in found[0].items():
                seconds[name].setdefault(phase, []).extend(times)
            rounds = zip(*found[0].values(), strict=True)
            shown = ", ".join(_show(dict(zip(found[0], r, strict=True)), cfg) for r in rounds)
            print(f"cycle {cycle + 1}, {name} (own process, {took:.0f} s): {shown}")
    return seconds


def equivalent(cfg: Config, device: str) -> bool:
    """Whether both sides give the same first-step loss in fp32 from the same weights; prints it.
    At most 2 x 512 tokens: both frameworks hold a model and its AdamW state on one card, and
    `1b`'s fp32 activations at 4 x 2048 ran an H100 out of memory beside them."""
    check = cfg.replace(
        precision="fp32",
        # The layer loop, not the presets' unrolled layers: the same loss, and XLA:GPU compiled
        # the unrolled fp32 model at "highest" precision for over 230 s (2026-11-27, H200).
        model={"attention": "xla", "scan_unroll": 1},
        batch_size=min(cfg.batch_size, 2),
        data={"seq_len": min(cfg.data.seq_len, 512)},
    )
    # Full fp32 matmuls on both sides: JAX on a GPU otherwise rounds fp32 matmuls through TF32.
    with jax.default_matmul_precision("highest"):
        ours, theirs = first_losses(check, device=device)
    gap = abs(ours[0] - theirs[0])
    print(
        f"first-step loss, fp32: shardtrain {ours[0]:.6f}, torch {theirs[0]:.6f}, |diff| {gap:.1e}"
    )
    if gap > 1e-4:
        print("error: the two do not compute the same loss; no timing is meaningful.")
    return gap <= 1e-4


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps_per_round", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--no_compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--isolate", choices=("yes", "no"), default="yes",
                        help="a process per variant")  # fmt: skip
    parser.add_argument("--cycles", type=int, default=2, help="with --isolate: process cycles")
    parser.add_argument("--torch_checkpointing", choices=("auto", "yes", "no"), default="auto",
                        help="HF gradient checkpointing (whole layers); auto: where --model.remat "
                        "is set")  # fmt: skip
    parser.add_argument("--torch_host_memory", choices=("glibc", "engine"), default="glibc",
                        help="with --isolate: the torch variants' malloc settings, glibc's own "
                        "(as PyTorch runs) or the engine's (engine.hostmem)")  # fmt: skip
    parser.add_argument("--phases", action="store_true",
                        help="time the forward, forward + backward and step apart")  # fmt: skip
    parser.add_argument("--variant", choices=(*VARIANTS, "check"), help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    cfg = parse_args(["--config", "default", *rest] if "--config" not in rest else rest)
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)
    if args.variant in VARIANTS:
        print(TIMES + json.dumps(timed([args.variant], cfg, args, device)[args.variant]))
        return 0

    if args.variant == "check":
        return 0 if equivalent(cfg, device) else 1
    separate = args.isolate == "yes"
    # Separate: the check in a process of its own too, so its GPU memory is gone before timing.
    check = [sys.executable, __file__, *argv, "--variant", "check"]
    # The platform allocator hands freed JAX memory back to the card, where torch can take it.
    env = {**os.environ, "XLA_PYTHON_CLIENT_ALLOCATOR": "platform"}
    if not (
        subprocess.run(check, env=env).returncode == 0 if separate else equivalent(cfg, device)
    ):
        return 1

    names = [n for n in VARIANTS if not (args.no_compile and n == "torch.compile")]
    print(f"{cfg.model.num_params() / 1e6:.1f}M params | batch {cfg.batch_size} x "
          f"{cfg.data.seq_len} | {cfg.precision} | {device} ({jax.devices()[0].device_kind}) | "
          f"jax {jax.__version__}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {torch.get_num_threads()} torch threads | "
          + ("a process per variant" if separate else "one process"))  # fmt: skip
    seconds = isolated(names, cfg, args, argv) if separate else timed(names, cfg, args, device)
    median = {n: {p: statistics.median(t) for p, t in by.items()} for n, by in seconds.items()}
    if not args.phases:
        tokens = cfg.batch_size * cfg.data.seq_len
        print("median tokens/s: " + " | ".join(f"{n} {tokens / m['step']:,.0f}"
                                               for n, m in median.items()))  # fmt: skip
        for name in names[1:]:
            print(f"ratio shardtrain / {name}: "
                  f"{median[name]['step'] / median['shardtrain']['step']:.2f}")  # fmt: skip
        return 0
    # The backward alone as the difference; the step adds the optimizer to forward + backward
    # but reuses buffers the gradient alone allocates afresh, so it may take less.
    for by in median.values():
        by["backward"] = by["forward+backward"] - by["forward"]
    columns = ("forward", "backward", "forward+backward", "step")
    print(f"{'median ms per step':20s}" + "".join(f"{c:>18s}" for c in columns))
    for name, by in median.items():
        print(f"{name:20s}" + "".join(f"{by[c] * 1e3:18,.1f}" for c in columns))
    for name in names[1:]:
        ratios = [median[name][c] / median["shardtrain"][c] for c in columns]
        print(f"{'shardtrain / ' + name:20s}" + "".join(f"{r:17.2f}x" for r in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
