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
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from engine.config import Config, parse_args  # noqa: E402
from engine.hf import save_params  # noqa: E402
from engine.setup import Run, setup  # noqa: E402


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


def torch_step_fn(model, optimizer, scheduler, cfg: Config):
    """One training step on a batch of torch tensors; returns the loss (a 0-d tensor)."""
    autocast = (
        torch.autocast(device_type=next(model.parameters()).device.type, dtype=torch.bfloat16)
        if cfg.precision == "bf16"
        else contextlib.nullcontext()
    )

    def step(inputs, targets, mask):
        with autocast:
            logits = model(input_ids=inputs).logits
        losses = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), reduction="none"
        )
        loss = (losses * mask.flatten()).sum() / mask.sum()
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
RATES = "rates: "  # how a variant's own process reports its tokens/s


def make_variant(name: str, run: Run, batches: list, device: str, checkpointing: str = "auto"):
    """A function that trains `name` for n steps on `batches` (cycled) and waits for the device."""
    if name == "shardtrain":
        on_device = [run.put_batch(b) for b in batches]
        state = run.state

        def shardtrain_round(n):
            nonlocal state
            for i in range(n):
                state, metrics = run.train_step(state, on_device[i % len(on_device)])
            jax.block_until_ready(metrics["loss"])

        return shardtrain_round
    model, optimizer, scheduler = torch_twin(run, device, checkpointing)
    model = torch.compile(model) if name == "torch.compile" else model
    step = torch_step_fn(model, optimizer, scheduler, run.cfg)
    torch_batches = [torch_batch(b, device) for b in batches]

    def torch_round(n):
        for i in range(n):
            loss = step(*torch_batches[i % len(torch_batches)])
        float(loss)  # waits for the device

    return torch_round


def timed(names, cfg: Config, args, device: str) -> dict[str, list[float]]:
    """Tokens/s of each variant in `names`, built in this process, over alternating rounds."""
    devices = jax.devices()[:1]
    if "shardtrain" not in names:  # only the initial weights are needed: keep them off the GPU
        cfg, devices = cfg.replace(model={"attention": "xla"}), jax.devices("cpu")[:1]
    run = setup(cfg, devices)
    batches = [run.task.train_batch(i) for i in range(args.steps_per_round)]
    variants = {
        name: make_variant(name, run, batches, device, args.torch_checkpointing) for name in names
    }
    tokens = cfg.batch_size * cfg.data.seq_len
    for name, fn in variants.items():
        start = time.perf_counter()
        fn(args.warmup)
        print(f"warm-up {name}: {time.perf_counter() - start:.1f}s (compiles included)")
    rates = {name: [] for name in variants}
    for r in range(args.rounds):
        line = []
        for name, fn in variants.items():
            start = time.perf_counter()
            fn(args.steps_per_round)
            rates[name].append(tokens * args.steps_per_round / (time.perf_counter() - start))
            line.append(f"{name} {rates[name][-1]:,.0f}")
        print(f"round {r + 1}: " + " | ".join(line) + " tokens/s")
    return rates


def isolated(names, args, argv: list[str]) -> dict[str, list[float]]:
    """Each variant in a process of its own, the processes alternating for `--cycles` cycles:
    two frameworks' allocators (and `1b`'s optimizer states) do not share one GPU."""
    rates = {name: [] for name in names}
    for cycle in range(args.cycles):
        for name in names:
            command = [sys.executable, __file__, *argv, "--variant", name]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = done.stdout.splitlines()
            found = [json.loads(x.removeprefix(RATES)) for x in lines if x.startswith(RATES)]
            if done.returncode or not found:
                tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
                raise SystemExit(f"error: {name} failed (rc {done.returncode}): {' / '.join(tail)}")
            rates[name] += found[0]
            rounds = ", ".join(f"{x:,.0f}" for x in found[0])
            print(f"cycle {cycle + 1}, {name} (own process): {rounds} tokens/s")
    return rates


def equivalent(cfg: Config, device: str) -> bool:
    """Whether both sides give the same first-step loss in fp32 from the same weights; prints it.
    At most 2 x 512 tokens: both frameworks hold a model and its AdamW state on one card, and
    `1b`'s fp32 activations at 4 x 2048 ran an H100 out of memory beside them."""
    check = cfg.replace(
        precision="fp32",
        model={"attention": "xla"},
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
    parser.add_argument("--variant", choices=(*VARIANTS, "check"), help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    cfg = parse_args(["--config", "default", *rest] if "--config" not in rest else rest)
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)
    if args.variant in VARIANTS:
        print(RATES + json.dumps(timed([args.variant], cfg, args, device)[args.variant]))
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
    if separate:
        rates = isolated(names, args, argv)
    else:
        rates = timed(names, cfg, args, device)
    medians = {name: statistics.median(v) for name, v in rates.items()}
    print("median tokens/s: " + " | ".join(f"{k} {v:,.0f}" for k, v in medians.items()))
    for name in names[1:]:
        print(f"ratio shardtrain / {name}: {medians['shardtrain'] / medians[name]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
