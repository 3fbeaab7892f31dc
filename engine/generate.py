"""Sample text from a trained model or a Hugging Face directory, with a KV cache.

    python -m engine.generate --run_dir runs/default --prompt "def main("
    python -m engine.generate --hf_dir path/to/Llama-3.2-1B --prompt "The capital of France"
    python -m engine.generate --run_dir R --prompt "..." --temperature 0.8 --top_p 0.95
    python -m engine.generate --run_dir R --prompt_ids 1,15,27     # token ids in, ids out

Greedy by default (--temperature 0); otherwise temperature, top-k and top-p (nucleus) sampling.
The whole generation — the prompt through the model once, then one token at a time against the
cache — is one jitted function; the model's params keep the sharding they were loaded with.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engine.config import ConfigError
from models import Llama, LlamaConfig
from sharding import constrain


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0 = greedy (argmax)."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 = all."""
    top_p: float = 1.0
    """Sample among the most likely tokens whose probabilities sum to p; 1 = all."""
    seed: int = 0


def pick(logits, key, s: Sampling):
    """Next token [B] from logits [B, V]."""
    if s.temperature == 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits.astype(jnp.float32) / s.temperature
    floor = jnp.finfo(jnp.float32).min
    if s.top_k:
        kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, floor, logits)
    if s.top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # The smallest logit still inside the nucleus (the top token always is).
        cutoff = jnp.min(jnp.where(mass_before < s.top_p, ordered, jnp.inf), axis=-1)
        logits = jnp.where(logits < cutoff[:, None], floor, logits)
    return jax.random.categorical(key, logits, axis=-1)


@partial(jax.jit, static_argnames=("graphdef", "sampling", "use_cache"))
def _generate(graphdef, state, prompt, sampling: Sampling, use_cache: bool):
    model = nnx.merge(graphdef, state)
    cfg: LlamaConfig = model.cfg
    batch, length = prompt.shape
    total = length + sampling.max_new_tokens
    tokens = jnp.zeros((batch, total), jnp.int32).at[:, :length].set(prompt)
    keys = jax.random.split(jax.random.key(sampling.seed), sampling.max_new_tokens)

    if not use_cache:  # the whole sequence through the model for every new token

        def step(i, tokens):
            logits = model(tokens)
            last = jax.lax.dynamic_index_in_dim(logits, length + i - 1, 1, keepdims=False)
            return tokens.at[:, length + i].set(pick(last, keys[i], sampling))

        return jax.lax.fori_loop(0, sampling.max_new_tokens, step, tokens)

    shape = (cfg.n_layers, batch, total, cfg.n_kv_heads, cfg.head_dim)
    names = ("layers", "batch", "length", "kv_heads", None)
    dtype = model.embed[...].dtype
    cache = tuple(constrain(jnp.zeros(shape, dtype), names) for _ in range(2))
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    logits, cache = model.decode(prompt, positions, (*cache, 0))
    tokens = tokens.at[:, length].set(pick(logits[:, -1], keys[0], sampling))

    def step(i, carry):
        tokens, cache = carry
        at = length + i - 1  # the newest token: feed it, predict the next
        token = jax.lax.dynamic_slice_in_dim(tokens, at, 1, axis=1)
        positions = jnp.full((batch, 1), at)
        logits, cache = model.decode(token, positions, (*cache, at))
        return tokens.at[:, at + 1].set(pick(logits[:, -1], keys[i], sampling)), cache

    tokens, _ = jax.lax.fori_loop(1, sampling.max_new_tokens, step, (tokens, cache))
    return tokens


def generate(model: Llama, prompt, sampling: Sampling = Sampling(), use_cache: bool = True):
    """Prompt token ids [B, T] (equal lengths) -> [B, T + max_new_tokens] token ids."""
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim == 1:
        prompt = prompt[None]
    graphdef, state = nnx.split(model)
    return np.asarray(_generate(graphdef, state, prompt, sampling, use_cache))


# ---------------------------------------------------------------- command line


def _from_run(run_dir: Path):
    """The model of a run directory (or params export) and its tokenizer (None when the run
    recorded none: a params export imported from Hugging Face)."""
    from engine.checkpoint import load_model
    from engine.config import DataConfig
    from engine.sources import make_tokenizer

    model, config = load_model(run_dir)
    if not hasattr(model, "decode"):
        raise ConfigError(
            f"{run_dir} holds a --task={config.get('task')} model, which does not generate "
            "text; pass the run directory of a language model."
        )
    if "data" not in config:
        return model, None
    data = DataConfig(**{k: v for k, v in config["data"].items() if k != "source"})
    return model, make_tokenizer(data)


def _from_hf(hf_dir: Path):
    from engine import hf
    from engine.sources import HFTokenizer

    model = hf.load(hf_dir)
    tokenizer_file = hf_dir / "tokenizer.json"
    return model, HFTokenizer(str(tokenizer_file)) if tokenizer_file.is_file() else None


def prompt_tokens(text: str | None, ids: str | None, tokenizer, vocab_size: int, where: str):
    """The prompt as token ids, from text (needs a tokenizer) or from comma-separated ids."""
    if ids is not None:
        try:
            tokens = [int(t) for t in ids.split(",") if t.strip()]
        except ValueError:
            raise ConfigError(
                f"--prompt_ids={ids} is not a comma-separated list of token ids, e.g. 1,15,27."
            ) from None
        bad = [t for t in tokens if not 0 <= t < vocab_size]
        if bad:
            raise ConfigError(
                f"--prompt_ids has token id {bad[0]}, outside the model's vocabulary of "
                f"{vocab_size} ids (0-{vocab_size - 1}); pass ids below {vocab_size}."
            )
    else:
        if tokenizer is None:
            raise ConfigError(
                f"--prompt is text, and {where} has no tokenizer to encode it (no tokenizer.json "
                "recorded); pass token ids with --prompt_ids 1,15,27 instead."
            )
        tokens = list(tokenizer.encode_batch([text])[0])
    if not tokens:
        raise ConfigError(
            "The prompt is empty; give at least one token (--prompt or --prompt_ids)."
        )
    return np.asarray(tokens, np.int32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--run_dir", help="a run directory or params export (newest checkpoint)")
    where.add_argument("--hf_dir", help="a Hugging Face directory")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text, encoded with the model's tokenizer")
    prompt.add_argument("--prompt_ids", help="token ids, e.g. 1,15,27 (printed back as ids)")
    for field in dataclasses.fields(Sampling):
        parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default)
    parser.add_argument("--no_cache", action="store_true", help="recompute every step (slow)")
    args = parser.parse_args(argv)
    sampling = Sampling(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Sampling)})
    try:
        source = args.run_dir or args.hf_dir
        if args.run_dir:
            model, tokenizer = _from_run(Path(args.run_dir))
        else:
            model, tokenizer = _from_hf(Path(args.hf_dir))
        vocab = model.cfg.vocab_size
        prompt = prompt_tokens(args.prompt, args.prompt_ids, tokenizer, vocab, source)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    out = generate(model, prompt, sampling, use_cache=not args.no_cache)[0]
    seconds = time.perf_counter() - start
    new = out[len(prompt) :]
    text = ",".join(map(str, new)) if args.prompt_ids is not None else tokenizer.decode(new)
    print(text)
    print(f"[{len(new)} tokens in {seconds:.2f}s including compilation]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
