"""The open core: mesh axes as data, plans, runtime hyperparameters, callbacks, layer aux
values, every fault of a plan at once, and bits per byte for any tokenizer."""

import dataclasses
import json
import math
import os
import platform
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import cli

from engine.config import CheckpointConfig, ConfigError, DataConfig
from engine.optim import OptimConfig
from engine.plan import Plan, violations
from engine.setup import StepCache, setup
from engine.trainer import Callback, Trainer, evaluate, train
from models.layers import FEED_FORWARD, SwiGLU
from sharding import AXES, MeshAxis, MeshConfig, default_rules


def losses(records):
    return [r["loss"] for r in records]


def test_a_mesh_axis_declared_as_data_trains_like_one_device(tiny):
    """`replica`, declared here and nowhere in the engine, splits the batch: one entry."""
    replica = MeshAxis("replica", "test: another batch axis", shards=("batch",), leads=("batch",))
    axes = (*AXES, replica)
    cfg = tiny(steps=4)
    plan = Plan.from_config(
        cfg, axes=axes, rules=default_rules(axes), mesh={"replica": 4, "fsdp": 2}
    )
    run = setup(cfg, plan=plan)
    assert dict(run.mesh.shape) == {**{a.name: 1 for a in AXES}, "fsdp": 2, "replica": 4}
    # The batch rows split 8 ways (replica outermost), the embed dimension of weights 2 ways.
    inputs = run.put_batch(run.task.train_batch(0))["inputs"]
    assert {s.data.shape for s in inputs.addressable_shards} == {(16 // 8, 64)}
    wq = run.state.params["layers"]["wq"][...]
    assert {s.data.shape for s in wq.addressable_shards} == {(2, 64 // 2, 8, 8)}
    sharded = Trainer(cfg, run=run).fit()
    one = train(tiny(mesh=dict(data=1), steps=4), jax.devices()[:1])
    np.testing.assert_allclose(losses(sharded), losses(one), rtol=1e-5)


def test_runs_that_differ_only_in_optimizer_scalars_share_one_executable(tmp_path):
    """The compiled step takes lr, warmup, betas, weight decay and clipping as inputs: a
    second run with other values adds nothing to the persistent compilation cache, while a
    change of shape does."""
    cache = tmp_path / "xla"

    def run(name, *flags):
        done = cli("--config", "tiny", "--steps=2", f"--run_dir={tmp_path / name}",
                   f"--compile_cache={cache}", *flags)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return {p.name for p in cache.iterdir()}

    first = run("a", "--optim.lr=1e-3")
    assert len(first) >= 2  # train and eval steps at least
    second = run("b", "--optim.lr=3e-2", "--optim.warmup_steps=1", "--optim.b2=0.99",
                 "--optim.weight_decay=0", "--optim.clip_norm=0.5")  # fmt: skip
    assert second == first
    third = run("c", "--batch_size=8")
    assert third > first
    # And the second run really used its values.
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "b/metrics.jsonl").open()]
    assert lrs == pytest.approx([0.0, 3e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(0)))])


def test_changing_lr_keeps_the_compiled_program(tiny):
    def program(lr):
        """The compiled HLO without its source locations, which name whichever process compiled
        it first (the tests share a persistent compilation cache)."""
        run = setup(tiny(steps=3, optim=OptimConfig(lr=lr)), init=False, evaluate=False)
        text = run.train_step.as_text()
        tables = re.compile(r"(FileNames|FunctionNames|FileLocations|StackFrames)$|\d+ ")
        lines = [line for line in text.splitlines() if not tables.match(line)]
        return re.sub(r", metadata=\{[^}]*\}", "", "\n".join(lines))

    first, second = program(1e-3), program(5e-2)
    assert "fusion" in first and first == second
    # A train-only program must never reach a cache that trainers take their eval step from.
    with pytest.raises(ValueError, match="compiles no eval step"):
        setup(tiny(), init=False, evaluate=False, cache=StepCache())


class StopAtEval(Callback):
    def __init__(self):
        self.events = []

    def on_start(self, trainer):
        self.events.append(("start", trainer.start))

    def on_eval(self, trainer, record):
        self.events.append(("eval", record["step"]))
        return record["step"] >= 10

    def on_save(self, trainer, step):
        self.events.append(("save", step))

    def on_end(self, trainer, records):
        self.events.append(("end", len(records)))


def test_a_callback_stops_the_run_at_an_evaluation(tiny, capsys):
    callback = StopAtEval()
    cfg = tiny(steps=20, eval_every=5, checkpoint=CheckpointConfig(every=100))
    records = train(cfg, callbacks=[callback])
    assert (
        "callback StopAtEval: stopped after step 10, checkpoint saved in" in capsys.readouterr().out
    )
    assert [r["step"] for r in records] == list(range(1, 11))
    assert callback.events == [("start", 0), ("eval", 5), ("eval", 10), ("save", 10), ("end", 10)]
    # Saved where it stopped: the same command resumes from step 10.
    resumed = StopAtEval()
    train(cfg, callbacks=[resumed])
    assert resumed.events[0] == ("start", 10)


class Probe(SwiGLU):
    """The dense block, reporting the RMS of its input and a constant."""

    def __call__(self, h):
        y, aux = super().__call__(h)
        rms = jnp.sqrt(jnp.mean(jnp.square(h.astype(jnp.float32))))
        return y, {**aux, "probe_rms": rms, "probe_one": jnp.float32(1)}


@pytest.mark.parametrize(
    "mesh, optim, pipeline",
    [(dict(data=2, fsdp=2, tensor=2), OptimConfig(microbatches=2), False),
     (dict(data=2, tensor=2, pipeline=2), OptimConfig(), True)],
    ids=["accumulation", "pipeline"],
)  # fmt: skip
def test_a_layers_aux_metric_reaches_metrics_jsonl(tiny, tmp_path, mesh, optim, pipeline):
    """Averaged over layers, microbatches and pipeline stages: the one-device value."""
    FEED_FORWARD["probe"] = Probe
    try:
        model = dataclasses.replace(tiny().model, feed_forward="probe")
        cfg = tiny(mesh=mesh, steps=2, model=model, optim=optim)
        records = train(cfg)
        one = dataclasses.replace(cfg, run_dir=str(tmp_path / "one"), mesh=MeshConfig(data=1))
        one_device = train(one, jax.devices()[:1])
        if not pipeline:  # the metrics leave the loss alone (once: a third compile per mesh)
            plain_cfg = dataclasses.replace(
                cfg, run_dir=str(tmp_path / "plain"), model=tiny().model
            )
            plain = train(plain_cfg)
    finally:
        del FEED_FORWARD["probe"]
    lines = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()]
    assert [line["probe_one"] for line in lines] == pytest.approx([1.0, 1.0])
    assert lines[-1]["eval_probe_one"] == pytest.approx(1.0)
    # The input of the block is RMS-normalized (unit scales at init): an RMS just under 1.
    assert 0.95 < lines[0]["probe_rms"] < 1.0
    np.testing.assert_allclose(
        [r["probe_rms"] for r in records], [r["probe_rms"] for r in one_device], rtol=1e-5
    )
    assert lines[-1]["eval_probe_rms"] == pytest.approx(one_device[-1]["eval_probe_rms"], rel=1e-5)
    if not pipeline:
        assert "probe_rms" not in json.dumps(plain)
        np.testing.assert_allclose(losses(records), losses(plain), rtol=1e-6)


def test_violations_lists_every_fault_at_once(tiny):
    cfg = tiny(batch_size=13, model=dataclasses.replace(tiny().model, remat="sometimes"))
    plan = Plan.from_config(cfg, mesh={"data": 2, "tensor": 4}, attention="cudnn")
    messages = [str(p) for p in violations(cfg, plan, jax.devices())]
    assert len(messages) == 3, messages
    assert messages[0].startswith("--model.remat=sometimes is not a remat policy")
    assert messages[1].startswith("--model.attention=cudnn runs on NVIDIA GPUs only")
    assert messages[2].startswith(
        "--batch_size=13 does not split into 2 data-parallel shards (--mesh.data=2)"
    )
    # A device count and platform are enough: nothing is compiled, allocated or opened.
    on_gpu = [str(p) for p in violations(cfg, plan, 8, "gpu")]
    assert "takes 16-bit inputs" in on_gpu[1] and on_gpu[::2] == messages[::2]
    wrong_count = [str(p) for p in violations(cfg, plan, 16, "cpu")]
    assert wrong_count[0] == messages[0] and "needs 8 devices but the run has 16" in wrong_count[1]
    good = tiny(mesh=dict(data=2, tensor=4))
    assert violations(good, Plan.from_config(good), jax.devices()) == []
    with pytest.raises(ConfigError, match="is not a remat policy"):
        setup(cfg, plan=plan)


def test_auto_attention_takes_cudnn_only_where_it_runs(tiny):
    """--model.attention=auto (the default): cuDNN's kernel on GPUs in 16-bit with a head dim it
    takes and plain causal masking; the einsums everywhere else; an explicit kernel stays."""
    bf16 = tiny(precision="bf16", model=dataclasses.replace(tiny().model, head_dim=64))

    def chosen(cfg, platform, **changes):
        return Plan.from_config(cfg, **changes).on(cfg, platform).attention

    assert Plan.from_config(bf16).attention == "auto"
    assert chosen(bf16, "gpu") == "cudnn"
    assert [chosen(bf16, "cpu"), chosen(bf16, "tpu"), chosen(bf16, None)] == ["xla"] * 3
    assert chosen(bf16, "gpu", precision="fp32") == "xla"
    assert chosen(bf16, "gpu", mesh={"context": 2}) == "xla"
    assert chosen(bf16.replace(data={"document_mask": True}), "gpu") == "xla"
    odd = bf16.replace(model={"head_dim": 12})
    assert chosen(odd, "gpu") == "xla"
    assert chosen(bf16, "gpu", attention="xla") == "xla"
    # violations() judges the concrete kernel: auto in fp32 on a GPU is no error, cudnn is.
    assert violations(bf16, Plan.from_config(bf16, precision="fp32"), 8, "gpu") == []
    (error,) = violations(
        bf16, Plan.from_config(bf16, precision="fp32", attention="cudnn"), 8, "gpu"
    )
    assert "takes 16-bit inputs" in str(error)


def test_init_from_hf_keeps_every_plan_key(tiny, tmp_path):
    from engine import hf
    from engine.config import ModelConfig
    from models import LLAMA_PRESETS

    arch = dataclasses.replace(LLAMA_PRESETS["tiny"], n_layers=3, d_model=32, d_ff=64)
    source = hf.save_params(
        _random_params(arch), arch, tmp_path / "hf"
    )  # a Hugging Face directory of another shape
    model = ModelConfig.of(LLAMA_PRESETS["tiny"], loss_chunks=4, remat="full", attention="xla")
    cfg = tiny(model=model, init_from_hf=str(source))
    got = hf.model_config(cfg)
    assert (got.model.n_layers, got.model.d_model, got.model.d_ff) == (3, 32, 64)
    assert (got.model.loss_chunks, got.model.remat) == (4, "full")
    assert Plan.from_config(got).loss_chunks == 4


def _random_params(arch):
    from flax import nnx

    from models import Llama

    return nnx.to_pure_dict(nnx.state(Llama(arch, nnx.Rngs(0)), nnx.Param))


def test_bits_per_byte_with_a_hugging_face_tokenizer(tiny, tmp_path):
    """The loss over the UTF-8 bytes the counted eval targets spell, not per token."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    texts = [f"def f{i}(x):\n    return x * {i} + 'é{i % 7}'\n" * 3 for i in range(400)]
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<unk>"])
    tok.train_from_iterator(texts, trainer)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    data = DataConfig(
        source=str(tmp_path / "docs.jsonl"),
        tokenizer=str(tmp_path / "tokenizer.json"),
        cache_dir=str(tmp_path / "cache"),
        seq_len=64,
        eval_batches=2,
    )
    model = dataclasses.replace(tiny().model, vocab_size=320)
    run = setup(tiny(steps=1, data=data, model=model))
    result = evaluate(run)
    # By hand: decode each run of counted targets and count its bytes.
    nbytes = 0
    for batch in run.task.eval_iter():
        for targets, mask in zip(batch["targets"], batch["mask"], strict=True):
            runs, current = [], []
            for t, m in zip(targets, mask, strict=True):
                if m:
                    current.append(int(t))
                else:  # a target across a document boundary: not in the loss
                    runs.append(current)
                    current = []
            runs.append(current)
            nbytes += sum(len(tok.decode(r).encode()) for r in runs if r)
    count = sum(float(b["mask"].sum()) for b in run.task.eval_iter())
    assert nbytes > 1.5 * count  # BPE tokens cover several bytes: per token would be wrong
    want = result["eval_loss"] * count / math.log(2) / nbytes
    assert result["eval_bits_per_byte"] == pytest.approx(want, rel=1e-6)
    assert "eval_bits_per_token" not in result


def test_a_plans_flags_give_the_same_plan():
    from engine.config import parse_args

    cfg = parse_args(["--config", "tiny"])
    plan = Plan.from_config(
        cfg, mesh={**{a.name: 1 for a in AXES}, "data": 2, "fsdp": 2, "tensor": 2},
        remat="save:attn_out", microbatches=2, loss_chunks=4, precision="bf16",
        rules=Plan.from_config(parse_args(["--rule_overrides", "embed="])).rules,
    )  # fmt: skip
    again = Plan.from_config(parse_args(["--config", "tiny", *plan.flags()]))
    assert again == plan


def test_config_replace_changes_keys_as_the_command_line_does():
    from engine.config import PRESETS, parse_args

    flags = ["--steps=7", "--mesh.data=2", "--mesh.tensor=4", "--optim.lr=0.01", "--seed=3"]
    got = PRESETS["tiny"].replace(steps=7, mesh={"data": 2, "tensor": 4}, optim={"lr": 0.01},
                                  seed=3)  # fmt: skip
    assert got == parse_args(["--config", "tiny", *flags])
    with pytest.raises(
        ConfigError, match="'optim.lrr' is not a config key; did you mean 'optim.lr'"
    ):
        PRESETS["tiny"].replace(optim={"lrr": 1.0})


class ProbeLoss(SwiGLU):
    """The dense block with a parameter-dependent aux value its family weights into the loss."""

    def __call__(self, h):
        y, aux = super().__call__(h)
        return y, {**aux, "probe_loss": jnp.sum(jnp.square(self.w_down[...]))}


def test_a_weighted_aux_value_is_added_to_the_loss(tiny, monkeypatch):
    """The step's gradient is that of mean cross-entropy + weight x aux; `loss` stays the
    cross-entropy and the aux value is logged under its name."""
    from engine import family
    from engine.precision import POLICIES
    from engine.step import make_losses_fn
    from models.registry import FAMILIES, LLAMA, register

    monkeypatch.setitem(FEED_FORWARD, "probe_loss", ProbeLoss)
    register(dataclasses.replace(LLAMA, name="weighted", aux_weights=lambda a: {"probe_loss": 1.0}))
    monkeypatch.setitem(family.TASK_FAMILY, "lm", "weighted")
    try:
        model = dataclasses.replace(tiny().model, feed_forward="probe_loss")
        run = setup(tiny(mesh=dict(data=1), steps=2, model=model), jax.devices()[:1])
    finally:
        del FAMILIES["weighted"]
    batch = run.put_batch(run.task.train_batch(0))
    losses_fn = make_losses_fn(run.graphdef, POLICIES["fp32"])

    def objective(params, weight):
        values = losses_fn(params, batch)
        return values["loss_sum"] / values["count"] + weight * values["probe_loss"]

    weighted, plain = (
        float(optax.tree.norm(jax.grad(objective)(run.state.params, w))) for w in (1.0, 0.0)
    )
    ce = float(objective(run.state.params, 0.0))
    _, metrics = run.train_step(run.state, batch)
    assert float(metrics["grad_norm"]) == pytest.approx(weighted, rel=1e-5)
    assert abs(weighted - plain) > 0.01 * plain  # the weight mattered
    assert float(metrics["loss"]) == pytest.approx(ce, rel=1e-6)
    assert float(metrics["probe_loss"]) > 0


class Counting:
    """A caller's own data source: each row counts up (mod 64) from a random start."""

    batch_names = {k: ("batch", "length") for k in ("inputs", "targets", "mask")}
    tokens_per_example, vocab_size = 64, 256

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def train_batch(self, step, rows=None):
        rows = rows or range(self.batch_size)
        starts = np.random.default_rng(step).integers(0, 64, self.batch_size)[
            rows.start : rows.stop
        ]
        window = (starts[:, None] + np.arange(65)) % 64
        window = window.astype(np.int32)
        mask = np.ones((len(starts), 64), np.float32)
        return {"inputs": window[:, :-1], "targets": window[:, 1:], "mask": mask}

    def eval_iter(self, rows=None):
        yield self.train_batch(10**6, rows)


def test_a_caller_passes_its_own_data_source(tiny):
    optim = OptimConfig(lr=1e-2, warmup_steps=5)
    records = train(tiny(mesh=dict(data=2, fsdp=2, tensor=2), steps=30, optim=optim),
                    task=Counting(16))  # fmt: skip
    assert records[-1]["loss"] < 0.3 * records[0]["loss"]  # counting is easy to learn
    assert records[-1]["eval_loss"] < 0.3 * records[0]["loss"]
    assert "eval_bits_per_byte" not in records[-1]  # no tokenizer: no claim about bytes


@pytest.mark.parametrize(
    "optim, steps",
    [(OptimConfig(), 300), (OptimConfig(warmup_steps=0), 50),
     (OptimConfig(lr=6e-4, warmup_steps=100, min_lr_ratio=0.05), 1000)],
)  # fmt: skip
def test_the_runtime_schedule_is_optaxs_bit_for_bit(optim, steps):
    from engine.optim import hyperparams, learning_rate, make_optimizer

    _, schedule = make_optimizer(optim, steps)
    h = hyperparams(optim, steps)
    steps_ = jnp.arange(steps + 1, dtype=jnp.int32)
    got = jax.jit(jax.vmap(lambda s: learning_rate(h, s)))(steps_)
    np.testing.assert_array_equal(got, jax.jit(jax.vmap(schedule))(steps_))


# A fresh process: JAX started or not, then a computation on every device (each device's
# thread allocates from its arena), then setup() on the CPU.
ARENA_PROBE = """
import sys
if sys.argv[1] == "jax_first":
    import jax; jax.devices()
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
from engine.config import PRESETS
from engine.hostmem import arenas
from engine.setup import setup
mesh = jax.make_mesh((jax.device_count(),), ("d",))
x = jax.device_put(jnp.ones((8 * 256, 512)), NamedSharding(mesh, PartitionSpec("d")))
jax.jit(lambda x: jnp.sin(x * 2).sum(axis=1))(x).block_until_ready()
setup(PRESETS["tiny"].replace(run_dir=sys.argv[2], mesh={"data": -1}), init=False)
print("arenas", arenas())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")
@pytest.mark.parametrize("case", ["engine_first", "jax_first", "switched_off", "eight_devices"])
def test_xla_cpu_threads_share_one_malloc_arena_when_the_engine_is_imported_first(case, tmp_path):
    """engine.hostmem: on one CPU device, one arena (and mmap off) keeps XLA:CPU's per-step
    temporaries in the heap (`default` 1.27x a step). Too late, setup says so; switched off, or
    with several devices (whose blocks would fragment one heap), glibc keeps its arenas and
    nothing is said."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    env["SHARDTRAIN_KEEP_HOST_MEMORY"] = "0" if case == "switched_off" else "1"
    devices = 8 if case == "eight_devices" else 1
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    done = subprocess.run(
        [sys.executable, "-c", ARENA_PROBE, case, str(tmp_path)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    arenas = int(done.stdout.split()[-1])
    assert (arenas == 1) == (case == "engine_first"), (case, arenas)
    warned = "malloc arenas" in done.stderr
    assert warned == (case == "jax_first"), done.stderr
    if warned:
        # Threads started after the warning may add arenas (jax 0.11's setup does).
        named = int(re.search(r"this process has (\d+) malloc arenas", done.stderr)[1])
        assert 1 < named <= arenas, (named, arenas)
        assert "MALLOC_ARENA_MAX=1" in done.stderr
