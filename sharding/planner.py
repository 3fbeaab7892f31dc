"""The planner's search and cost model: every mesh shape x remat x batch split a model could
train with, each priced by memory per device and predicted step time.

It knows shapes and FLOPs only (a `Workload`), never a model, and asks the caller whether a
candidate would train (`feasible`), so it can never rank a plan that training would reject.

Memory per device = the train state's shards (exact, from shard shapes) + the batch + gradients
+ saved activations, logits and gathered weights; the last three are linear models whose
coefficients were fitted to XLA's `memory_analysis()` (benchmarks/plan.py checks them).

Step time is a roofline (assumptions, all in this file):
- compute = FLOPs (with remat's recomputation) / (devices x peak x the device's matmul
  efficiency, 0.7 on GPUs and TPUs);
- HBM = weight, activation and optimizer-state traffic / HBM bandwidth;
- collectives = bytes on the wire / link bandwidth (ring algorithms, (n-1)/n of the data), over
  the host's links when the axis stays inside a host and the network when it spans hosts;
- fixed costs: a latency per collective and per kernel (KERNELS_PER_LAYER per layer pass), so
  accumulation steps, loss chunks and pipeline iterations are not free;
- FSDP gathers and gradient reductions overlap with compute (XLA's latency-hiding scheduler);
  tensor-parallel all-reduces, pipeline permutes and context parallelism's key/value exchange
  sit between dependent matmuls and do not;
- a sequence split over `context` divides every activation's tokens like a batch split, and
  its weights are ZeRO-split over it like fsdp's (the rule table's `embed`);
- step = (max(compute, HBM, overlapped collectives) + exposed collectives) / (1 - bubble).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence

from sharding.devices import DeviceSpec
from sharding.pipeline import PipelineConfig, bubble as pipeline_bubble
from sharding.rules import Rules, axes_of, logical_to_spec, splitting_axes

REMAT_RECOMPUTE = {"none": 0.0, "dots": 0.05, "dots_no_batch": 0.15, "full": 1 / 3}
"""Extra share of the layers' training FLOPs spent recomputing (full: one more forward of 6)."""
OVERLAPPED_AXES = ("data", "fsdp")  # their collectives hide behind compute
KERNELS_PER_LAYER = 100  # a decoder layer's forward and backward kernels after XLA's fusion
KERNELS_OUTSIDE = 50  # embedding, logits and loss, per loss chunk
USABLE_MEMORY = 0.9  # of a device's memory, the rest for the runtime and fragmentation

# Temporaries beyond the state, as multiples of the terms `estimate` names, fitted by least
# squares to XLA's memory_analysis() over presets x meshes x remat x precision, on rows without
# a pipeline (`python benchmarks/plan.py --part fit` refits them and prints this table).
# saved_*: what autodiff keeps per layer, by remat group (none; dots, dots_no_batch, save:;
# full); work_*: one layer's backward at a time; stage_inputs (counted, not fitted): what a
# pipeline stage keeps; logits: one fp32 copy; grads: fp32 gradient shards; compute_copy: the
# 16-bit copy of the params; gathered / tables: one layer's weights and the vocabulary tables
# gathered by FSDP (XLA's plan shows no separate room for a gathered layer: 0).
FIT = {
    "saved_none": 0.94,
    "saved_dots": 1.17,
    "saved_full": 1.03,
    "work_none": 0.47,
    "work_dots": 0.58,
    "work_full": 0.80,
    "stage_inputs": 1.00,
    "logits": 1.94,
    "grads": 0.77,
    "compute_copy": 1.11,
    "gathered": 0.00,
    "tables": 1.29,
}


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One array of the train state: its shape, per-dimension logical names and bytes per
    element; `param` marks parameters (optimizer slots mirror them)."""

    shape: tuple[int, ...]
    names: tuple[str | None, ...]
    itemsize: int
    param: bool = False


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model and its batch as the planner sees them."""

    state: Callable[[int], Sequence[Leaf]]
    """Pipeline stages -> every leaf of the train state (params laid out for those stages)."""
    batch: int
    """Sequences (examples) per optimizer step."""
    seq_len: int
    layers: int
    width: int
    """Size of the activations passed between layers, per token (d_model)."""
    vocab: int
    flops_per_token: float
    layer_bytes: Mapping[str, tuple[float, float]]
    """remat -> bytes per token per layer saved for the backward pass: (kept whole, split by
    the axes of `split_name`)."""
    compute_bytes: int = 4
    split_name: str = "heads"
    sequence_model: bool = True
    moe_layers: int = 0
    """Layers whose tokens travel to experts (an all-to-all each way over the `expert` axis)."""
    routed: float = 0.0
    """Copies of each token an MoE layer sends: top_k, times the capacity factor if any."""
    dropless: bool = True
    """Dropless routing's send buffers have room for every copy per peer (ep x the bytes)."""
    kv_width: int = 0
    """Key (and value) elements per token per layer: what attention exchanges across a
    sequence split over `context`."""
    batch_dots: bool = True
    """Whether attention is matmuls with a batch dimension (the einsums), which remat=dots
    keeps; a fused kernel is no dot, and both dots policies keep its output: one program."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    mesh: Mapping[str, int]
    remat: str
    microbatches: int = 1
    pipeline_microbatches: int = 0
    repeats: int = 1
    loss_chunks: int = 1

    def describe(self) -> str:
        parts = [" x ".join(f"{a}={s}" for a, s in self.mesh.items() if s > 1) or "1 device"]
        parts.append(f"remat={self.remat}")
        if self.microbatches > 1:
            parts.append(f"accum={self.microbatches}")
        if self.mesh.get("pipeline", 1) > 1:
            parts.append(f"pp_mb={self.pipeline_microbatches} rep={self.repeats}")
        if self.loss_chunks > 1:
            parts.append(f"chunks={self.loss_chunks}")
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class Target:
    device: DeviceSpec
    devices: int
    hosts: int = 1
    memory_gb: float | None = None
    """Per-device budget; default the device's memory x USABLE_MEMORY."""

    @property
    def budget_gb(self) -> float:
        return self.memory_gb if self.memory_gb is not None else self.device.hbm_gb * USABLE_MEMORY


@dataclasses.dataclass(frozen=True)
class Estimate:
    candidate: Candidate
    memory_gb: dict[str, float]
    """Per device: state, batch, grads, activations, logits, gathered, total."""
    times_s: dict[str, float]
    """compute, hbm, each collective by axis, latency, bubble (its share of the step), step."""
    tokens_per_s: float
    mfu: float
    dominant: str
    problems: tuple[str, ...] = ()
    memory_terms: dict[str, float] = dataclasses.field(default_factory=dict)
    """The memory model's terms before their fitted coefficients (GB): what FIT multiplies."""

    @property
    def fits(self) -> bool:
        return not self.problems


def factorizations(n: int, k: int) -> list[tuple[int, ...]]:
    """Every ordered k-tuple of positive integers whose product is n."""
    if k == 1:
        return [(n,)]
    return [
        (d, *rest) for d in range(1, n + 1) if n % d == 0 for rest in factorizations(n // d, k - 1)
    ]


def candidates(
    workload: Workload,
    axes: Sequence[str],
    devices: int,
    remats: Sequence[str],
    fixed: Mapping[str, object] = {},
) -> list[Candidate]:
    """The search space: meshes over `axes` using all `devices`, x remat x accumulation x
    pipeline microbatches and repeats x loss chunks. `fixed` pins some of them: mesh axis
    names, and 'remat', 'microbatches', 'pipeline_microbatches', 'repeats', 'loss_chunks'."""
    free = [a for a in axes if a not in fixed]
    pinned = math.prod(int(fixed[a]) for a in axes if a in fixed)
    meshes = []
    if devices % pinned == 0:
        for sizes in factorizations(devices // pinned, len(free)) if free else [()]:
            given = dict(zip(free, sizes, strict=True))
            meshes.append({a: int(fixed[a]) if a in fixed else given[a] for a in axes})
    small = [m for m in (1, 2, 4, 8, 16, 32) if m <= workload.batch]
    chunks = [c for c in (1, 4, 16) if workload.sequence_model and workload.seq_len % c == 0]
    options = {
        "remat": list(remats),
        "microbatches": small,
        "loss_chunks": chunks or [1],
    }
    for key in options:
        if key in fixed:
            options[key] = [fixed[key]]
    out = []
    for mesh in meshes:
        stages = mesh.get("pipeline", 1)
        pipes = [(0, 1)]
        if stages > 1:
            micro = [fixed["pipeline_microbatches"]] if "pipeline_microbatches" in fixed else [
                stages * k for k in (1, 2, 4)]  # fmt: skip
            reps = [fixed["repeats"]] if "repeats" in fixed else [1, 2, 4]
            pipes = list(itertools.product(micro, reps))
        for remat, accum, chunk in itertools.product(*options.values()):
            for pmb, rep in pipes:
                out.append(Candidate(mesh, remat, accum, pmb, rep, chunk))
    return out


def shard_bytes(leaves: Sequence[Leaf], rules: Rules, sizes: Mapping[str, int]) -> dict:
    """Per-device bytes of the state's shards: all of it, the params, and of those the
    stacked layers' (named `layers`) and the vocabulary tables (named `vocab`)."""
    out = dict.fromkeys(("state", "params", "layers", "tables", "experts"), 0.0)
    for leaf in leaves:
        spec = logical_to_spec(leaf.names, rules)
        used: set[str] = set()
        n = 1
        for size, axes in zip(leaf.shape, spec, strict=True):
            axes = axes_of(axes)
            ways = math.prod(sizes.get(a, 1) for a in axes if a not in used)
            used.update(axes)
            n *= -(-size // ways)
        n *= leaf.itemsize
        out["state"] += n
        if leaf.param:
            out["params"] += n
            out["layers"] += n if "layers" in leaf.names else 0
            out["tables"] += n if "vocab" in leaf.names else 0
            out["experts"] += n if "expert" in leaf.names else 0
    return out


def crosses_hosts(axis: str, sizes: Mapping[str, int], devices: int, hosts: int) -> bool:
    """Whether `axis`'s groups span hosts: devices are laid out row-major in mesh order, hosts
    take consecutive blocks."""
    order = list(sizes)
    stride = math.prod(sizes[a] for a in order[order.index(axis) + 1 :])
    return hosts > 1 and stride * sizes[axis] > devices // hosts


def estimate(
    workload: Workload,
    c: Candidate,
    target: Target,
    rules: Rules,
    precision: str,
    cache: dict | None = None,
) -> Estimate:
    """Memory per device and step time of one candidate (`cache`: shard sizes per mesh, kept
    between calls by a search)."""
    sizes, dev, n = dict(c.mesh), target.device, target.devices
    stages = sizes.get("pipeline", 1)
    key = tuple(sizes.items())
    cache = {} if cache is None else cache
    if key not in cache:
        cache[key] = shard_bytes(workload.state(stages), rules, sizes)
    state = cache[key]
    ways = {name: math.prod(sizes[a] for a in splitting_axes((name,), rules, sizes))
            for name in ("batch", workload.split_name, "vocab", "embed")}  # fmt: skip
    batch_ways, split = ways["batch"], ways[workload.split_name]
    vocab_ways, fsdp = ways["vocab"], ways["embed"]
    context = math.prod(sizes[a] for a in splitting_axes(("batch", "length"), rules, sizes))
    cb, tokens = workload.compute_bytes, workload.batch * workload.seq_len
    # Per device, per accumulation step.
    micro_tokens = tokens / (c.microbatches * batch_ways * context)
    if stages > 1:  # the schedule (sharding.pipeline): M microbatches, R*M + S - 1 iterations
        pmb = PipelineConfig(c.pipeline_microbatches, c.repeats).microbatches_for(stages)
        iterations = c.repeats * pmb + stages - 1
        mb_tokens = micro_tokens * stages / pmb  # one pipeline microbatch on this device
        chunk = workload.layers // (stages * c.repeats)
    widen = dev.widening if cb < 4 else 1.0

    def per_token(remat: str) -> float:
        whole, parted = workload.layer_bytes[remat]
        return (whole + parted / split) * widen

    terms = dict.fromkeys(FIT, 0.0)
    group = c.remat if c.remat in ("none", "full") else "dots"  # dots, dots_no_batch, save:
    if stages == 1:
        terms[f"saved_{group}"] = workload.layers * micro_tokens * per_token(c.remat)
        terms[f"work_{group}"] = micro_tokens * per_token("none")  # one layer's backward
    else:
        # The pipeline rematerializes each stage iteration whatever the remat policy: it keeps
        # every iteration's input, plus one chunk of layers' for one microbatch in backward.
        terms["stage_inputs"] = (
            iterations * mb_tokens * workload.width * cb * widen
            + micro_tokens * stages * workload.width * 4  # all microbatches, gathered
        )
        terms[f"saved_{group}"] = chunk * mb_tokens * per_token(c.remat)
        terms[f"work_{group}"] = mb_tokens * per_token("none")
    chunks = c.loss_chunks if workload.sequence_model else 1
    terms["logits"] = micro_tokens * workload.vocab / vocab_ways * 4 / chunks
    terms["grads"] = state["params"] * (2 if c.microbatches > 1 else 1)
    local_layers = max(workload.layers // stages, 1)
    terms["gathered"] = state["layers"] / local_layers * (fsdp - 1) * cb / 4
    terms["tables"] = state["tables"] * (fsdp - 1) * cb / 4
    terms["compute_copy"] = state["params"] * cb / 4 if cb < 4 else 0.0
    activations = sum(FIT[k] * v for k, v in terms.items() if k.startswith(("saved", "work",
                                                                             "stage")))  # fmt: skip
    logits = FIT["logits"] * terms["logits"]
    memory = {
        "state": state["state"],
        "batch": tokens / (batch_ways * context) * 4 * 3,  # inputs, targets, mask
        "grads": FIT["grads"] * terms["grads"] + FIT["compute_copy"] * terms["compute_copy"],
        "activations": activations,
        "logits": logits,
        "gathered": FIT["gathered"] * terms["gathered"] + FIT["tables"] * terms["tables"],
    }
    memory = {k: v / 1e9 for k, v in memory.items()}
    memory["total"] = sum(memory.values())
    memory_terms = {k: v / 1e9 for k, v in terms.items()}

    # Time.
    # Without batch dots (a fused attention kernel) both dots policies keep every matmul's
    # output and the kernel's: dots' recomputation (models.layers._CUDNN_ATTENTION_FORWARD).
    remat = "dots" if not workload.batch_dots and c.remat == "dots_no_batch" else c.remat
    recompute = 1 + REMAT_RECOMPUTE.get(remat, 0.05)
    flops = workload.flops_per_token * tokens * recompute / n
    if chunks > 1:  # each piece's logits are recomputed in the backward pass (engine.step)
        flops += 2 * workload.width * workload.vocab * tokens / n
    times = {"compute": flops / (dev.flops(precision) * dev.matmul_efficiency)}
    weights_pass = state["params"] * cb / 4 * fsdp  # a device's weights, gathered, per pass
    traffic = (
        3 * weights_pass * c.microbatches
        + 2 * activations * c.microbatches
        + 2 * logits * c.microbatches
        + 7 * state["params"]
    )
    times["hbm"] = traffic / (dev.hbm_gbps * 1e9)
    collectives: dict[str, tuple[float, int]] = {}  # axis -> (bytes per device, count)
    if fsdp > 1:
        gathered_bytes = state["params"] * fsdp * (2 * cb / 4 + 1) * (fsdp - 1) / fsdp
        collectives["fsdp"] = (
            gathered_bytes * c.microbatches,
            3 * workload.layers * c.microbatches,
        )
    data = sizes.get("data", 1)
    if data > 1:
        collectives["data"] = (2 * state["params"] * (data - 1) / data * c.microbatches,
                               c.microbatches)  # fmt: skip
    ep = sizes.get("expert", 1)
    if ep > 1:
        # The experts' tokens: dispatch and combine, forward and backward (and remat's
        # recomputed forward); the other weights' gradients all-reduce over it like data's.
        passes = 4 + (2 if c.remat == "full" else 0)
        copies = micro_tokens * workload.routed * workload.width * cb
        sent = copies * (ep - 1) if workload.dropless else copies * (ep - 1) / ep
        moved = passes * workload.moe_layers / stages * sent
        if stages > 1:  # inside a stage each layer's experts are gathered (experts.py):
            # every iteration runs one chunk (1/R of the stage's layers) 3 times (remat).
            moved = 3 * iterations * state["experts"] / c.repeats * cb / 4 * (ep - 1)
        shared = 2 * (state["params"] - state["experts"]) * (ep - 1) / ep
        collectives["expert"] = (
            (moved + shared) * c.microbatches,
            (passes * workload.moe_layers // stages + 1) * c.microbatches,
        )
    if context > 1:
        # Each layer: the other devices' keys and values in the forward (and remat's
        # recomputation), again in the backward with their fp32 gradients on the way back.
        kv = micro_tokens * (context - 1) * workload.kv_width * 2 * cb
        per_layer = kv * (2 + (c.remat == "full")) + kv * 4 / cb
        collectives["context"] = (per_layer * workload.layers / stages * c.microbatches,
                                  3 * workload.layers // stages * c.microbatches)  # fmt: skip
    if split > 1:
        passes = 4 + (2 if c.remat == "full" else 0)
        size = micro_tokens * workload.width * cb * 2 * (split - 1) / split
        collectives["tensor"] = (passes * workload.layers / stages * size * c.microbatches,
                                 passes * workload.layers // stages * c.microbatches)  # fmt: skip
    bubble = 0.0
    if stages > 1:
        permuted = 2 * iterations * mb_tokens * workload.width * cb
        collectives["pipeline"] = (permuted * c.microbatches, 2 * iterations * c.microbatches)
        bubble = pipeline_bubble(stages, c.repeats, pmb)
    latency = 0.0
    for axis, (size, count) in collectives.items():
        across = crosses_hosts(axis, sizes, n, target.hosts)
        bandwidth = (dev.inter_gbps if across else dev.intra_gbps) * 1e9
        times[axis] = size / bandwidth
        latency += count * dev.latency_us * 1e-6
    # Fixed costs: every collective, and every kernel of every pass (forward, backward and
    # remat's recomputation) of every accumulation step, loss chunk and pipeline iteration.
    if stages == 1:
        layer_runs = workload.layers * (1 + (c.remat == "full") / 3)
    else:
        layer_runs = iterations * chunk * 4 / 3  # the pipeline rematerializes every stage
    kernels = KERNELS_PER_LAYER * layer_runs + KERNELS_OUTSIDE * chunks
    latency += c.microbatches * kernels * dev.op_us * 1e-6
    times["latency"] = latency
    overlapped = max(
        [times["compute"], times["hbm"]] + [times[a] for a in collectives if a in OVERLAPPED_AXES]
    )
    exposed = latency + sum(times[a] for a in collectives if a not in OVERLAPPED_AXES)
    step = (overlapped + exposed) / (1 - bubble)
    times["bubble"] = step * bubble
    times["step"] = step
    costs = {k: v for k, v in times.items() if k != "step"}
    dominant = max(costs, key=costs.get)
    peak = n * dev.bf16_flops
    problems = []
    if memory["total"] > target.budget_gb:
        problems.append(
            f"over memory by {memory['total'] - target.budget_gb:.2f} GB "
            f"({memory['total']:.2f} of {target.budget_gb:.2f} GB per device)"
        )
    return Estimate(
        c,
        memory,
        times,
        tokens / step,
        workload.flops_per_token * tokens / step / peak,
        dominant,
        tuple(problems),
        memory_terms,
    )


def search(
    workload: Workload,
    target: Target,
    rules: Rules,
    precision: str,
    axes: Sequence[str],
    remats: Sequence[str],
    feasible: Callable[[Candidate], list[str]],
    fixed: Mapping[str, object] = {},
) -> tuple[list[Estimate], list[Estimate]]:
    """(plans that fit, fastest first; rejected plans, nearest to fitting first). A rejected
    plan's `problems` say why: training's own errors (`feasible`), or the memory it lacks."""
    fits, rejected, cache = [], [], {}
    for c in candidates(workload, axes, target.devices, remats, fixed):
        reasons = feasible(c)
        if reasons:  # not priced: its shapes may not even exist (layers that do not split)
            rejected.append(Estimate(c, {"total": math.inf}, {"step": math.inf}, 0.0, 0.0, "",
                                     tuple(reasons)))  # fmt: skip
            continue
        e = estimate(workload, c, target, rules, precision, cache)
        if e.fits:
            fits.append(e)
        else:
            rejected.append(e)
    # Equal times (a collective-bound step hides remat's recomputation): more headroom first.
    fits.sort(key=lambda e: (round(e.times_s["step"], 6), e.memory_gb["total"]))
    rejected.sort(key=lambda e: (bool(failed_checks(e)), e.memory_gb["total"]))
    return fits, rejected


def failed_checks(e: Estimate) -> bool:
    """Whether a rejected plan failed training's checks (rather than only memory)."""
    return any(not p.startswith("over memory") for p in e.problems)
