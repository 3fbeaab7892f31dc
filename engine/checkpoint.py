"""Sharded, asynchronous checkpoints (orbax-checkpoint): save, resume, reshard, fall back.

`run_dir/checkpoints/<step>/` holds three items: `params` (model weights), `train` (step,
optimizer state, loss scale) and `meta` (JSON: step, data position, resolved config). Layer
weights are stored in the canonical [L, ...] layout whatever the pipeline split, and every leaf
is restored straight into the current mesh's sharding, so any mesh resumes any checkpoint and
each device reads only its own shards. orbax writes a step into a temporary directory and
renames it when complete; a step that cannot be read is skipped with a warning, never deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from engine.config import ConfigError
from engine.step import TrainState
from sharding import restage, stages_of, tree_shardings, unstage

# orbax keys the signals of a save ("step directory created", ...) by one process-wide
# operation id, so the saves of two managers in one process must not overlap (a tuner's
# parallel trials, in threads): a manager's save or restore waits for another's to complete.
_ORBAX = threading.Lock()
_saving = None  # the manager whose save may still be running in the background


@contextlib.contextmanager
def _orbax_turn(manager=None, saves: bool = False):
    global _saving
    with _ORBAX:
        if _saving is not None and _saving is not manager:
            _saving.wait_until_finished()
            _saving = None
        if saves:
            _saving = manager
        yield


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: TrainState
    path: Path
    callbacks: dict  # the loop's callbacks' states at this step (engine.callbacks)


def _abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _type_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
    """orbax's standard type handlers, with arrays written replica-parallel only when several
    processes share the writing. In one process it buys nothing (one host writes every slice)
    and costs a compiled slice per replica and shape: on 8 CPU devices the first save of `tiny`
    blocked the loop 3.05 s (72 compiles), later ones 0.12-0.18 s; without it 0.04 and 0.015 s."""
    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        *((ty, th.get_type_handler(ty)) for ty in th.supported_types())
    )
    default = th.get_type_handler(jax.Array)
    arrays = th.ArrayHandler(
        use_replica_parallel=jax.process_count() > 1,
        array_metadata_store=getattr(default, "_array_metadata_store", None),  # as the default
    )
    registry.add(jax.Array, arrays, override=True, ignore_warnings=True)
    return registry


def _train_item(state: TrainState) -> dict:
    item = {"step": state.step, "opt_state": state.opt_state}
    if state.loss_scale is not None:
        item["loss_scale"] = state.loss_scale
    return item


def _restore_args(abstract) -> ocp.args.PyTreeRestore:
    """Read a saved tree straight into the shardings of `abstract` (ShapeDtypeStructs)."""
    return ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)
    )


class Layout:
    """Converts a train state (or its params) between this run's layout and the canonical one
    checkpoints use, with the shardings of this run's mesh on both sides."""

    def __init__(self, run):
        stages, repeats = stages_of(run.mesh), run.plan.pipeline.repeats
        canonical = jax.eval_shape(unstage, run.state)
        shardings = tree_shardings(canonical, run.mesh, run.plan.rules)
        self.abstract = _abstract(canonical, shardings)
        self.to_canonical = self.state_from_canonical = self.params_from_canonical = _same
        if stages > 1:
            self.to_canonical = jax.jit(unstage, out_shardings=shardings)
            to_run = lambda t: restage(t, stages, repeats)  # noqa: E731
            self.state_from_canonical = jax.jit(to_run, out_shardings=run.state_shardings)
            self.params_from_canonical = jax.jit(to_run, out_shardings=run.state_shardings.params)


def _same(tree):
    return tree


class Checkpoints:
    """The checkpoints of one run, for the mesh and train state of `run` (engine.trainer.Run)."""

    def __init__(self, run):
        cfg = run.cfg.checkpoint
        self.directory = (Path(run.cfg.run_dir) / "checkpoints").absolute()
        self.config = run.cfg
        self.protected: set[int] = set()  # kept whatever the rotation says (the best step)
        keep = [ocp.checkpoint_managers.LatestN(cfg.keep or None), _Protected(self.protected)]
        if cfg.keep_period:
            keep.append(ocp.checkpoint_managers.EveryNSteps(cfg.keep_period))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(keep),
            enable_async_checkpointing=cfg.async_save,
            # Keep the loop's share of a save to the device-to-host snapshot.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=True),
            enable_background_delete=True,
            cleanup_tmp_directories=True,  # half-written steps from a killed run
        )
        # PyTree handlers, because only they let zstd be switched off (--checkpoint.compress);
        # the files are the same format StandardCheckpointer reads (load_model, export).
        types = _type_handlers()
        pytree = {"use_compression": cfg.compress, "type_handler_registry": types}
        handlers = {
            "params": ocp.PyTreeCheckpointHandler(**pytree),
            "train": ocp.PyTreeCheckpointHandler(**pytree),
            "meta": ocp.JsonCheckpointHandler(),
        }
        with _orbax_turn():
            self.manager = ocp.CheckpointManager(
                self.directory, options=options, item_handlers=handlers
            )
        self.layout = Layout(run)
        # Not stored: a resumed run uses the optimizer settings it is given now.
        # A copy: the step donates the state it is given, these buffers included.
        self.hyperparams = jax.tree.map(jnp.copy, run.state.hyperparams)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def protect(self, step: int, only: bool = False) -> None:
        """Keep `step` out of the rotation (`only`: instead of the steps protected so far)."""
        if only:
            self.protected.clear()
        self.protected.add(step)

    def save(self, step: int, state: TrainState, callbacks: dict | None = None) -> None:
        """Start saving `state` as `step`; it is written in the background (async_save)."""
        state = self.layout.to_canonical(state)
        meta = {
            "step": step,
            "data_position": step,
            "config": dataclasses.asdict(self.config),
            "callbacks": callbacks or {},
        }
        with _orbax_turn(self.manager, saves=True):
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.PyTreeSave(state.params),
                    train=ocp.args.PyTreeSave(_train_item(state)),
                    meta=ocp.args.JsonSave(meta),
                ),
                force=True,  # the caller decides when; orbax's own interval policy is unused
            )

    def restore_latest(self) -> Restored | None:
        """The newest checkpoint that reads back whole, resharded for this run; None if there
        are none. Unreadable ones are skipped with a warning and left on disk."""
        steps, errors = self.steps(), []
        for step in reversed(steps):
            try:
                state, meta = self._restore(step)
            except Exception as e:  # orbax/tensorstore raise many types for a bad file
                reason = _first_line(e)
                errors.append(f"{step} ({reason})")
                print(
                    f"warning: checkpoint {self.directory / str(step)} could not be read "
                    f"({reason}); trying the previous one.",
                    file=sys.stderr,
                )
                continue
            self._set_aside(s for s in steps if s > step)
            callbacks = meta.get("callbacks", {})
            return Restored(step, state, self.directory / str(step), callbacks)
        if steps:
            raise ConfigError(
                f"None of the checkpoints in {self.directory} could be restored for this config "
                f"(newest first: {'; '.join(errors)}); resume with the config that wrote them "
                "or use a new --run_dir."
            )
        return None

    def _set_aside(self, steps) -> None:
        """Rename unreadable newer checkpoints (kept for inspection, never deleted) so that
        the steps about to be re-run can be saved again."""
        steps = list(steps)
        if steps and jax.process_index() == 0:  # one process renames, the others wait
            for step in steps:
                path = self.directory / str(step)
                aside = path.with_name(f"{step}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
                path.rename(aside)
                print(f"warning: moved unreadable checkpoint {path} to {aside}", file=sys.stderr)
        if steps and jax.process_count() > 1:
            multihost_utils.sync_global_devices("shardtrain: unreadable checkpoints set aside")
        self.manager.reload()

    def _restore(self, step: int) -> tuple[TrainState, dict]:
        abstract = self.layout.abstract
        with _orbax_turn(self.manager):
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    params=_restore_args(abstract.params),
                    train=_restore_args(_train_item(abstract)),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        train = restored["train"]
        state = TrainState(
            train["step"],
            restored["params"],
            train["opt_state"],
            train.get("loss_scale"),
            jax.tree.map(jnp.copy, self.hyperparams),  # each restored state owns its own
        )
        return self.layout.state_from_canonical(state), restored["meta"]

    def restore_params(self, step: int):
        """The params of checkpoint `step`, in this run's layout and shardings."""
        abstract = self.layout.abstract.params
        with _orbax_turn(self.manager):
            restored = self.manager.restore(
                step, args=ocp.args.Composite(params=_restore_args(abstract))
            )
        return self.layout.params_from_canonical(restored["params"])

    def reached_preemption(self, step: int) -> bool:
        """JAX's multi-process preemption sync point (False in a single process)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        with _orbax_turn(self.manager):
            self.manager.close()


@dataclasses.dataclass
class _Protected:
    """orbax preservation policy: keep the steps in `steps` (a set the caller updates)."""

    steps: set[int]

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        return [c.step in self.steps for c in checkpoints]


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines() or [""]
    return f"{type(e).__name__}: {lines[0][:300]}"


def _step_dir(path: Path) -> Path:
    """A run directory's newest complete checkpoint (its best, when it ran with
    --early_stop.restore_best), or `path` itself."""
    if (path / "best.json").is_file():
        best = json.loads((path / "best.json").read_text())
        chosen = best.get("checkpoint") if best.get("restore_best") else None
        if chosen and (path / chosen).is_dir():
            return path / chosen
    if (path / "checkpoints").is_dir():
        steps = sorted(int(p.name) for p in (path / "checkpoints").iterdir() if p.name.isdigit())
        if not steps:
            raise ConfigError(f"{path}: the run has no complete checkpoint yet.")
        path = path / "checkpoints" / str(steps[-1])
    return path


def find_params(path: str | Path) -> Path:
    """The `params` item of a run directory (its newest checkpoint), a checkpoint step
    directory, or a params-only export."""
    path = Path(path).absolute()
    if not path.exists():
        raise ConfigError(f"{path} does not exist; pass a run directory or params export.")
    if (path / "metrics.jsonl").is_file() and not (path / "checkpoints").is_dir():
        raise ConfigError(
            f"{path} is a run directory without a checkpoint (it ran with --checkpoint.every=0 "
            "and --checkpoint.final=False); train it again with checkpoints kept."
        )
    path = _step_dir(path)
    if not (path / "params").is_dir():
        raise ConfigError(
            f"{path} is not a run directory, a checkpoint or a params export (there is no "
            "'params' in it); pass one of those."
        )
    return path / "params"


def load_model(path: str | Path):
    """The model of a run directory, checkpoint or params export (its newest params, on one
    device) and the config dict it was written with: inference and conversion."""
    from flax import nnx

    from engine.family import TASK_FAMILY
    from models.registry import family

    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{path} has no config.json; pass a run directory or params export.")
    config = json.loads(config_path.read_text())
    fam = family(TASK_FAMILY[config.get("task", "lm")])
    section = config["model"] if fam.sequence_model else config.get("classifier", {})
    abstract = nnx.eval_shape(lambda: fam.build(fam.arch(section), nnx.Rngs(0)))
    graphdef, target = nnx.split(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target)
    state = ocp.StandardCheckpointer().restore(find_params(path), target)
    return nnx.merge(graphdef, state), config


def restore_params(path: str | Path, run):
    """Params only (fine-tuning, inference), resharded for `run`'s mesh."""
    layout = Layout(run)
    try:
        params = ocp.StandardCheckpointer().restore(find_params(path), layout.abstract.params)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(
            f"--init_from={path}: its params do not fit this model ({_first_line(e)}); "
            "use the model config of the run that wrote them."
        ) from None
    return layout.params_from_canonical(params)


def export_params(source: str | Path, out: str | Path) -> Path:
    """Copy a checkpoint's params (fp32, canonical layout, so any mesh reads them) to
    `out/params`, with the run's resolved config as `out/config.json`. Bitwise, and no array
    passes through memory: the stored item is already what inference and conversion need."""
    step_dir, out = _step_dir(Path(source).absolute()), Path(out).absolute()
    meta_file = step_dir / "meta" / "metadata"
    if not (step_dir / "params").is_dir() or not meta_file.is_file():
        raise ConfigError(
            f"{source} is neither a run directory nor a checkpoint step directory "
            "(no params/ and meta/ in it); pass run_dir or run_dir/checkpoints/<step>."
        )
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; pass a new directory to export to.")
    meta = json.loads(meta_file.read_text())
    shutil.copytree(step_dir / "params", out / "params")
    # Model and training keys only: --config OUT/config.json must not point at the old run.
    config = {k: v for k, v in meta["config"].items() if k not in ("run_dir", "init_from")}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "export.json").write_text(json.dumps({"source": str(step_dir), "step": meta["step"]}))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.checkpoint",
        description="Checkpoint tools. `export SOURCE OUT`: params only, for inference, "
        "conversion or --init_from=OUT; SOURCE is a run directory (newest checkpoint) or "
        "one checkpoint step directory.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a params-only copy of a checkpoint")
    export.add_argument("source", help="run directory or run_dir/checkpoints/<step>")
    export.add_argument("out", help="new directory to write")
    args = parser.parse_args(argv)
    try:
        out = export_params(args.source, args.out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in (out / "params").rglob("*") if f.is_file())
    print(f"exported params ({size / 1e6:.1f} MB) to {out}; model config in {out}/config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
