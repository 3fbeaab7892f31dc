"""Hugging Face interop: Llama-family directories (config.json + safetensors) in and out.

    from engine import hf
    model = hf.load("path/to/Llama-3.2-1B")        # Flax NNX module; model(tokens) -> logits
    hf.save(model, "out/")                         # a directory transformers loads

    python -m engine.hf import HF_DIR OUT          # -> a params export: --init_from=OUT
    python -m engine.hf export RUN_OR_EXPORT OUT   # newest checkpoint -> HF directory

Tensors are read by memmap and placed one at a time, each device receiving only its shard, so a
host never holds a second copy of the model. Weights map one to one: Hugging Face's `[out, in]`
linear weights are transposed and heads split out; both sides rotate pairs (i, i + D/2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import struct
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from engine.config import ConfigError
from models import Llama, LlamaConfig

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
}  # fmt: skip
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


# ---------------------------------------------------------------- safetensors, by memmap


class SafeTensors:
    """The tensors of one .safetensors file, read lazily (8-byte header size, JSON header)."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self.path, self.header, self.start = path, header, 8 + size
        self.data = np.memmap(path, np.uint8, "r")

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        begin, end = info["data_offsets"]
        raw = self.data[self.start + begin : self.start + end]
        return raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors(path: Path, tensors: dict[str, tuple[tuple, np.dtype]], fetch) -> None:
    """Write `tensors` (name -> (shape, dtype)) to `path`, calling `fetch(name)` for each one's
    values in turn, so that only one tensor is in host memory at a time."""
    header, offset = {}, 0
    for name in sorted(tensors):
        shape, dtype = tensors[name]
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    blob = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":"))
    blob = blob.encode().ljust((len(blob) + 7) // 8 * 8)  # data 8-byte aligned, as HF does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in sorted(tensors):
            shape, dtype = tensors[name]
            value = np.ascontiguousarray(fetch(name), dtype=dtype)
            if value.shape != tuple(shape):
                raise ValueError(f"{name}: shape {value.shape}, expected {tuple(shape)}")
            f.write(value.tobytes())


class Checkpoint:
    """A Hugging Face model directory: its config.json and tensors, single or sharded."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not (self.dir / "config.json").is_file():
            raise ConfigError(
                f"{self.dir} has no config.json; pass a Hugging Face model directory."
            )
        self.config = json.loads((self.dir / "config.json").read_text())
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / "model.safetensors").is_file():
            weight_map = None
        else:
            raise ConfigError(
                f"{self.dir} has neither model.safetensors nor model.safetensors.index.json "
                "(PyTorch .bin weights are not read); save the model with safetensors."
            )
        files = {f: SafeTensors(self.dir / f) for f in set((weight_map or {}).values())}
        if weight_map is None:
            files = {"model.safetensors": SafeTensors(self.dir / "model.safetensors")}
            weight_map = {n: "model.safetensors" for n in files["model.safetensors"].header}
        self.files, self.weight_map = files, weight_map

    def get(self, name: str, shape: tuple) -> np.ndarray:
        if name not in self.weight_map:
            raise ConfigError(f"{self.dir}: tensor '{name}' is missing from the checkpoint.")
        value = self.files[self.weight_map[name]].get(name)
        if value.shape != tuple(shape):
            raise ConfigError(
                f"{self.dir}: tensor '{name}' has shape {list(value.shape)}, but config.json "
                f"implies {list(shape)}; the weights and config.json do not belong together."
            )
        if value.dtype not in (np.float32, np.float16, ml_dtypes.bfloat16):
            raise ConfigError(f"{self.dir}: tensor '{name}' is {value.dtype}, not a float type.")
        return value


# ---------------------------------------------------------------- config


def config_from_hf(c: dict, where: str = "config.json") -> LlamaConfig:
    """A LlamaConfig for a Hugging Face Llama-family config, or a ConfigError naming the field
    shardtrain's Llama does not have."""
    kind = c.get("model_type")
    if kind not in ("llama", "mistral", "qwen2"):
        raise ConfigError(
            f"{where}: model_type '{kind}' is not supported; shardtrain imports Llama-family "
            "models (llama, mistral without sliding window)."
        )
    if kind == "qwen2":
        raise ConfigError(
            f"{where}: model_type 'qwen2' has q/k/v projection biases, which shardtrain's Llama "
            "does not; Llama and Mistral (without sliding window) layouts are supported."
        )
    unsupported = {
        "hidden_act": c.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(c.get("attention_bias")),
        "mlp_bias": bool(c.get("mlp_bias")),
        "sliding_window": bool(c.get("sliding_window")) and bool(c.get("use_sliding_window", 1)),
    }
    for field, bad in unsupported.items():
        if bad:
            raise ConfigError(
                f"{where}: {field}={c[field]} is not supported by shardtrain's Llama "
                "(SiLU MLP, no biases, full attention)."
            )
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ConfigError(
            f"{where}: rope type '{rope_type}' is not supported; shardtrain has default and "
            "llama3 rotary embeddings."
        )
    heads = c["num_attention_heads"]
    scaling = {}
    if rope_type == "llama3":
        scaling = dict(
            rope_scaling="llama3",
            rope_factor=float(rope["factor"]),
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
            rope_original_max_len=int(rope["original_max_position_embeddings"]),
        )
    return LlamaConfig(
        vocab_size=c["vocab_size"],
        d_model=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        d_ff=c["intermediate_size"],
        rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10_000.0))),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        **scaling,
    )


def config_to_hf(cfg: LlamaConfig, dtype: str) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        rope.update(
            rope_type="llama3",
            factor=cfg.rope_factor,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_len,
        )
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "max_position_embeddings": max(8192, cfg.rope_original_max_len),
        # Both spellings: transformers >= 5 reads rope_parameters, 4.x rope_theta/rope_scaling.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling if cfg.rope_scaling != "none" else None,
        "rope_parameters": rope,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


# ---------------------------------------------------------------- weight names and layouts


def _t(w, cfg):
    return w.T


def _same(w, cfg):
    return w


# shardtrain param path -> (HF name, HF -> ours, ours -> HF). Layer names get the prefix
# `model.layers.{i}.`; ours are stacked on a leading layers axis.
LAYER = {
    ("attn_norm", "scale"): ("input_layernorm.weight", _same, _same),
    ("wq",): ("self_attn.q_proj.weight",
              lambda w, c: w.T.reshape(c.d_model, c.n_heads, c.head_dim),
              lambda w, c: w.reshape(c.d_model, -1).T),
    ("wk",): ("self_attn.k_proj.weight",
              lambda w, c: w.T.reshape(c.d_model, c.n_kv_heads, c.head_dim),
              lambda w, c: w.reshape(c.d_model, -1).T),
    ("wv",): ("self_attn.v_proj.weight",
              lambda w, c: w.T.reshape(c.d_model, c.n_kv_heads, c.head_dim),
              lambda w, c: w.reshape(c.d_model, -1).T),
    ("wo",): ("self_attn.o_proj.weight",
              lambda w, c: w.T.reshape(c.n_heads, c.head_dim, c.d_model),
              lambda w, c: w.reshape(-1, c.d_model).T),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", _same, _same),
    ("w_gate",): ("mlp.gate_proj.weight", _t, _t),
    ("w_up",): ("mlp.up_proj.weight", _t, _t),
    ("w_down",): ("mlp.down_proj.weight", _t, _t),
}  # fmt: skip
TOP = {
    ("embed",): ("model.embed_tokens.weight", _same, _same),
    ("final_norm", "scale"): ("model.norm.weight", _same, _same),
    ("head",): ("lm_head.weight", _t, _t),
}


def _hf_shape(path, ours_shape, cfg) -> tuple:
    """The HF tensor's shape for one of our params (one layer's, for stacked ones)."""
    table, shape = (LAYER, ours_shape[1:]) if path[0] == "layers" else (TOP, ours_shape)
    key = path[1:] if path[0] == "layers" else path
    # Traced, not run: a real array of the embedding's size just to read a shape is waste.
    to_hf = table[key][2]
    return jax.eval_shape(lambda w: to_hf(w, cfg), jax.ShapeDtypeStruct(shape, np.int8)).shape


def _key(path) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", p)) for p in path)


def load_params(ckpt: Checkpoint, cfg: LlamaConfig, abstract):
    """Params for `abstract` (a pure-dict tree of ShapeDtypeStructs with shardings), read from
    `ckpt` tensor by tensor; each device gets only its shard."""

    def place(path, leaf):
        path = _key(path)
        index = leaf.sharding.addressable_devices_indices_map(leaf.shape)
        shards = {d: np.empty(_shard_shape(leaf.shape, i), leaf.dtype) for d, i in index.items()}
        if path[0] == "layers":
            name, to_ours, _ = LAYER[path[1:]]
            hf_shape = _hf_shape(path, leaf.shape, cfg)
            for layer in range(cfg.n_layers):
                value = to_ours(ckpt.get(f"model.layers.{layer}.{name}", hf_shape), cfg)
                for d, i in index.items():
                    rows = range(*i[0].indices(leaf.shape[0]))
                    if layer in rows:
                        shards[d][layer - rows.start] = value[i[1:]]
        else:
            name, to_ours, _ = TOP[path]
            value = to_ours(ckpt.get(name, _hf_shape(path, leaf.shape, cfg)), cfg)
            for d, i in index.items():
                shards[d][...] = value[i]
        arrays = [jax.device_put(shards[d], d) for d in index]
        return jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, arrays)

    return jax.tree_util.tree_map_with_path(place, abstract)


def _shard_shape(shape, index) -> tuple:
    return tuple(len(range(*s.indices(n))) for s, n in zip(index, shape, strict=True))


def hf_tensors(params, cfg: LlamaConfig) -> dict[str, tuple]:
    """HF tensor name -> (HF shape, our leaf, layer index or None, ours -> HF) for a pure-dict
    param tree in the canonical layout (leaves may be arrays or ShapeDtypeStructs)."""
    tensors = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        path = _key(path)
        shape = _hf_shape(path, leaf.shape, cfg)
        if path[0] == "layers":
            name, _, to_hf = LAYER[path[1:]]
            for layer in range(cfg.n_layers):
                tensors[f"model.layers.{layer}.{name}"] = (shape, leaf, layer, to_hf)
        else:
            name, _, to_hf = TOP[path]
            tensors[name] = (shape, leaf, None, to_hf)
    return tensors


def save_params(params: dict, cfg: LlamaConfig, out: str | Path, dtype: str = "float32") -> Path:
    """Write a pure-dict param tree (canonical layout) as a Hugging Face directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np_dtype = EXPORT_DTYPES[dtype]
    tensors = hf_tensors(params, cfg)

    def fetch(name):
        _, leaf, layer, to_hf = tensors[name]
        value = np.asarray(leaf if layer is None else leaf[layer])  # one tensor gathered
        return to_hf(value, cfg).astype(np.float32).astype(np_dtype)

    shapes = {name: (t[0], np_dtype) for name, t in tensors.items()}
    write_safetensors(out / "model.safetensors", shapes, fetch)
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2) + "\n")
    return out


# ---------------------------------------------------------------- the model API


def load(hf_dir: str | Path, mesh: jax.sharding.Mesh | None = None, rules=None) -> Llama:
    """The shardtrain Llama (Flax NNX) with the weights of a Hugging Face directory, sharded
    over `mesh` by the rule table (default: one device)."""
    from sharding import RULE_PRESETS, tree_shardings

    ckpt = Checkpoint(hf_dir)
    cfg = config_from_hf(ckpt.config, f"{ckpt.dir}/config.json")
    abstract_model = nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract_model)
    if mesh is None:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
        shardings = jax.tree.map(
            lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
            abstract_state,
        )
    else:
        shardings = tree_shardings(abstract_state, mesh, rules or RULE_PRESETS["default"])
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nnx.to_pure_dict(abstract_state), nnx.to_pure_dict(shardings),
    )  # fmt: skip
    params = load_params(ckpt, cfg, abstract)
    state = abstract_state
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def save(model: Llama, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write `model` as a Hugging Face directory (config.json + model.safetensors)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return save_params(params, model.cfg, out_dir, dtype)


# ---------------------------------------------------------------- training


def model_config(cfg):
    """`cfg` (engine Config) with the model shape of its --init_from_hf directory."""
    ckpt_cfg = Checkpoint(cfg.init_from_hf).config
    model = config_from_hf(ckpt_cfg, f"--init_from_hf={cfg.init_from_hf}/config.json")
    model = dataclasses.replace(model, remat=cfg.model.remat, attention=cfg.model.attention)
    return dataclasses.replace(cfg, model=model)


def restore_params(hf_dir: str | Path, run):
    """The directory's weights as `run`'s params: canonical layout, then this run's mesh."""
    from engine.checkpoint import Layout

    layout = Layout(run)
    abstract = layout.abstract.params
    params = load_params(Checkpoint(hf_dir), run.cfg.model, nnx.to_pure_dict(abstract))
    state = jax.tree.map(lambda x: x, abstract)  # a copy to fill
    nnx.replace_by_pure_dict(state, params)
    return layout.params_from_canonical(state)


# ---------------------------------------------------------------- command line


def _import(hf_dir: str, out: str) -> str:
    """HF directory -> a params export (OUT/params + OUT/config.json) for --init_from."""
    import orbax.checkpoint as ocp

    out_path = Path(out).absolute()
    if out_path.exists() and any(out_path.iterdir()):
        raise ConfigError(f"{out_path} exists and is not empty; pass a new directory.")
    model = load(hf_dir)
    params = nnx.state(model, nnx.Param)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out_path / "params", params)
    checkpointer.wait_until_finished()
    config = {"model": dataclasses.asdict(model.cfg)}
    (out_path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    count = sum(x.size for x in jax.tree.leaves(params))
    return f"imported {count / 1e6:.1f}M params to {out_path} (--init_from={out_path})"


def _export(source: str, out: str, dtype: str) -> str:
    from engine.checkpoint import load_model

    model, _ = load_model(source)
    save(model, out, dtype)
    return f"exported {source} to {out} as a Hugging Face Llama directory ({dtype})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.hf", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="HF directory -> params export for --init_from")
    imp.add_argument("hf_dir")
    imp.add_argument("out")
    exp = commands.add_parser("export", help="run directory or params export -> HF directory")
    exp.add_argument("source")
    exp.add_argument("out")
    exp.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default="float32")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            print(_import(args.hf_dir, args.out))
        else:
            print(_export(args.source, args.out, args.dtype))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
