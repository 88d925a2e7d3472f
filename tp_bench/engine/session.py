"""A session: one configuration, validated (``prepare``), then built (``setup``): the mesh, the
model, the strategy's parallelization and trainer, the data. Also the one place that says what a
run was (``record``), for the results file, the suite's entries and the self-checks.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from tp_bench.core import results
from tp_bench.core.config import BenchConfig
from tp_bench.core.data import SyntheticData
from tp_bench.core.dims import Mesh, build_mesh
from tp_bench.core.dist import DistContext, all_ranks, from_rank0
from tp_bench.core.errors import ConfigError
from tp_bench.core.topology import Topology, node_name
from tp_bench.core.metrics import (MemoryMeter, PhaseTimer, Throughput, peak_tflops_for,
                                   process_age_s, setup_memory_gb)
from tp_bench.engine.driver import StepDriver, release_gc
from tp_bench.engine.fit import check_fit
from tp_bench.models import get_model_builder
from tp_bench.models.base import BaseModelBuilder, ModelConfig
from tp_bench.strategies import registry
from tp_bench.strategies.base import Parallelized, Strategy, Trainer

log = logging.getLogger(__name__)


@dataclass
class Session:
    """Everything one benchmark run needs; ``prepare`` makes one before any model exists."""

    cfg: BenchConfig                 # validated, impl defaults resolved
    ctx: DistContext
    strategy: Strategy
    builder: BaseModelBuilder
    model_config: ModelConfig
    throughput: Throughput
    topology: Topology
    mesh: Optional[Mesh] = None
    parallelized: Optional[Parallelized] = None
    trainer: Optional[Trainer] = None
    data: Optional[SyntheticData] = None
    memory: Optional[MemoryMeter] = None
    setup_time_s: Optional[float] = None
    startup: dict[str, Any] = field(default_factory=dict)   # rank 0's launch-to-first-step costs

    @property
    def dp_rank(self) -> int:
        return self.cfg.dims.coords(self.ctx.rank)[0]

    def setup(self) -> None:
        """Build: mesh -> model (meta or real, or the strategy's ``build_model``) ->
        parallelize -> materialize -> trainer."""
        cfg, builder, device = self.cfg, self.builder, self.ctx.device
        start = time.perf_counter()
        self.mesh = build_mesh(cfg.dims, self.ctx.rank, device.type)
        if self.strategy.build_model is not None:
            # The stack's own model definition; its parallelize materializes and initializes it.
            model = self.strategy.build_model(cfg, builder, self.mesh, device)
            self.parallelized = self.strategy.parallelize(model, builder, self.mesh, cfg, device)
        else:
            self.parallelized = self._parallelize_builder_model()
        self.trainer = self.strategy.trainer(self.parallelized, cfg, self.mesh, device)
        log.info("%s: %s", cfg.impl, ", ".join(self.parallelized.techniques) or "plain model")
        self.data = SyntheticData(self.model_config.vocab_size, cfg.batch_size, cfg.seq_length,
                                  cfg.seed)
        self.memory = MemoryMeter(device)
        if device.type == "cuda":
            torch.cuda.synchronize()  # initialization kernels count as set-up, not as step 0
        self.setup_time_s = time.perf_counter() - start
        self.startup = {"setup_time_s": self.setup_time_s,
                        "launch_to_first_step_s": process_age_s(),
                        **setup_memory_gb(device)}

    def _parallelize_builder_model(self) -> Parallelized:
        """The builder's (HuggingFace) model, built where the strategy asks, then sharded."""
        cfg, builder, device = self.cfg, self.builder, self.ctx.device
        where = self.strategy.build_device(cfg, builder, device)
        model = builder.create_model(where, torch.float32, num_layers=cfg.num_layers,
                                     attn_impl=cfg.attn_impl, norm_impl=cfg.norm_impl)
        if where != "meta":
            builder.init_weights(model, cfg.seed)   # full values first, then sharded copies
        parallelized = self.strategy.parallelize(model, builder, self.mesh, cfg, device)
        if where == "meta":
            builder.materialize(parallelized.model, device, cfg.seed)
            parallelized.techniques.append("meta-device init")
        return parallelized

    def driver(self, timing: str, per_step_memory: bool = True) -> StepDriver:
        """A step driver over the built session, its phases stamped in ``timing`` mode."""
        return StepDriver(self.trainer, self.data, self.dp_rank,
                          self.cfg.gradient_accumulation_steps,
                          PhaseTimer(timing, self.ctx.device), self.memory, per_step_memory)

    def close(self) -> None:
        """Drop the model, gradients and optimizer state, so that the next session in this
        process (the pytest suite builds several) finds the memory free."""
        self.parallelized = self.trainer = self.data = None
        release_gc()   # a driver turned automatic collection off
        gc.collect()   # modules and optimizer state form reference cycles
        if self.ctx.device.type == "cuda":
            torch.cuda.empty_cache()

    def record(self) -> dict[str, Any]:
        """What this run is: options, model, precision, strategy, environment (the results
        file's blocks, a suite entry's extra_info and the self-checks' reports share them)."""
        ctx, par, trainer = self.ctx, self.parallelized, self.trainer
        env = results.environment(ctx.device, ctx.world_size, ctx.backend)
        env.update(self.strategy.environment())
        env["topology"] = self.topology.record(self.cfg.dims)
        strategy: dict[str, Any] = {"impl": self.strategy.name}
        if par is not None:
            strategy.update(par.settings)
            strategy["tp_plan"] = par.plan
        if trainer is not None:
            strategy.update(trainer.describe())
        return {
            "config": self.cfg.to_dict(),
            "model": {**self.model_config.to_dict(),
                      "flops_per_token": self.throughput.flops_per_token},
            "precision": ({**par.precision, "loss_scaling": trainer.loss_scaling}
                          if par is not None and trainer is not None else None),
            "strategy": strategy,
            "environment": env,
        }


def prepare(cfg: BenchConfig, ctx: DistContext) -> Session:
    """Validate everything that can be checked without building the model (ConfigError on every
    rank alike, before any large allocation)."""
    cfg = registry.resolve(cfg.validate(ctx.world_size))
    strategy = registry.get(cfg.impl)
    builder = get_model_builder(cfg.model_name)
    model_config = builder.model_config(cfg.num_layers)
    cfg.dims.check_heads(cfg.model_name, model_config.num_attention_heads,
                         model_config.num_key_value_heads)
    strategy.check(cfg, builder, ctx.device)
    if not cfg.force:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
        problem = None
        try:
            check_fit(cfg, ctx.device.type, local_ranks)
        except ConfigError as exc:
            problem = str(exc)
        problem = from_rank0(problem)   # ranks may read the free memory differently
        if problem:
            raise ConfigError(problem)
    nodes = all_ranks(node_name())
    if len(nodes) != ctx.world_size:     # no process group: a world of one, or a dry check
        nodes = nodes[:1] * ctx.world_size
    topology = Topology(tuple(nodes))
    topology.check_tp(cfg.dims, cfg.allow_cross_node_tp)
    throughput = Throughput(
        tokens_per_step=cfg.tokens_per_step, samples_per_step=cfg.samples_per_step,
        world_size=ctx.world_size, flops_per_token=model_config.flops_per_token(cfg.seq_length),
        peak_tflops=peak_tflops_for(ctx.device, cfg.peak_tflops))
    return Session(cfg, ctx, strategy, builder, model_config, throughput, topology)


def check_output_dir(session: Session) -> None:
    """Rank 0 writes the results: it checks that it can, and every rank stops alike if not."""
    problem = None
    if session.ctx.is_rank0:
        try:
            results.check_output_dir(session.cfg.output_dir)
        except ConfigError as exc:
            problem = str(exc)
    problem = from_rank0(problem)
    if problem:
        raise ConfigError(problem)
