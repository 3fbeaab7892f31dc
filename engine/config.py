"""Typed run configuration, presets, and the command line that overrides them.

`python -m engine.train --config PRESET_OR_FILE --section.key=value ...`: a preset (or a JSON/YAML
file of overrides) gives the starting values; flags override single keys. Parsing and type errors
come from tyro.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import typing
from pathlib import Path
from typing import Literal

import tyro

from engine.callbacks import EarlyStopConfig
from engine.optim import OptimConfig
from models import LLAMA_PRESETS, ClassifierConfig, LlamaConfig
from models.layers import ATTENTION, remat_policy
from sharding import MeshConfig, PipelineConfig, mesh_sizes
from sharding.context import STRATEGIES as CONTEXT_STRATEGIES


class ConfigError(ValueError):
    """Bad user input; the message names the value and how to fix it."""


class TrainingHalted(RuntimeError):
    """The run stopped itself (non-finite loss); the message names the step and what was kept."""


@dataclasses.dataclass(frozen=True)
class ModelConfig(LlamaConfig):
    """The architecture (models.LlamaConfig), and the execution-plan keys that live here on
    the command line (engine.plan.Plan.from_config collects them)."""

    remat: str = "none"
    """Activations recomputed in the backward pass: none, full, dots (keep matmul outputs),
    dots_no_batch (keep only weight-like matmul outputs), save:NAME,... (keep these)."""
    attention: str = "auto"
    """Attention kernel (models.layers.ATTENTION): xla (einsums), cudnn
    (jax.nn.dot_product_attention's fused kernel; GPU, bf16/fp16 only) or auto (cudnn where it
    runs, else xla: engine.plan.Plan.on)."""
    context_strategy: str = "all_gather"
    """How attention crosses a sequence split over --mesh.context (sharding.context):
    all_gather (gather keys and values; cheap with grouped-query attention) or ring (keys and
    values travel round the devices; nothing grows with the full length)."""
    context_load_balance: bool = True
    """Under --mesh.context: reorder each sequence so every device holds one early and one
    late chunk, and the causal mask gives all devices the same work."""
    loss_chunks: int = 1
    """Training: run the output layer and loss over this many pieces of the sequence, each
    recomputed in the backward pass, so [batch, length, vocab] logits never exist at once
    (large vocabularies: less memory for one more output-layer matmul)."""
    scan_unroll: int = 1
    """Layers per iteration of the loop over layers: 1 = one compiled layer for any depth;
    N = N layers unrolled in each iteration; 0 = no loop, every layer compiled in place (no
    stacked activation buffers: `default` steps about 1.2x faster on 2 CPU cores, 12 % less
    memory; `small` 1.35x and 35 % less memory on an H100; compile time grows with depth;
    under remat XLA:CPU may recompute early and hold more, so there the planner's remat plans
    keep the loop). Weights and checkpoints are the same."""

    @property
    def arch(self) -> LlamaConfig:
        """The architecture alone."""
        return LlamaConfig(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(LlamaConfig)}
        )

    @classmethod
    def of(cls, arch: LlamaConfig, **plan_keys) -> ModelConfig:
        return cls(**dataclasses.asdict(arch), **plan_keys)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "embedded"
    """lm tokens: 'embedded' (Python's stdlib source), a token file NAME.bin (+ NAME.json), or
    Parquet/JSONL text shards: a file, glob or directory, local or any fsspec URL."""
    tokenizer: str = "byte"
    """For text shards: 'byte' (UTF-8 bytes) or a Hugging Face tokenizer.json path."""
    eos_id: int | None = None
    """End-of-document token id; default: the tokenizer's own (0 for 'byte')."""
    text_field: str = "text"
    """The column (Parquet) or key (JSONL) that holds each document's text."""
    cache_dir: str = ""
    """Where tokenized text shards are kept; default ~/.cache/shardtrain/tokens."""
    seq_len: int = 128
    """Tokens per training sequence (language modelling)."""
    eval_batches: int = 8
    """Held-out batches of `batch_size` per evaluation (lm; digits always uses all of val).
    Token files and text shards hold out their last tokens for this."""
    prefetch: int = 4
    """Batches built ahead by background threads, so the devices never wait; 0 = in the loop."""
    document_mask: bool = False
    """Packed documents attend only to themselves (segment ids cut at each end-of-document
    token); off: attention crosses document boundaries, as GPT-style packing does."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0
    """Save every N steps and at the end, in run_dir/checkpoints/<step>; 0 = off. A run whose
    run_dir holds checkpoints resumes from the newest complete one either way."""
    keep: int = 3
    """Newest checkpoints kept; 0 = all."""
    keep_period: int = 0
    """Also keep every checkpoint whose step is a multiple of this, forever; 0 = none."""
    async_save: bool = True
    """Write in the background while training continues."""
    final: bool = True
    """Also save when the run ends or is stopped (even with every=0), so a run that trained
    always keeps its state; False: keep only what `every` saves."""
    compress: bool = False
    """zstd-compress the checkpoint's chunks (orbax's default): on a 3 GB train state 14 %
    smaller files for twice the save time (benchmarks/checkpoint_io.py), so off unless disk
    space is short. Either kind restores the same."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator_address: str = ""
    """host:port of process 0 (jax.distributed.initialize); empty: single process, or
    auto-detected under SLURM / Open MPI (srun, mpirun)."""
    num_processes: int = 0
    """Processes in the run; 0 = from the cluster environment."""
    process_id: int = -1
    """This process's index, 0..num_processes-1; -1 = from the cluster environment."""
    heartbeat_timeout_s: int = 60
    """A peer silent this long is declared dead and every process exits non-zero."""
    initialization_timeout_s: int = 300
    """How long to wait for all processes to connect at start-up."""


@dataclasses.dataclass(frozen=True)
class DebugConfig:
    nan_steps: tuple[int, ...] = ()
    """Fault injection for tests: steps (1-based) whose batch gets a NaN in its loss mask."""


@dataclasses.dataclass(frozen=True)
class LogConfig:
    every: int = 1
    """Write a metrics.jsonl line (and TensorBoard scalars) every N steps."""
    summary_every: int = 50
    """Print a one-line summary every N steps."""
    progress: bool = True
    """Show a progress bar on terminals; elsewhere (CI, nohup, notebooks) a line every
    progress_every_s seconds."""
    progress_every_s: float = 10.0
    """Without a terminal: seconds between progress lines."""
    tensorboard: bool = True
    """Write TensorBoard event files into run_dir."""
    profile_from: int = 0
    """Trace steps profile_from .. profile_from+profile_steps-1 with jax.profiler into
    run_dir/plugins/profile (TensorBoard's profile tab) and print where the time went; 0 = off.
    Process 0 only; skip the first steps, which include compilation and warm-up."""
    profile_steps: int = 3
    """Steps in the profiler trace."""
    plot: bool = False
    """Write run_dir/curves.png (loss, eval loss, throughput, MFU, memory against step;
    engine.plot) when the run ends."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Train a model with shardtrain."""

    task: Literal["lm", "digits"] = "lm"
    """lm: Llama language model on --data.source; digits: MLP on 8x8 handwritten digits."""
    model: ModelConfig = ModelConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    mesh: MeshConfig = MeshConfig()
    pipeline: PipelineConfig = PipelineConfig()
    rules: str = "default"
    """Rule table mapping logical axis names to mesh axes: a preset (default, no_zero3) or a
    .json/.yaml file of logical name -> list of mesh axes (names it omits keep the default)."""
    rule_overrides: tuple[str, ...] = ()
    """NAME=AXIS,AXIS entries on top of --rules, e.g. `embed=fsdp vocab=` (empty: never split)."""
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    early_stop: EarlyStopConfig = EarlyStopConfig()
    log: LogConfig = LogConfig()
    distributed: DistributedConfig = DistributedConfig()
    steps: int = 300
    """Optimizer steps to train."""
    seed: int = 0
    """Seed of the initialization and of the data order."""
    run_dir: str = "runs/default"
    """Where metrics.jsonl, config.json and TensorBoard events go."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """fp32; bf16 (fp32 params/optimizer, bf16 compute); fp16 (+ dynamic loss scaling)."""
    batch_size: int = 32
    """Global batch in sequences (or images), across all devices."""
    eval_every: int = 50
    """Evaluate every N steps and at the end; 0 = only at the end."""
    peak_flops: float | None = None
    """Peak FLOP/s per device for MFU; None = the device's datasheet bf16 peak (null on CPU)."""
    compile_cache: str = "~/.cache/shardtrain/xla"
    """Command line only: JAX's persistent compilation cache, so a restart or resume of the same
    program loads it instead of compiling again; empty = off. Left at its default, JAX's own
    JAX_COMPILATION_CACHE_DIR takes its place when set."""
    nan_policy: Literal["halt", "skip"] = "halt"
    """A step with a non-finite loss or gradient: halt (stop, exit 3, keep the last good
    checkpoint) or skip (drop its update, count it; halt after nan_skip_limit in a row)."""
    nan_skip_limit: int = 5
    """With nan_policy=skip: consecutive skipped steps that halt the run."""
    init_from: str | None = None
    """Start from these params (a run directory, a checkpoint step directory or a params
    export) with a fresh optimizer and step 0: fine-tuning."""
    init_from_hf: str | None = None
    """Start from a Hugging Face Llama-family directory's weights; its config.json sets the
    architecture (every execution-plan key, e.g. --model.remat, still applies)."""
    debug: DebugConfig = DebugConfig()

    def compile_cache_dir(self) -> str | None:
        """Where the command line keeps compiled programs (--compile_cache); None = nowhere."""
        given = self.compile_cache
        if given == Config.compile_cache and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
            return os.environ["JAX_COMPILATION_CACHE_DIR"]
        return os.path.expanduser(given) if given else None

    def replace(self, **changes) -> Config:
        """A copy with these keys changed, as the command line would change them; a section
        takes a dict of its keys: `cfg.replace(steps=100, mesh={"fsdp": 8}, optim={"lr": 1e-3})`.
        """
        cfg = self
        for dotted, value in _dotted(changes):
            if dotted not in _config_keys(Config):
                raise ConfigError(f"'{dotted}' is not a config key{unknown_key_hint(dotted)}")
            cfg = replace_key(cfg, dotted, value)
        return cfg


def _dotted(changes: dict, prefix: str = ""):
    """Nested dict -> (dotted key, value) pairs: {'optim': {'lr': 1}} -> ('optim.lr', 1)."""
    for key, value in changes.items():
        if isinstance(value, dict):
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


PRESETS: dict[str, Config] = {
    # CPU tests: a 2-layer model, well under a second a step on 8 virtual devices.
    "tiny": Config(
        model=ModelConfig.of(LLAMA_PRESETS["tiny"]),
        steps=20,
        batch_size=16,
        data=DataConfig(seq_len=64, eval_batches=2),
        run_dir="runs/tiny",
        eval_every=0,
    ),
    # Quick start: 0.85M-param byte-level Llama; validation loss falls from 5.5 (uniform) to
    # ~1.71 (2.5 bits per byte) in 300 steps, about 2 minutes on 2 CPU cores. Its 4 layers are
    # unrolled: 1.2x faster steps for 1 s more compile (benchmarks/RESULTS.md, 2026-11-26).
    "default": Config(model=ModelConfig(scan_unroll=0), checkpoint=CheckpointConfig(every=100)),
    # Vision: MLP on 8x8 digits; ~98.6% validation accuracy after 500 steps (~5 s on CPU).
    "digits": Config(
        task="digits",
        steps=500,
        batch_size=64,
        run_dir="runs/digits",
        eval_every=100,
        optim=OptimConfig(lr=1e-3, warmup_steps=20, weight_decay=1e-4),
    ),
    # Mixture-of-Experts on the quick-start data: `default`'s active parameters per token in 8
    # experts, two per token (models.LLAMA_PRESETS["moe"]); validation loss ~1.7 in 300 steps.
    "moe": Config(
        model=ModelConfig.of(LLAMA_PRESETS["moe"]),
        checkpoint=CheckpointConfig(every=100),
        run_dir="runs/moe",
    ),
    # Mixtral 8x7B shapes in bf16 at 4k context, fully rematerialized: whole experts over
    # --mesh.expert, the rest ZeRO-3 over fsdp (engine.plan compiles it ahead of time).
    "mixtral_8x7b": Config(
        model=ModelConfig.of(LLAMA_PRESETS["mixtral_8x7b"], remat="full"),
        precision="bf16",
        batch_size=16,
        steps=200,
        checkpoint=CheckpointConfig(every=50),
        run_dir="runs/mixtral_8x7b",
        data=DataConfig(seq_len=4096, eval_batches=2),
        eval_every=0,
        mesh=MeshConfig(data=1, fsdp=-1, expert=8),
        optim=OptimConfig(lr=3e-4, warmup_steps=20),
    ),
    # ~125M params, 32k vocabulary, bf16 at 1k context: one GPU, or the memory benchmark. Its 12
    # layers are unrolled: steps 1.35x faster on one H100 (17 GB instead of 26 GB), 1.22x on 2
    # CPU cores, for 4-5 s more compile (benchmarks/RESULTS.md, 2026-11-27).
    "small": Config(
        model=ModelConfig.of(LLAMA_PRESETS["small"], scan_unroll=0),
        precision="bf16",
        batch_size=32,
        steps=1000,
        checkpoint=CheckpointConfig(every=250),
        run_dir="runs/small",
        data=DataConfig(seq_len=1024, eval_batches=4),
        eval_every=0,
        optim=OptimConfig(lr=6e-4, warmup_steps=100),
    ),
    # Llama 3.2 1B shapes in bf16 at 2k context: a GPU/TPU run, not for CPU. Unrolled: on one
    # H100 51.4 % MFU against 47.0 % with the layer loop, same memory, 6.5 s more compile.
    "1b": Config(
        model=ModelConfig.of(LLAMA_PRESETS["1b"], remat="dots_no_batch", scan_unroll=0),
        precision="bf16",
        batch_size=8,
        steps=200,
        checkpoint=CheckpointConfig(every=50),
        run_dir="runs/1b",
        data=DataConfig(seq_len=2048, eval_batches=2),
        eval_every=0,
        optim=OptimConfig(lr=3e-4, warmup_steps=20),
    ),
    # Llama 3 8B shapes in bf16 at 4k context, fully rematerialized: needs FSDP over many devices.
    "8b": Config(
        model=ModelConfig.of(LLAMA_PRESETS["8b"], remat="full"),
        precision="bf16",
        batch_size=8,
        steps=200,
        checkpoint=CheckpointConfig(every=50),
        run_dir="runs/8b",
        data=DataConfig(seq_len=4096, eval_batches=2),
        eval_every=0,
        mesh=MeshConfig(data=1, fsdp=-1),
        optim=OptimConfig(lr=3e-4, warmup_steps=20),
    ),
}

# Long context: `1b` at 32k tokens per sequence, the sequence split over 8 devices
# (--mesh.context=8, ring attention, load-balanced; weights ZeRO-split over them), fully
# rematerialized, the 128k-vocabulary loss in 16 chunks, in the layer loop (unrolled under remat,
# XLA may recompute early and hold more). benchmarks/context.py compiles it ahead of time
# (python -m engine.plan --config 1b_32k --target.devices 8 prices it).
PRESETS["1b_32k"] = dataclasses.replace(
    PRESETS["1b"],
    model=dataclasses.replace(
        PRESETS["1b"].model,
        remat="full",
        context_strategy="ring",
        loss_chunks=16,
        scan_unroll=1,
    ),
    batch_size=2,
    run_dir="runs/1b_32k",
    data=DataConfig(seq_len=32_768, eval_batches=1),
    mesh=MeshConfig(data=1, context=8),
)


def _flags(overrides: dict) -> list[str]:
    """Nested dict -> ['--a.b=value', ...], so file overrides go through the same typed parser."""
    flags = []
    for dotted, value in _dotted(overrides):
        if isinstance(value, list):  # tuple fields: the flag, then its values (maybe none)
            flags += [f"--{dotted}", *map(str, value)]
        else:
            flags.append(f"--{dotted}={'None' if value is None else value}")
    return flags


def _config_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass, e.g. 'optim.lr'."""
    keys = []
    for field in dataclasses.fields(cls):
        kind = field.type if isinstance(field.type, type) else None
        default = field.default
        if dataclasses.is_dataclass(default):
            keys += _config_keys(type(default), f"{prefix}{field.name}.")
        elif kind is None or not dataclasses.is_dataclass(kind):
            keys.append(prefix + field.name)
    return keys


def unknown_key_hint(dotted: str) -> str:
    """'; did you mean ...?' for a key that is not a config key."""
    close = difflib.get_close_matches(dotted, _config_keys(Config), n=1)
    return f"; did you mean '{close[0]}'?" if close else "; see --help for the keys."


def key_type(dotted: str):
    """The declared type of config key `dotted` ('optim.lr' -> float); KeyError if none."""
    if dotted not in _config_keys(Config):
        raise KeyError(dotted)
    cls, *sections, name = [Config, *dotted.split(".")]
    for section in sections:
        cls = type(getattr(cls(), section))
    return typing.get_type_hints(cls)[name]


def replace_key(cfg: Config, dotted: str, value) -> Config:
    """`cfg` with config key `dotted` set to `value`."""
    head, _, rest = dotted.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: replace_key(getattr(cfg, head), rest, value)})


def _check_keys(overrides: dict, name: str) -> None:
    known = _config_keys(Config)
    for dotted, _ in _dotted(overrides):
        if dotted not in known:
            hint = unknown_key_hint(dotted)
            raise ConfigError(f"Config file '{name}' has an unknown key '{dotted}'{hint}")


def _file_flags(name: str) -> list[str]:
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"Config file '{name}' does not exist; pass an existing file path.")
    import yaml  # YAML is a superset of JSON: one parser for both

    try:
        overrides = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"Config file '{name}' is not valid JSON/YAML ({e}).") from None
    if not isinstance(overrides, dict):
        raise ConfigError(f"Config file '{name}' must hold a mapping of config keys.")
    _check_keys(overrides, name)
    return _flags(overrides)


def _base(names: list[str]) -> tuple[Config, list[str]]:
    """The first --config may be a preset; every .json/.yaml file after it (or alone, over
    the defaults) applies its keys on top, in order."""
    base, flags = Config(), []
    for i, name in enumerate(names):
        if name in PRESETS and i == 0:
            base = PRESETS[name]
        elif Path(name).suffix in (".json", ".yaml", ".yml"):
            flags += _file_flags(name)
        elif name in PRESETS:
            raise ConfigError(
                f"--config {name} comes after another --config; only the first may be a preset "
                "(put it first, files after it)."
            )
        else:
            raise ConfigError(
                f"Unknown preset '{name}'; use one of {', '.join(PRESETS)} or a .json/.yaml file."
            )
    return base, flags


def _split_configs(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """(the --config names in order, the other arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            names.append(argv[i + 1])
            i += 2
            continue
        if argv[i].startswith("--config="):
            names.append(argv[i].split("=", 1)[1])
        elif argv[i] == "--mesh.auto":  # a switch (other booleans take a value)
            rest.append("--mesh.auto=True")
        else:
            rest.append(argv[i])
        i += 1
    return names, rest


def split_flags(
    argv: list[str], own: tuple[str, ...], switches: tuple[str, ...] = ()
) -> tuple[list[str], list[str]]:
    """(the flags starting with one of `own`, with their values; the rest: config flags) for
    commands that take config keys next to their own (engine.plan, engine.tune). A bare
    switch in `switches` becomes `--switch=True`."""
    mine, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(own):
            mine.append(f"{arg}=True" if arg in switches else arg)
            takes_value = "=" not in arg and arg not in (*switches, "--help", "-h")
            if takes_value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                mine.append(argv[i + 1])
                i += 1
        else:
            rest.append(arg)
        i += 1
    return mine, rest


def explicit_keys(argv: list[str] | None = None) -> set[str]:
    """The dotted config keys `argv` sets itself, on the command line or in --config files
    (a preset's values are defaults, not choices): what --mesh.auto must keep."""
    names, rest = _split_configs(argv)
    _, file_flags = _base(names or ["default"])
    return {f[2:].split("=", 1)[0] for f in file_flags + rest if f.startswith("--")}


def parse_args(argv: list[str] | None = None) -> Config:
    """Resolve `--config` (a preset and/or files, in order), then apply the remaining flags."""
    names, rest = _split_configs(argv)
    base, file_flags = _base(names or ["default"])
    description = (
        "Train a model with shardtrain.\n\n"
        f"--config PRESET_OR_FILE  one of: {', '.join(PRESETS)}; or a .json/.yaml file of "
        "overrides (e.g. a run's config.json); several apply in order (--config tiny "
        "--config mine.yaml). Flags below override single keys."
    )
    flags = file_flags + rest
    cfg = tyro.cli(
        Config,
        default=base,
        args=flags,
        prog="python -m engine.train",
        description=description,
        use_underscores=True,
        config=(tyro.conf.FlagConversionOff,),
    )
    # --mesh.data=-1 is only the default fill: another axis set to -1 takes the fill over.
    others = [a for a in mesh_sizes(cfg.mesh) if a != "data"]
    if cfg.mesh.data == -1 and any(getattr(cfg.mesh, a) == -1 for a in others):
        if not any(f.startswith("--mesh.data") for f in flags):
            cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=1))
    return cfg


def config_warnings(cfg: Config) -> list[str]:
    """Settings that run but are probably not what was meant."""
    warnings = []
    if cfg.optim.warmup_steps >= cfg.steps:
        warnings.append(
            f"--optim.warmup_steps={cfg.optim.warmup_steps} is not below --steps={cfg.steps}: "
            "the learning rate only warms up (reaching its peak at the last step) and never "
            "decays."
        )
    if cfg.early_stop.patience and not cfg.eval_every:
        warnings.append(
            f"--early_stop.patience={cfg.early_stop.patience} with --eval_every=0: the run "
            "evaluates only at its end, so it never stops early; set --eval_every."
        )
    return warnings


def config_errors(cfg: Config) -> list[ConfigError]:
    """Every value no run can use, each naming its flag; checks against the mesh and the
    model's shapes are engine.plan.violations'."""
    errors = []
    positive = {
        "--steps": cfg.steps,
        "--batch_size": cfg.batch_size,
        "--data.seq_len": cfg.data.seq_len,
        "--log.every": cfg.log.every,
        "--log.summary_every": cfg.log.summary_every,
        "--log.profile_steps": cfg.log.profile_steps,
        "--optim.microbatches": cfg.optim.microbatches,
        "--data.eval_batches": cfg.data.eval_batches,
        "--pipeline.repeats": cfg.pipeline.repeats,
        "--nan_skip_limit": cfg.nan_skip_limit,
        "--model.loss_chunks": cfg.model.loss_chunks,
    }
    non_negative = {
        "--eval_every": cfg.eval_every,
        "--checkpoint.every": cfg.checkpoint.every,
        "--optim.lr": cfg.optim.lr,
        "--optim.clip_norm": cfg.optim.clip_norm,
        "--pipeline.microbatches": cfg.pipeline.microbatches,
        "--checkpoint.keep": cfg.checkpoint.keep,
        "--checkpoint.keep_period": cfg.checkpoint.keep_period,
        "--data.prefetch": cfg.data.prefetch,
        "--log.profile_from": cfg.log.profile_from,
        "--early_stop.patience": cfg.early_stop.patience,
        "--early_stop.min_delta": cfg.early_stop.min_delta,
        "--model.scan_unroll": cfg.model.scan_unroll,
    }
    for flag, value in positive.items():
        if value <= 0:
            errors.append(ConfigError(f"{flag}={value} must be positive."))
    for flag, value in non_negative.items():
        if value < 0:
            errors.append(ConfigError(f"{flag}={value} must not be negative."))
    stop = cfg.early_stop
    if stop.enabled and not stop.metric.startswith("eval_"):
        errors.append(ConfigError(
            f"--early_stop.metric={stop.metric} is not an evaluation; use an eval_* key such as "
            "eval_loss or eval_accuracy."
        ))  # fmt: skip
    if stop.restore_best and not (cfg.checkpoint.every or cfg.checkpoint.final):
        errors.append(ConfigError(
            "--early_stop.restore_best needs checkpoints to keep the best params in; set "
            "--checkpoint.every or leave --checkpoint.final=True."
        ))  # fmt: skip
    errors += _moe_errors(cfg.model)
    try:
        remat_policy(cfg.model.remat)
    except ValueError as e:
        errors.append(ConfigError(str(e)))
    if cfg.model.attention not in (*ATTENTION, "auto"):
        errors.append(ConfigError(
            f"--model.attention={cfg.model.attention} is not an attention kernel; use auto or "
            f"one of {', '.join(ATTENTION)}."
        ))  # fmt: skip
    if cfg.model.context_strategy not in CONTEXT_STRATEGIES:
        errors.append(ConfigError(
            f"--model.context_strategy={cfg.model.context_strategy} is not a context-parallel "
            f"strategy; use one of {', '.join(CONTEXT_STRATEGIES)}."
        ))  # fmt: skip
    chunks = cfg.model.loss_chunks
    if cfg.task == "lm" and chunks > 0 and cfg.data.seq_len > 0 and cfg.data.seq_len % chunks:
        errors.append(ConfigError(
            f"--model.loss_chunks={chunks} does not divide --data.seq_len={cfg.data.seq_len}; "
            "use a divisor of the sequence length."
        ))  # fmt: skip
    return errors


def _moe_errors(model: ModelConfig) -> list[ConfigError]:
    moe = model.moe
    if not moe.experts:
        return []
    errors = []
    for key in ("experts", "d_ff", "shared_experts"):
        if getattr(moe, key) < 0:
            errors.append(
                ConfigError(f"--model.moe.{key}={getattr(moe, key)} must not be negative.")
            )
    if not 1 <= moe.top_k <= moe.experts:
        errors.append(ConfigError(
            f"--model.moe.top_k={moe.top_k} must be between 1 and --model.moe.experts="
            f"{moe.experts}; route each token to at most as many experts as there are."
        ))  # fmt: skip
    if moe.capacity_factor is not None and moe.capacity_factor <= 0:
        errors.append(ConfigError(
            f"--model.moe.capacity_factor={moe.capacity_factor} must be positive; use e.g. "
            "1.25, or None for dropless routing."
        ))  # fmt: skip
    if moe.every < 1 or model.n_layers % moe.every:
        errors.append(ConfigError(
            f"--model.moe.every={moe.every} does not divide --model.n_layers={model.n_layers}; "
            "use a divisor of the layer count (1 = every layer is MoE)."
        ))  # fmt: skip
    return errors


def validate(cfg: Config) -> None:
    """Raise the first of `config_errors`."""
    errors = config_errors(cfg)
    if errors:
        raise errors[0]
