"""Hugging Face conversion time and peak host memory against model size; generation tokens/s
with and without the KV cache.

    python benchmarks/hf_interop.py                    # CPU: ~3 minutes
    python benchmarks/hf_interop.py --sizes 1b         # one real shape (needs ~3x its bytes)

Conversion: a random bf16 Llama-family directory of each size is written, then loaded with
`hf.load` (onto one device) and exported again with `hf.save`, each in a fresh process so its
peak resident memory (`ru_maxrss`) is its own. On a CPU the loaded fp32 model itself lives in
host memory, so `peak / fp32 model` near 1 means no second copy was made along the way.
Generation: greedy, batch 1 and 8, a 32-token prompt and 128 new tokens, timed after compiling.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from models import LlamaConfig

SIZES = {  # name -> (d_model, layers, d_ff, heads, kv_heads), vocabulary 32k
    "60m": (512, 8, 1536, 8, 4),
    "250m": (1024, 12, 3072, 16, 4),
    "1b": (2048, 16, 8192, 32, 8),
}


def config(name: str) -> LlamaConfig:
    d, layers, ff, heads, kv = SIZES[name]
    return LlamaConfig(vocab_size=32_000, d_model=d, n_layers=layers, n_heads=heads,
                       n_kv_heads=kv, head_dim=d // heads, d_ff=ff)  # fmt: skip


def write_random(cfg: LlamaConfig, out: Path) -> None:
    """A bf16 HF directory with random weights, written tensor by tensor."""
    import ml_dtypes
    from flax import nnx

    from engine.hf import hf_tensors, write_safetensors
    from models import Llama
    from models.llama_hf import config_to_hf

    out.mkdir(parents=True)
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0)))))
    shapes = {name: (t[0], ml_dtypes.bfloat16) for name, t in hf_tensors(abstract, cfg).items()}
    rng = np.random.default_rng(0)
    write_safetensors(out / "model.safetensors", shapes,
                      lambda n: rng.standard_normal(shapes[n][0], np.float32) * 0.02)  # fmt: skip
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg, "bfloat16")))


def convert(hf_dir: str, out: str) -> None:
    """In a child process: load, export; print seconds and peak RSS as JSON."""
    import jax

    from engine import hf

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    model = hf.load(hf_dir)
    jax.block_until_ready(model.embed[...])
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    hf.save(model, out, dtype="bfloat16")
    save_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"load_s": load_s, "save_s": save_s, "peak": peak, "base": base}))


def generation(args) -> None:
    import jax
    from flax import nnx

    from engine.generate import Sampling, generate
    from models import Llama

    cfg = config("60m")
    model = Llama(cfg, nnx.Rngs(0))
    sampling = Sampling(max_new_tokens=128)
    for batch in (1, 8):
        prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, 32))
        rates = {}
        for use_cache in (True, False):
            generate(model, prompt, sampling, use_cache)  # compile
            start = time.perf_counter()
            generate(model, prompt, sampling, use_cache)
            rates[use_cache] = batch * sampling.max_new_tokens / (time.perf_counter() - start)
        print(
            f"generate 60m, batch {batch}, 32 + 128 tokens on {jax.devices()[0].platform}: "
            f"{rates[True]:,.0f} tok/s with the KV cache, {rates[False]:,.0f} without "
            f"-> {rates[True] / rates[False]:.1f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", default=["60m", "250m"], choices=list(SIZES))
    parser.add_argument("--convert", nargs=2, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.convert:
        return convert(*args.convert)
    with tempfile.TemporaryDirectory() as root:
        for name in args.sizes:
            cfg = config(name)
            src, out = Path(root) / f"{name}-hf", Path(root) / f"{name}-out"
            write_random(cfg, src)
            child = subprocess.run([sys.executable, __file__, "--convert", str(src), str(out)],
                                   capture_output=True, text=True, check=True)  # fmt: skip
            r = json.loads(child.stdout.strip().splitlines()[-1])
            fp32 = cfg.num_params() * 4
            print(
                f"convert {name} ({cfg.num_params() / 1e6:.0f}M params, "
                f"{cfg.num_params() * 2 / 1e9:.2f} GB bf16 on disk): load {r['load_s']:.1f}s "
                f"({cfg.num_params() * 2 / 1e9 / r['load_s']:.2f} GB/s), export "
                f"{r['save_s']:.1f}s | peak RSS {r['peak'] / 1e9:.2f} GB = "
                f"{(r['peak'] - r['base']) / fp32:.2f}x the fp32 model above the "
                f"{r['base'] / 1e9:.2f} GB start-up"
            )
            for d in (src, out):
                subprocess.run(["rm", "-rf", str(d)], check=True)
    generation(args)


if __name__ == "__main__":
    main()
