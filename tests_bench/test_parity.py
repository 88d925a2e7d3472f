"""Did the benchmark measure a correct training step? Each impl's losses, gradient norms and
step-0 gradients on the current mesh against the plain model trained in one process on the
global batch (tp_bench.parity), with the suite's model, precision and options."""

import pytest
import torch.distributed as dist

from tp_bench import parity
from tp_bench.suite import open_session

STEPS = 3   # enough for the loss to move; the reference trains the full model on rank 0


@pytest.mark.parity
@pytest.mark.slow
def test_parity(tp_bench_prepared, tp_bench_dist):
    # A fresh session: parity needs the initial weights, which the benchmark entries train on.
    with open_session(tp_bench_prepared) as session:
        report = parity.check(session, STEPS)
        verdict = [None]
        if report is not None:   # rank 0
            tolerances = parity.Tolerances.for_dtype(session.cfg.dtype)
            verdict = [(report.ok(tolerances),
                        parity.format_report(report, tolerances, session.cfg))]
        if tp_bench_dist.world_size > 1:
            dist.broadcast_object_list(verdict, src=0)
    ok, text = verdict[0]
    assert ok, text
