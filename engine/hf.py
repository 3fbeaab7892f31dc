"""Hugging Face interop: directories (config.json + safetensors) of any registered family
(models.registry: llama, mistral, qwen2, qwen3, mixtral, qwen3_moe) in and out.

    from engine import hf
    model = hf.load("path/to/Llama-3.2-1B")        # Flax NNX module; model(tokens) -> logits
    hf.save(model, "out/")                         # a directory transformers loads

    python -m engine.hf import HF_DIR OUT          # -> a params export: --init_from=OUT
    python -m engine.hf export RUN_OR_EXPORT OUT   # newest checkpoint -> HF directory

Tensors are read by memmap and placed one at a time, each device receiving only its shard, so a
host never holds a second copy of the model. Names and layouts come from the family's tensor
table (e.g. models/llama_hf.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import string
import struct
import sys
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from engine.config import ConfigError
from models.registry import FAMILIES, ModelFamily

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


# ---------------------------------------------------------------- config and tensor names


def family_of(c: dict, where: str = "config.json") -> ModelFamily:
    """The registered family of a Hugging Face config's model_type."""
    kind = c.get("model_type")
    fam = FAMILIES.get(kind)
    if fam is None or fam.from_hf is None:
        hf_kinds = sorted(k for k, f in FAMILIES.items() if f.from_hf is not None)
        raise ConfigError(
            f"{where}: model_type '{kind}' is not supported; shardtrain imports "
            f"{', '.join(hf_kinds)} (without sliding windows)."
        )
    return fam


def config_from_hf(c: dict, where: str = "config.json"):
    """The architecture config of a Hugging Face config.json, or a ConfigError naming the
    field shardtrain does not support."""
    try:
        return family_of(c, where).from_hf(c, where)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _family(cfg) -> ModelFamily:
    """The registered family whose Hugging Face layout holds `cfg`."""
    for fam in FAMILIES.values():
        if isinstance(cfg, fam.config) and fam.tensors and fam.holds(cfg):
            return fam
    raise ConfigError(
        "No Hugging Face model type holds this architecture (e.g. --model.moe.every > 1, "
        "shared experts, a capacity factor, or q/k/v biases with q/k norms); export supports "
        "what engine.hf imports."
    )


def _indices(template: str) -> list[str]:
    """The index fields of a name template, in order: 'a.{layer}.b' -> ['layer']."""
    return [field for _, field, _, _ in string.Formatter().parse(template) if field]


def _table(path, cfg) -> tuple[str, int, Any, Any]:
    """(template, stacked leading dims, HF -> ours, ours -> HF) of one of our params."""
    template, to_ours, to_hf = _family(cfg).tensors[path]
    return template, len(_indices(template)), to_ours, to_hf


def _hf_shape(path, ours_shape, cfg) -> tuple:
    """The HF tensor's shape for one of our params (one layer's, for stacked ones)."""
    _, stacked, _, to_hf = _table(path, cfg)
    # Traced, not run: a real array of the embedding's size just to read a shape is waste.
    shape = ours_shape[stacked:]
    return jax.eval_shape(lambda w: to_hf(w, cfg), jax.ShapeDtypeStruct(shape, np.int8)).shape


def _names(path, shape, cfg):
    """(HF name, index into our stacked leading dims) for every HF tensor of one param."""
    template, stacked, _, _ = _table(path, cfg)
    fields = _indices(template)
    for index in itertools.product(*(range(n) for n in shape[:stacked])):
        yield template.format(**dict(zip(fields, index, strict=True))), index


def _key(path) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", p)) for p in path)


def load_params(ckpt: Checkpoint, cfg, abstract):
    """Params for `abstract` (a pure-dict tree of ShapeDtypeStructs with shardings), read from
    `ckpt` tensor by tensor; each device gets only its shard."""

    def place(path, leaf):
        path = _key(path)
        index = leaf.sharding.addressable_devices_indices_map(leaf.shape)
        shards = {d: np.empty(_shard_shape(leaf.shape, i), leaf.dtype) for d, i in index.items()}
        _, stacked, to_ours, _ = _table(path, cfg)
        hf_shape = _hf_shape(path, leaf.shape, cfg)
        for name, at in _names(path, leaf.shape, cfg):
            value = to_ours(ckpt.get(name, hf_shape), cfg)
            for d, i in index.items():
                spans = [
                    range(*s.indices(n)) for s, n in zip(i[:stacked], leaf.shape, strict=False)
                ]
                if all(k in r for k, r in zip(at, spans, strict=True)):
                    local = tuple(k - r.start for k, r in zip(at, spans, strict=True))
                    shards[d][local] = value[i[stacked:]]
        arrays = [jax.device_put(shards[d], d) for d in index]
        return jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, arrays)

    return jax.tree_util.tree_map_with_path(place, abstract)


def _shard_shape(shape, index) -> tuple:
    return tuple(len(range(*s.indices(n))) for s, n in zip(index, shape, strict=True))


def hf_tensors(params, cfg) -> dict[str, tuple]:
    """HF tensor name -> (HF shape, our leaf, index into its stacked dims, ours -> HF) for a
    pure-dict param tree in the canonical layout (leaves may be arrays or ShapeDtypeStructs)."""
    tensors = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        path = _key(path)
        shape, (_, _, _, to_hf) = _hf_shape(path, leaf.shape, cfg), _table(path, cfg)
        for name, index in _names(path, leaf.shape, cfg):
            tensors[name] = (shape, leaf, index, to_hf)
    return tensors


def save_params(params: dict, cfg, out: str | Path, dtype: str = "float32") -> Path:
    """Write a pure-dict param tree (canonical layout) as a Hugging Face directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np_dtype = EXPORT_DTYPES[dtype]
    tensors = hf_tensors(params, cfg)

    def fetch(name):
        _, leaf, index, to_hf = tensors[name]
        value = np.asarray(leaf[index])  # one tensor gathered
        return to_hf(value, cfg).astype(np.float32).astype(np_dtype)

    shapes = {name: (t[0], np_dtype) for name, t in tensors.items()}
    write_safetensors(out / "model.safetensors", shapes, fetch)
    config = _family(cfg).to_hf(cfg, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


# ---------------------------------------------------------------- the model API


def load(hf_dir: str | Path, mesh: jax.sharding.Mesh | None = None, rules=None) -> nnx.Module:
    """The shardtrain model (Flax NNX) with the weights of a Hugging Face directory, sharded
    over `mesh` by the rule table (default: one device)."""
    from sharding import RULE_PRESETS, tree_shardings

    ckpt = Checkpoint(hf_dir)
    where = f"{ckpt.dir}/config.json"
    fam = family_of(ckpt.config, where)
    cfg = config_from_hf(ckpt.config, where)
    abstract_model = nnx.eval_shape(lambda: fam.build(cfg, nnx.Rngs(0)))
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


def save(model: nnx.Module, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write `model` as a Hugging Face directory (config.json + model.safetensors)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return save_params(params, model.cfg, out_dir, dtype)


# ---------------------------------------------------------------- training


def model_config(cfg):
    """`cfg` (engine Config) with the architecture of its --init_from_hf directory; every
    execution-plan key (remat, attention, loss chunks, ...) stays as given."""
    ckpt_cfg = Checkpoint(cfg.init_from_hf).config
    arch = config_from_hf(ckpt_cfg, f"--init_from_hf={cfg.init_from_hf}/config.json")
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, **dataclasses.asdict(arch))
    )


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

    out_path = Path(out).absolute()
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())):
        raise ConfigError(
            f"{out_path} exists and is not empty; pass a new directory to export to (nothing "
            "there was changed)."
        )
    model, _ = load_model(source)
    save(model, out, dtype)
    return f"exported {source} to {out} as a Hugging Face directory ({dtype})"


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
