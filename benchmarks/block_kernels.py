"""A decoder block's two halves, forward and backward, in the engine's form, in the plain
einsum form it replaced, and in PyTorch: where a CPU step's time goes, piece by piece.

    python benchmarks/block_kernels.py                  # `default`'s shapes: 32 x 128 tokens
    python benchmarks/block_kernels.py --batch 4 --seq 256 --d_model 768 --heads 12 \
        --kv_heads 4 --d_ff 2048 --dtype bf16           # `small`'s, as its bf16 row runs

Pieces, each as one jitted gradient (JAX) or one forward + backward (PyTorch, eager):
  swiglu     down(silu(gate(x)) * up(x)): `models.layers.SwiGLU` itself (`dense`: tokens
             merged into one dimension) against "btd,df->btf" einsums, whose weight gradients
             contract batch and length apart; torch: three `nn.Linear`;
  attention  causal grouped-query attention: `models.layers.xla_attention` ([B, K, G*T, D]
             rows, in causal blocks of query rows on a CPU) against the [B, T, K, G, D]
             einsums over the whole [T, T] scores it replaced; torch:
             `scaled_dot_product_attention(is_causal=True, enable_gqa=True)`.
Variants alternate in rounds; prints the median ms of each and each JAX form's ratio to torch.
--dtype bf16 runs every piece on bf16 inputs and weights (torch too), as a bf16 policy's layers do.
JAX runs on its default device, torch on the CPU: on a GPU, compare the two JAX forms.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from models import LlamaConfig  # noqa: E402
from models.layers import SwiGLU, xla_attention  # noqa: E402

# `default`'s shapes and batch; rounds of `repeats` steps of each variant.
DEFAULTS = dict(batch=32, seq=128, d_model=128, heads=4, kv_heads=2, d_ff=384, rounds=7, repeats=10)


def einsum_swiglu(x, w_gate, w_up, w_down):
    hidden = jax.nn.silu(jnp.einsum("btd,df->btf", x, w_gate))
    return jnp.einsum("btf,fd->btd", hidden * jnp.einsum("btd,df->btf", x, w_up), w_down)


def engine_swiglu(x, w_gate, w_up, w_down):
    """`models.layers.SwiGLU` itself, holding the given weights."""
    d, f = w_gate.shape
    config = dataclasses.replace(LlamaConfig(), d_model=d, d_ff=f)
    block = nnx.eval_shape(lambda: SwiGLU(config, nnx.Rngs(0)))
    block.w_gate, block.w_up, block.w_down = (nnx.Param(w) for w in (w_gate, w_up, w_down))
    return block(x)[0]


def einsum_attention(q, k, v):
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k) * d**-0.5
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)


def jax_step(fn, args, cotangent):
    """fn's forward and the gradients of all its arguments, as one compiled program."""
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * cotangent), range(len(args))))
    return lambda: jax.block_until_ready(grad(*args))


def torch_step(fn, inputs, cotangent):
    """fn's forward and the gradients of `inputs` (nothing accumulated, as jax.grad)."""
    return lambda: torch.autograd.grad(fn(), inputs, cotangent)


DTYPES = {"fp32": (jnp.float32, torch.float32), "bf16": (jnp.bfloat16, torch.bfloat16)}


def pieces(a):
    """piece -> (variant -> step, variant -> its step's gradients in JAX's layout)."""
    tokens, d, f = (a.batch, a.seq), a.d_model, a.d_ff
    head_dim = d // a.heads
    keys = iter(jax.random.split(jax.random.key(0), 9))
    dtype, torch_dtype = DTYPES[a.dtype]

    def normal(*shape, scale=1.0):
        return (scale * jax.random.normal(next(keys), shape)).astype(dtype)

    def as_torch(x, *order):
        x = np.asarray(jax.device_get(x.transpose(*order) if order else x), np.float32)
        return torch.tensor(x, dtype=torch_dtype).requires_grad_()

    mlp = (normal(*tokens, d), normal(d, f, scale=0.02), normal(d, f, scale=0.02),
           normal(f, d, scale=0.02))  # fmt: skip
    mlp_cotangent = normal(*tokens, d)
    x = as_torch(mlp[0])
    linears = [torch.nn.Linear(1, 1, bias=False) for _ in range(3)]
    for linear, w in zip(linears, mlp[1:], strict=True):
        linear.weight = torch.nn.Parameter(as_torch(w, 1, 0))  # torch keeps [out, in]

    def torch_swiglu():
        return linears[2](torch.nn.functional.silu(linears[0](x)) * linears[1](x))

    qkv = (normal(*tokens, a.heads, head_dim), normal(*tokens, a.kv_heads, head_dim),
           normal(*tokens, a.kv_heads, head_dim))  # fmt: skip
    attention_cotangent = normal(*tokens, a.heads, head_dim)
    q, k, v = (as_torch(t, 0, 2, 1, 3) for t in qkv)  # SDPA's [B, H, T, D]

    def torch_attention():
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True
        )

    def as_jax(grads, *orders):
        return [g.float().numpy().transpose(*o) for g, o in zip(grads, orders, strict=True)]

    swiglu = {
        "engine": jax_step(engine_swiglu, mlp, mlp_cotangent),
        "einsum": jax_step(einsum_swiglu, mlp, mlp_cotangent),
        "torch": torch_step(torch_swiglu, [x, *(lin.weight for lin in linears)],
                            as_torch(mlp_cotangent).detach()),
    }  # fmt: skip
    attention = {
        "engine": jax_step(xla_attention, qkv, attention_cotangent),
        "einsum": jax_step(einsum_attention, qkv, attention_cotangent),
        "torch": torch_step(torch_attention, [q, k, v],
                            as_torch(attention_cotangent, 0, 2, 1, 3).detach()),
    }  # fmt: skip
    return {
        "swiglu": (swiglu, {"torch": lambda: as_jax(swiglu["torch"](), (0, 1, 2), *[(1, 0)] * 3)}),
        "attention": (attention,
                      {"torch": lambda: as_jax(attention["torch"](), *[(0, 2, 1, 3)] * 3)}),
    }  # fmt: skip


def largest_difference(variants, in_jax_layout) -> float:
    """Largest gradient difference from the engine's, relative to the gradient's own scale:
    the variants must compute the same function for their times to compare."""
    want = [np.asarray(g, np.float32) for g in variants["engine"]()]
    worst = 0.0
    for name, step in variants.items():
        got = in_jax_layout[name]() if name in in_jax_layout else step()
        for g, w in zip(got, want, strict=True):
            g = np.asarray(g, np.float32)
            worst = max(worst, float(np.abs(g - w).max() / np.abs(w).max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in DEFAULTS.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args(argv)
    # bf16 keeps 8 bits of mantissa: the forms round at different places.
    tolerance = 1e-4 if args.dtype == "fp32" else 5e-2
    print(f"{args.batch} x {args.seq} tokens, d_model {args.d_model}, heads {args.heads}/"
          f"{args.kv_heads}, d_ff {args.d_ff}, {args.dtype} | {jax.devices()[0].platform} | jax "
          f"{jax.__version__}, torch {torch.__version__}, {torch.get_num_threads()} torch "
          "threads")  # fmt: skip
    for piece, (variants, in_jax_layout) in pieces(args).items():
        difference = largest_difference(variants, in_jax_layout)  # compiles and warms up too
        times = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, step in variants.items():
                start = time.perf_counter()
                for _ in range(args.repeats):
                    step()
                times[name].append((time.perf_counter() - start) / args.repeats * 1e3)
        ms = {name: statistics.median(t) for name, t in times.items()}
        print(f"{piece:9s} forward + backward, median ms: " + " | ".join(
            f"{name} {m:.2f}" for name, m in ms.items()) + f" | engine / einsum "
            f"{ms['einsum'] / ms['engine']:.2f}x faster; torch / engine "
            f"{ms['torch'] / ms['engine']:.2f} (1 = as fast as torch) | gradients agree to "
            f"{difference:.0e}")  # fmt: skip
        assert difference < tolerance, f"{piece}: the variants compute different gradients"
    return 0


if __name__ == "__main__":
    sys.exit(main())
