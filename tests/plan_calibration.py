"""Under torchrun: what the strategies actually hold against the memory plan (engine.plan).

For each configuration (a JSON list of option lists in argv[1]), one session is built and
trained for a step; then rank 0 prints one ``CALIBRATION {json}`` line with the bytes measured
and planned per state:

- params: the module's parameters (DTensor local shards; one storage counted once, so a flat
  buffer that the parameters view is counted whole);
- master: the float32 copies the optimizer updates when they are not the module's (DeepSpeed);
- optimizer: AdamW's state tensors;
- grads: what backward leaves for the optimizer step, measured as the live tensors after the
  last backward minus those after the step (the step frees them all), so that DeepSpeed's
  internal buffers count whatever they are called;
- live: every tensor reachable from Python after the backward, but those that existed before
  the session (a DeepSpeed engine of an earlier session in the process can outlive it).
"""

from __future__ import annotations

import gc
import json
import sys

import torch

from tp_bench.core import dist as distributed
from tp_bench.engine.plan import plan_row
from tp_bench.engine.session import prepare
from tp_bench.engine.shapes import model_shapes
from tp_bench.frontends.arguments import parse_config


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if t is None:
            continue
        t = _local(t)
        if t.device.type == "meta" or t.numel() == 0:
            continue
        s = t.untyped_storage()
        out[s.data_ptr()] = s.nbytes()
    return out


def live() -> dict[int, int]:
    gc.collect()
    return storages(o for o in gc.get_objects() if isinstance(o, torch.Tensor))


def states(session) -> dict[str, int]:
    trainer = session.trainer
    params = storages(trainer.model.parameters())
    optimizer = getattr(trainer, "optimizer", None)
    master: dict[int, int] = {}
    if optimizer is None:                            # DeepSpeed: the wrapped torch optimizer
        wrapper = trainer.engine.optimizer
        optimizer = getattr(wrapper, "optimizer", wrapper)
        master = {k: v for k, v in storages(p for g in optimizer.param_groups
                                            for p in g["params"]).items() if k not in params}
        fp32_groups = getattr(wrapper, "fp32_groups", None)     # FP16_UnfusedOptimizer
        if fp32_groups:
            master.update(storages(p for g in fp32_groups for p in g))
    state = storages(v for st in optimizer.state.values() for v in st.values()
                     if isinstance(v, torch.Tensor) and v.numel() > 1)
    return {"params": sum(params.values()), "master": sum(master.values()),
            "optimizer": sum(state.values())}


def calibrate(argv: list[str], ctx) -> dict:
    cfg = parse_config(argv + ["--num_training_steps", "10", "--warmup_steps", "0"])
    before = live()
    session = prepare(cfg, ctx)
    session.setup()
    driver = session.driver("none")
    driver.step()                                    # AdamW's state is made at the first step
    for phase in ("data", "forward", "backward"):
        driver.run_phase(phase)
    after_backward = {k: v for k, v in live().items() if k not in before}
    held = states(session)
    driver.run_phase("optimizer")
    after_step = live()
    grads = sum(v for k, v in after_backward.items() if k not in after_step)
    row = plan_row(session.cfg, model_shapes(cfg.model_name, cfg.num_layers))
    out = {"args": argv, "mesh": session.cfg.dims.label, "impl": session.cfg.impl,
           "zero_stage": session.cfg.zero_stage,
           "measured": {**held, "grads": grads, "live": sum(after_backward.values())},
           "planned": {k: row.memory[k] for k in ("params", "master", "optimizer", "grads")}}
    session.close()
    return out


def main() -> None:
    ctx = distributed.setup()
    for argv in json.loads(sys.argv[1]):
        out = calibrate(argv, ctx)
        if ctx.is_rank0:
            print("CALIBRATION " + json.dumps(out), flush=True)
    distributed.teardown()


if __name__ == "__main__":
    main()
    distributed.leave(0)
