"""Does a strategy train the same model? Compare it with a single-process reference.

The reference is the plain HuggingFace model, initialized by the same ``init_weights`` (so the
weights are identical), trained with torch AdamW on the *global* batch (every dp replica's
micro-batches concatenated) with the same clipping and accumulation. Compared: the loss of
every step, the pre-clip gradient norm of every step, and (where the strategy can gather them)
the step-0 gradients of every parameter.

Run it under torchrun: ``tp-bench parity --impl fsdp_dtensor --model_name tiny ...``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from tp_bench.core.config import BenchConfig
from tp_bench.core.data import SyntheticData
from tp_bench.core.precision import TORCH_DTYPES, compute_policy
from tp_bench.engine.driver import dp_mean
from tp_bench.engine.session import Session
from tp_bench.models.base import canonical_param_name
from tp_bench.strategies.base import Trainer


@dataclass
class Trace:
    """What one training run produced, step by step."""

    losses: list[float] = field(default_factory=list)
    grad_norms: list[Optional[float]] = field(default_factory=list)
    grads: dict[str, torch.Tensor] = field(default_factory=dict)   # step 0, full, on CPU


def reference_trace(cfg: BenchConfig, num_steps: int, device: torch.device,
                    capture_grads: bool = True) -> Trace:
    """Train the unsharded model in one process on the global batch, under the same compute
    policy as the strategies (``core.precision.compute_policy``): with "cast", forward and
    backward run on a copy of the float32 master model in the compute dtype, whose gradients
    are taken back to float32 for clipping and AdamW; with "autocast", on the float32 model
    under torch.autocast."""
    import copy

    from tp_bench.models import get_model_builder

    builder = get_model_builder(cfg.model_name)
    master = builder.create_model(device, torch.float32, num_layers=cfg.num_layers,
                                  attn_impl=cfg.attn_impl, norm_impl=cfg.norm_impl)
    builder.init_weights(master, cfg.seed)
    optimizer = torch.optim.AdamW(master.parameters(), lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    policy = compute_policy(cfg.dtype, cfg.autocast)
    # deepcopy keeps tied weights tied; parameters() lists both models in the same order
    work = copy.deepcopy(master).to(TORCH_DTYPES[cfg.dtype]) if policy == "cast" else master
    data = SyntheticData(master.config.vocab_size, cfg.batch_size, cfg.seq_length, cfg.seed)
    ga = cfg.gradient_accumulation_steps
    trace = Trace()
    for step in range(num_steps):
        losses = []
        for micro in range(ga):
            batch = data.global_batch(step, micro, cfg.dp_size).to(device)
            with torch.autocast(device.type, dtype=TORCH_DTYPES[cfg.dtype],
                                enabled=policy == "autocast"):
                loss = work(input_ids=batch.input_ids, labels=batch.labels, use_cache=False).loss
            (loss / ga).backward()
            losses.append(loss.detach().float())
        if work is not master:
            for p, w in zip(master.parameters(), work.parameters()):
                p.grad, w.grad = (None if w.grad is None else w.grad.float()), None
        if step == 0 and capture_grads:
            trace.grads = {canonical_param_name(n): p.grad.detach().float().cpu().clone()
                           for n, p in master.named_parameters() if p.grad is not None}
        # Exact (float64) norm: a float32 norm over millions of elements is off by ~1e-4,
        # which would eat the tolerance the strategy's own float32 norm is judged by.
        grads = [p.grad for p in master.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([g.double() for g in grads], 2.0)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(master.parameters(), cfg.max_grad_norm, norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if work is not master:
            with torch.no_grad():
                for p, w in zip(master.parameters(), work.parameters()):
                    w.copy_(p)
        trace.losses.append(torch.stack(losses).mean().item())
        trace.grad_norms.append(norm.item())
    return trace


def strategy_trace(session: Session, num_steps: int, capture_grads: bool = True) -> Trace:
    """Train with the session's strategy (already set up) through the step driver; every rank
    returns the same trace."""
    trace = Trace()
    driver = session.driver("none")

    def capture(trainer: Trainer) -> None:
        trace.grads = {k: v.float().cpu() for k, v in (trainer.full_gradients() or {}).items()}

    for step in range(num_steps):
        pending = driver.step(capture if step == 0 and capture_grads else None)
        loss = dp_mean(pending.loss.float().reshape(1).to(session.ctx.device),
                       session.ctx.world_size)
        trace.losses.append(loss.item())
        norm = pending.stats.grad_norm
        trace.grad_norms.append(None if norm is None else float(norm))
    return trace


@dataclass(frozen=True)
class Tolerances:
    step0_loss: float      # absolute
    loss: float            # absolute, any step
    grad_norm: float       # relative; the strategy's float32 norm is itself only good to ~1e-4
    grad: float            # relative ||g - g_ref|| / ||g_ref||, per parameter

    @classmethod
    def for_dtype(cls, dtype: str) -> "Tolerances":
        if dtype == "float32":
            return cls(step0_loss=1e-5, loss=1e-3, grad_norm=1e-3, grad=1e-4)
        return cls(step0_loss=5e-2, loss=5e-2, grad_norm=5e-2, grad=5e-2)


@dataclass
class ParityReport:
    step0_loss_diff: float
    max_loss_diff: float                 # over all steps
    loss_change: float                   # reference's first minus last loss: the test's power
    max_grad_norm_rel_diff: Optional[float]
    max_grad_rel_diff: Optional[float]   # over parameters, ||g - g_ref|| / ||g_ref||
    worst_grad: Optional[str]
    strategy: Trace
    reference: Trace

    def ok(self, tol: Tolerances) -> bool:
        checks = [(self.step0_loss_diff, tol.step0_loss), (self.max_loss_diff, tol.loss),
                  (self.max_grad_norm_rel_diff, tol.grad_norm), (self.max_grad_rel_diff, tol.grad)]
        return all(value <= limit for value, limit in checks if value is not None)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("strategy", "reference")} | {
            "strategy_losses": self.strategy.losses, "reference_losses": self.reference.losses}


def compare(strategy: Trace, reference: Trace) -> ParityReport:
    diffs = [abs(a - b) for a, b in zip(strategy.losses, reference.losses)]
    norm_diffs = [abs(a - b) / max(abs(b), 1e-12)
                  for a, b in zip(strategy.grad_norms, reference.grad_norms) if a is not None]
    worst, worst_name = None, None
    if strategy.grads:
        missing = sorted(set(reference.grads) - set(strategy.grads))
        if missing:
            raise AssertionError(f"strategy gradients lack {len(missing)} parameters, "
                                 f"e.g. {missing[:3]}")
        for name, ref in reference.grads.items():
            got = strategy.grads[name]
            if got.shape != ref.shape:
                raise AssertionError(f"{name}: gradient shape {tuple(got.shape)} "
                                     f"!= reference {tuple(ref.shape)}")
            rel = ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()
            if worst is None or rel > worst:
                worst, worst_name = rel, name
    return ParityReport(
        step0_loss_diff=diffs[0], max_loss_diff=max(diffs),
        loss_change=reference.losses[0] - reference.losses[-1],
        max_grad_norm_rel_diff=max(norm_diffs) if norm_diffs else None,
        max_grad_rel_diff=worst, worst_grad=worst_name,
        strategy=strategy, reference=reference)


def check(session: Session, num_steps: int = 5, capture_grads: bool = True) -> Optional[ParityReport]:
    """Run the strategy, then (rank 0) the reference; rank 0 returns the report, others None."""
    got = strategy_trace(session, num_steps, capture_grads)
    if session.ctx.rank != 0:
        return None
    ref = reference_trace(session.cfg, num_steps, session.ctx.device, capture_grads)
    return compare(got, ref)


def format_report(report: ParityReport, tol: Tolerances, cfg: BenchConfig) -> str:
    def verdict(value, tol):
        return "n/a" if value is None else f"{value:.3e} ({'ok' if value <= tol else 'FAIL'} <= {tol:g})"

    lines = [f"parity: {cfg.impl} {cfg.dims.label} {cfg.model_name} {cfg.dtype}, "
             f"{len(report.reference.losses)} steps vs single-process reference",
             f"  step-0 loss diff      {verdict(report.step0_loss_diff, tol.step0_loss)}",
             f"  max loss diff         {verdict(report.max_loss_diff, tol.loss)}",
             f"  grad-norm rel diff    {verdict(report.max_grad_norm_rel_diff, tol.grad_norm)}",
             f"  step-0 grad rel diff  {verdict(report.max_grad_rel_diff, tol.grad)}"
             + (f"  worst: {report.worst_grad}" if report.worst_grad else ""),
             f"  loss {report.reference.losses[0]:.5f} -> {report.reference.losses[-1]:.5f} "
             f"(reference), -> {report.strategy.losses[-1]:.5f} (strategy)"]
    return "\n".join(lines)
