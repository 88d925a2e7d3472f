"""Will it fit? Memory and communication per rank of one configuration, before anything is built.

``plan_row(cfg, shapes)`` turns a resolved configuration and the model's parameter shapes
(engine.shapes) into a ``PlanRow``: the bytes one rank holds, by kind and at each phase of a
step, the peak, and the collectives of one step. The stacks declare what they hold
(strategies.memory.MemoryLayout, ``Strategy.memory``); the activations and the loss buffers
follow from the model's dimensions and the precision policy. docs/plan.md gives the formulas,
their reasoning and how they compare with measurements.

``fits(cfg, shapes, device_memory_bytes)`` is what the run (engine.fit) and a sweep ask.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

from tp_bench.core.config import BenchConfig
from tp_bench.core.dims import ParallelDims
from tp_bench.core.errors import ConfigError
from tp_bench.core.precision import compute_policy
from tp_bench.engine.shapes import Counts, ModelShapes, TPSplit, counts
from tp_bench.strategies import registry
from tp_bench.strategies.memory import Held, MemoryLayout

GIB = 1024**3
FP32 = 4
# The plan errs by a few percent on the GPU rows measured so far (docs/plan.md): a run is refused
# only when the plan exceeds the memory by more than this factor.
REFUSAL_MARGIN = 1.2
PHASES = ("setup", "forward_backward", "backward_end", "optimizer_step")
PHASE_TEXT = {"setup": "at set-up", "forward_backward": "in forward/backward",
              "backward_end": "at the end of backward", "optimizer_step": "in the optimizer step"}


# ---------------------------------------------------------------------- per-token activations
@dataclass(frozen=True)
class Precision:
    """Bytes per element of what the forward saves, under one compute policy."""

    matmul: int        # matmul inputs and outputs (the compute dtype; float32 under "none")
    normed: int        # a norm's normalized output (float32 under "autocast" and "none")
    residual: int      # the residual stream between layers

    @classmethod
    def of(cls, cfg: BenchConfig) -> "Precision":
        policy = compute_policy(cfg.dtype, cfg.autocast)
        if policy == "cast":
            return cls(matmul=2, normed=2, residual=2)
        if policy == "autocast":
            return cls(matmul=2, normed=FP32, residual=FP32)
        return cls(matmul=FP32, normed=FP32, residual=FP32)


def norm_bytes(h: int, p: Precision, tp: int, sequence_parallel: bool,
               fused: bool = False) -> float:
    """An RMSNorm per token: its float32 input, its normalized output and the weighted output
    that the next matmuls save (HuggingFace's RMSNorm upcasts to float32; a fused norm,
    ``--norm_impl fused`` or a compiled layer, is one kernel that keeps its input and no float32
    copy). With sequence parallelism the norm runs on 1/tp of the tokens and the matmuls save
    the gathered output."""
    own = (0 if fused else FP32) * h + p.normed * h
    return own / tp + p.matmul * h if sequence_parallel else own + p.matmul * h


def layer_activation_bytes(shapes: ModelShapes, p: Precision, tp: int,
                           sequence_parallel: bool, compiled: bool = False,
                           fused_norm: bool = False) -> float:
    """What one decoder layer saves for backward, per token: two norms; q/k norms (Qwen3;
    counted for every model, a small overestimate for Llama); q, k, v after rotary, the
    attention output, which o_proj saves too (SDPA writes it in the layout o_proj reads, so the
    transpose back is a view; SDPA/flash saves no score matrix); the log-sum-exp;
    gate, silu(gate), up and their product in the MLP (compiled: gate and up only, the rest
    is recomputed in backward). All but the norms split over tp.

    The compiled terms are calibrated on one H200 (docs/plan.md 4.3): torch.compile saved
    2.19 GB at batch 1 and 17.5 GB at batch 8 on Qwen3-1.7B, 41.0 kB per token and layer,
    the two norms' float32 copies and the MLP's two products (40.96 kB) to 0.1%; the compiled
    graph still keeps float32 q and k. Eager fused norms keep none of the float32 copies.
    Counting o_proj's input as a second copy of the attention output overestimated every
    eager GPU row by 2 bytes x q per token and layer (+0.8% to +2.9%; now within 0.6%)."""
    c = shapes.config
    q, kv, i = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, \
        c.intermediate_size
    qk_copy = FP32 if compiled or not fused_norm else 0
    attention = (qk_copy + p.matmul) * (q + kv) + p.matmul * (2 * q + 2 * kv) \
        + FP32 * c.num_attention_heads
    mlp = (2 if compiled else 4) * p.matmul * i
    return 2 * norm_bytes(c.hidden_size, p, tp, sequence_parallel, compiled or fused_norm) \
        + (attention + mlp) / tp


def logits_gathered(layout: MemoryLayout, shapes: ModelShapes, tp: int) -> bool:
    """A column-parallel lm_head that gathers its logits (a tied one stays whole)."""
    return layout.logits_gathered and tp > 1 and not shapes.config.tie_word_embeddings


def loss_bytes(layout: MemoryLayout, shapes: ModelShapes, p: Precision, tp: int,
               batch_size: int) -> tuple[float, float]:
    """(peak, saved) bytes per token of the logits and the loss.

    HuggingFace's loss: the logits, their float32 copy and log_softmax's output in forward
    (log_softmax's output is saved); in backward its gradient and the gradient of its input
    exist beside it (12 bytes per logit). The compiled loss (strategies.causal_loss, under
    --compile) keeps the logits and one float per row, and writes their gradient once. The fused
    vocabulary-parallel loss (strategies.vocab_parallel) keeps one float32 softmax and computes
    its gradient in place.
    """
    vocab = shapes.config.vocab_size
    local = math.ceil(vocab / tp) if layout.vocab_parallel else vocab
    logits = p.matmul
    saved = FP32 * local
    if layout.loss == "compiled":
        forward, backward, saved = logits * local, 2 * logits * local, logits * local
    elif layout.loss == "fused":
        copies = 2 if batch_size > 1 else 1          # the causal slice is copied when b > 1
        forward = (copies * logits + 2 * FP32) * local
        backward = (FP32 + 2 * logits) * local
    else:
        upcast = FP32 if logits < FP32 else 0
        forward = (logits + upcast + FP32) * local
        backward = 3 * FP32 * local
    if logits_gathered(layout, shapes, tp):          # local columns, then the gathered logits
        forward += logits * math.ceil(vocab / tp)
    return max(forward, backward), saved


# ---------------------------------------------------------------------- communication
@dataclass(frozen=True)
class Collective:
    """One kind of collective of one step on one rank."""

    group: str          # "tp" or "dp"
    kind: str           # "all_reduce", "all_gather" or "reduce_scatter"
    what: str
    calls: int          # per step
    bytes: int          # per step: the sum of the collectives' full (unsharded) sizes
    wire: int           # per step: what this rank sends, with ring algorithms

    @classmethod
    def ring(cls, group: str, kind: str, what: str, calls: int, total: float,
             ranks: int) -> "Collective":
        """``calls`` collectives of ``total`` full-size bytes together over ``ranks``."""
        factor = 2 * (ranks - 1) / ranks if kind == "all_reduce" else (ranks - 1) / ranks
        return cls(group, kind, what, calls, int(total), int(total * factor))


def tp_collectives(layout: MemoryLayout, shapes: ModelShapes, cfg: BenchConfig,
                   p: Precision, tp: int) -> list[Collective]:
    """Activations crossing the tp group in one step (every micro-batch)."""
    if tp == 1:
        return []
    c = shapes.config
    micro = cfg.gradient_accumulation_steps
    tokens = cfg.batch_size * cfg.seq_length
    act = tokens * c.hidden_size * p.matmul
    layers = c.num_layers
    # Two row-parallel outputs forward, two column-parallel input gradients backward, and the
    # recomputed forward's two with activation checkpointing.
    per_layer = 4 + (2 if cfg.activation_checkpointing else 0)
    out = []

    def add(kind: str, what: str, calls: int, size: float) -> None:
        out.append(Collective.ring("tp", kind, what, calls, calls * size, tp))

    if layout.sequence_parallel:
        add("all_gather", "layer inputs (sequence parallel)", micro * per_layer * layers // 2,
            act)
        add("reduce_scatter", "layer outputs (sequence parallel)",
            micro * per_layer * layers // 2, act)
    else:
        add("all_reduce", "layer outputs and input gradients", micro * per_layer * layers, act)
    if layout.vocab_parallel:
        add("reduce_scatter" if layout.sequence_parallel else "all_reduce", "embedding output",
            micro, act)
        if layout.sequence_parallel:
            add("all_gather", "lm_head input", micro, act)
        else:
            add("all_reduce", "lm_head input gradient", micro, act)
        add("all_reduce", "loss: max, sum of exp, target logit", 3 * micro, tokens * FP32)
    elif logits_gathered(layout, shapes, tp):
        add("all_gather", "logits", micro, tokens * c.vocab_size * p.matmul)
        add("all_reduce", "lm_head input gradient", micro, act)
    return out


def dp_collectives(layout: MemoryLayout, n: Counts, cfg: BenchConfig, dp: int,
                   layers: int) -> list[Collective]:
    """Parameters and gradients crossing the dp group in one step."""
    if dp == 1:
        return []
    micro = cfg.gradient_accumulation_steps
    grads = n.tp_local * FP32
    if layout.gathered:
        # FSDP2: every layer and the root gathered in forward, every layer but the last again
        # in backward (the root and the last layer stay gathered in between); gradients
        # reduce-scattered per layer once per step.
        gathered = (2 * n.tp_local - n.root - n.layer) * layout.gathered
        return [Collective.ring("dp", "all_gather", "parameters (compute copies)",
                                micro * 2 * layers, micro * gathered, dp),
                Collective.ring("dp", "reduce_scatter", "gradients (float32)", layers + 1,
                                grads, dp)]
    syncs = micro if layout.grad_sync_per_micro_batch else 1
    out = [Collective.ring("dp", layout.dp_grad_sync, "gradients (float32)", syncs,
                           syncs * grads, dp)]
    if layout.dp_param_gather:
        out.append(Collective.ring("dp", "all_gather", "updated parameters", 1,
                                   n.tp_local * layout.params.bytes_per_param, dp))
    return out


# ---------------------------------------------------------------------- the row
@dataclass
class PlanRow:
    """One configuration on one rank: what it holds, its peak, what it sends."""

    impl: str
    mesh: str
    dp: int
    tp: int
    options: dict[str, Any]
    memory: dict[str, int]          # bytes by kind (see docs/plan.md)
    phases: dict[str, int]          # bytes at each phase's peak
    peak: int
    peak_phase: str
    host_setup: int                 # host memory of this rank at set-up (a full build there)
    comm: list[Collective]
    budget: Optional[int] = None    # device memory, bytes
    notes: list[str] = field(default_factory=list)
    # The peak of the same configuration with one option changed, e.g.
    # {"activation_checkpointing": peak with checkpointing toggled} (filled by the front end).
    alternatives: dict[str, int] = field(default_factory=dict)

    @property
    def fits(self) -> Optional[bool]:
        return None if self.budget is None else self.peak <= self.budget

    @property
    def label(self) -> str:
        zero = self.options.get("zero_stage")
        return f"{self.impl}{'' if zero is None else f' ZeRO-{zero}'} {self.mesh}"

    def wire(self, group: str) -> int:
        return sum(c.wire for c in self.comm if c.group == group)

    def summary(self) -> str:
        """One line: the row and why it does or does not fit."""
        parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in self.memory.items() if v)
        return (f"{self.label}: {parts} GB -> peak {self.peak / GIB:.1f} GB "
                f"{PHASE_TEXT[self.peak_phase]}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(fits=self.fits, label=self.label)
        return out


def _bytes(held: Held, n: Counts, dp: int) -> int:
    return int(held.bytes_per_param * n.elements(held.over_dp, dp))


def layout_of(cfg: BenchConfig) -> Optional[MemoryLayout]:
    """The stack's declared layout for a resolved ``cfg`` (None: the stack declares none)."""
    strategy = registry.get(cfg.impl)
    return strategy.memory(cfg, cfg.dims) if strategy.memory is not None else None


def plan_row(cfg: BenchConfig, shapes: ModelShapes, budget: Optional[int] = None,
             build_on_device: Optional[bool] = None,
             layout: Optional[MemoryLayout] = None) -> Optional[PlanRow]:
    """The plan of a validated, resolved configuration (``registry.resolve``); None when its
    stack declares no memory layout. ``build_on_device``: where a stack that builds the full
    model first builds it (default: on the device when its float32 weights take under half
    of ``budget``, as autotp decides, or always without a budget). ``layout``: in place of the
    stack's own (a results file of an earlier version, `plan --check`)."""
    layout = layout or layout_of(cfg)
    if layout is None:
        return None
    dims: ParallelDims = cfg.dims
    dp, tp = dims.dp, dims.tp
    c = shapes.config
    p = Precision.of(cfg)
    n = counts(shapes, tp, dp, TPSplit(layout.vocab_parallel, layout.lm_head_split))
    tokens = cfg.batch_size * cfg.seq_length
    notes = []

    params = _bytes(layout.params, n, dp)
    master = _bytes(layout.master, n, dp)
    grads = _bytes(layout.grads, n, dp)
    optimizer = _bytes(layout.optimizer, n, dp)
    resident = params + master + optimizer

    # Activations: every layer's, or with checkpointing each layer's input and one layer
    # recomputed at a time; the final norm; the logits and the loss.
    # --compile compiles each decoder layer, not the final norm.
    fused_norm = cfg.norm_impl == "fused"
    per_layer = layer_activation_bytes(shapes, p, tp, layout.sequence_parallel,
                                       bool(cfg.compile), fused_norm) * tokens
    final_norm = norm_bytes(c.hidden_size, p, tp, layout.sequence_parallel, fused_norm) * tokens
    if cfg.activation_checkpointing:
        split = tp if layout.sequence_parallel else 1
        saved = c.num_layers * p.residual * c.hidden_size * tokens / split + final_norm
        recompute = per_layer
    else:
        saved, recompute = c.num_layers * per_layer + final_norm, 0.0
    loss_peak, loss_saved = (b * tokens for b in loss_bytes(layout, shapes, p, tp,
                                                             cfg.batch_size))
    activations = int(saved + loss_saved)
    logits = int(loss_peak)

    # Compute copies gathered by FSDP2: the root for the whole forward and backward, the layer
    # at work and the next (prefetched, or the last layer, kept between forward and backward).
    gathered = layout.gathered * (n.root + 2 * n.layer) if layout.gathered else 0
    # Transients of backward beside the saved activations: the loss's peak, one recomputed
    # layer, a reduce bucket.
    bucket = layout.backward_buffer
    forward_backward = resident + gathered + saved + max(loss_peak, recompute + bucket)
    if cfg.gradient_accumulation_steps > 1 and layout.gathered:
        # FSDP2 without gradient sync keeps unsharded float32 gradients between micro-batches.
        forward_backward += n.tp_local * FP32
    # End of backward: every gradient, and the copies made to reduce them. FSDP2 reduces
    # each layer from a float32 copy of its unsharded gradients, the first layer while the
    # root's parameters and unsharded gradients are still held, the root last; other stacks
    # copy the gradients beside their bucket.
    reduce = max(FP32 * n.root, FP32 * n.layer + 2 * layout.gathered * n.root) \
        if layout.gathered else 0
    sync = sum(_bytes(h, n, dp) for h in layout.sync_extra)
    if sync:
        sync += bucket
    backward_end = resident + max(grads + reduce, sync)
    step_extra = sum(_bytes(h, n, dp) for h in layout.step_extra)
    optimizer_step = resident + grads + step_extra
    # Set-up: a full float32 build (every parameter; the vocabulary shards made beside it, then
    # each layer's shards one parameter at a time), or the shards materialized one parameter
    # at a time, each drawn whole first.
    setup_extra = sum(_bytes(h, n, dp) for h in layout.setup_extra)
    full_model = FP32 * c.num_parameters
    host_setup = 0
    if layout.build == "full":
        if build_on_device is None:
            build_on_device = budget is None or full_model < budget / 2
        full_build = full_model + FP32 * (n.largest_layer_full
                                          + (n.vocab_local if layout.vocab_parallel else 0))
        build = full_build if build_on_device else 0
        host_setup = 0 if build_on_device else full_build
        if not build_on_device:
            notes.append("the full float32 model is built in host memory")
        setup = max(build, params + master + setup_extra)
    else:
        setup = params + master + FP32 * n.init_transient

    phases = {"setup": int(setup), "forward_backward": int(forward_backward),
              "backward_end": int(backward_end), "optimizer_step": int(optimizer_step)}
    peak_phase = max(phases, key=phases.get)
    memory = {"params": params, "master": master, "grads": grads, "optimizer": optimizer,
              "activations": activations, "logits": logits, "gathered": int(gathered),
              "transient": int(max(step_extra, reduce, recompute + bucket, sync, setup_extra))}
    comm = tp_collectives(layout, shapes, cfg, p, tp) + dp_collectives(layout, n, cfg, dp,
                                                                       c.num_layers)
    options = {"zero_stage": cfg.zero_stage, "vocab_parallel": layout.vocab_parallel,
               "sequence_parallel": layout.sequence_parallel,
               "activation_checkpointing": cfg.activation_checkpointing,
               "policy": compute_policy(cfg.dtype, cfg.autocast), "dtype": cfg.dtype,
               "batch_size": cfg.batch_size, "seq_length": cfg.seq_length,
               "gradient_accumulation_steps": cfg.gradient_accumulation_steps}
    return PlanRow(cfg.impl, dims.label, dp, tp, options, memory, phases, phases[peak_phase],
                   peak_phase, int(host_setup), comm, budget, notes)


# ---------------------------------------------------------------------- configurations
def resolve_for(cfg: BenchConfig, impl: str, dims: ParallelDims) -> BenchConfig:
    """``cfg`` for ``impl`` at ``dims``, resolved: options the impl does not take are dropped
    (a plan over several impls passes each its own), then the impl's defaults filled in."""
    from tp_bench.core.config import IMPL_OPTIONS

    strategy = registry.get(impl)
    dropped = {name: None for name in IMPL_OPTIONS if name not in strategy.options}
    base = replace(cfg, impl=impl, dp_size=dims.dp, tp_size=dims.tp, **dropped)
    return registry.resolve(base.validate(dims.world_size))


def fits(cfg: BenchConfig, shapes: ModelShapes,
         device_memory_bytes: int) -> tuple[bool, Optional[PlanRow]]:
    """Does ``cfg`` (validated and resolved) fit in ``device_memory_bytes`` per rank? Returns
    (fits, the plan row that says why). A stack that declares no memory layout always fits
    (row None): the plan never refuses what it cannot predict."""
    row = plan_row(cfg, shapes, budget=device_memory_bytes)
    if row is None:
        return True, None
    return row.peak <= device_memory_bytes, row


def check_heads(shapes: ModelShapes, dims: ParallelDims) -> Optional[str]:
    """Why ``dims`` cannot split this model's heads, or None."""
    try:
        dims.check_heads(shapes.config.model_name, shapes.config.num_attention_heads,
                         shapes.config.num_key_value_heads)
    except ConfigError as exc:
        return str(exc)
    return None
