"""shardtrain against Hugging Face `transformers` + PyTorch: the same Llama, weights, batches,
optimizer and schedule, trained side by side in one process.

    python benchmarks/vs_pytorch.py                              # `default`, fp32, CPU
    python benchmarks/vs_pytorch.py --config small --precision bf16 --batch_size 4 \
        --data.seq_len 256                                       # `small`, bf16, CPU
    python benchmarks/vs_pytorch.py --config small --precision bf16 --model.attention cudnn
                                                                 # one GPU: cuDNN against SDPA

Variants, all on one device:
  shardtrain      the engine's compiled train step (engine.setup), batches already on device;
  torch eager     `LlamaForCausalLM` (SDPA attention) + `torch.optim.AdamW` (decay on matrices
                  only, as ours), global-norm clipping, the same warmup + cosine schedule;
  torch.compile   the same model and step under `torch.compile` (inductor).
bf16 is the same policy on both sides: fp32 weights and AdamW state, bf16 compute (`jax`:
`--precision bf16`; torch: `autocast(bfloat16)`), loss in fp32.

First the equivalence check: the torch model is loaded from our initial params through the
Hugging Face export (`engine.hf.save_params`), and the first step's loss on the same batch
must agree to 1e-4 (fp32) before anything is timed. Then rounds alternate the variants
(after warm-up steps, compiles excluded); prints each round's tokens/s, the medians and the
ratio shardtrain / each torch variant. Any `engine.train` flag applies.
"""

from __future__ import annotations

import os
import sys

if "XLA_FLAGS" not in os.environ:  # ignored when there is an accelerator
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
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


def torch_twin(run: Run, device: str = "cpu"):
    """The run's model as `transformers.LlamaForCausalLM` with its initial weights, and the
    optimizer and schedule of `run.cfg` in torch: (model, optimizer, scheduler)."""
    cfg = run.cfg
    with tempfile.TemporaryDirectory() as hf_dir:
        save_params(nnx.to_pure_dict(run.state.params), cfg.model.arch, hf_dir)
        model = transformers.LlamaForCausalLM.from_pretrained(
            hf_dir, dtype=torch.float32, attn_implementation="sdpa"
        ).to(device)
    model.train()
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


def first_losses(cfg: Config, steps: int = 1) -> tuple[list[float], list[float]]:
    """The first `steps` losses of shardtrain and of the torch twin from the same initial
    weights and batches (one device)."""
    run = setup(cfg, jax.devices()[:1])
    step = torch_step_fn(*torch_twin(run), cfg)
    state, ours, theirs = run.state, [], []
    for i in range(steps):
        batch = run.task.train_batch(i)
        state, metrics = run.train_step(state, run.put_batch(batch))
        ours.append(float(metrics["loss"]))
        theirs.append(float(step(*torch_batch(batch))))
    return ours, theirs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps_per_round", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--no_compile", action="store_true", help="skip torch.compile")
    args, rest = parser.parse_known_args(argv)
    cfg = parse_args(["--config", "default", *rest] if "--config" not in rest else rest)
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)

    check = cfg.replace(precision="fp32", model={"attention": "xla"})
    ours, theirs = first_losses(check)
    gap = abs(ours[0] - theirs[0])
    print(
        f"first-step loss, fp32: shardtrain {ours[0]:.6f}, torch {theirs[0]:.6f}, |diff| {gap:.1e}"
    )
    if gap > 1e-4:
        print("error: the two do not compute the same loss; no timing is meaningful.")
        return 1

    run = setup(cfg, jax.devices()[:1])
    tokens = cfg.batch_size * cfg.data.seq_len
    batches = [run.task.train_batch(i) for i in range(args.steps_per_round)]
    on_device = [run.put_batch(b) for b in batches]
    state = run.state

    def shardtrain_round(n):
        nonlocal state
        for i in range(n):
            state, metrics = run.train_step(state, on_device[i % len(on_device)])
        jax.block_until_ready(metrics["loss"])

    variants = {"shardtrain": shardtrain_round}
    torch_batches = [torch_batch(b, device) for b in batches]
    twins = {"torch eager": False} | ({} if args.no_compile else {"torch.compile": True})
    for name, compiled in twins.items():
        model, optimizer, scheduler = torch_twin(run, device)
        step = torch_step_fn(torch.compile(model) if compiled else model, optimizer, scheduler, cfg)

        def torch_round(n, step=step):
            for i in range(n):
                loss = step(*torch_batches[i % len(torch_batches)])
            float(loss)  # waits for the device

        variants[name] = torch_round

    print(f"{cfg.model.num_params() / 1e6:.1f}M params | batch {cfg.batch_size} x "
          f"{cfg.data.seq_len} | {cfg.precision} | {device} ({jax.devices()[0].device_kind}) | "
          f"jax {jax.__version__}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {torch.get_num_threads()} torch threads")  # fmt: skip
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
    medians = {name: statistics.median(v) for name, v in rates.items()}
    print("median tokens/s: " + " | ".join(f"{k} {v:,.0f}" for k, v in medians.items()))
    for name in twins:
        print(f"ratio shardtrain / {name}: {medians['shardtrain'] / medians[name]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
