"""Did the benchmark measure a correct training step? Each impl's losses, gradient norms and
step-0 gradients on the current mesh against the plain model trained in one process on the
global batch (tp_bench.engine.parity), with the suite's model, precision and options."""

import pytest

from tp_bench.core.dist import from_rank0
from tp_bench.engine import parity

STEPS = 3   # enough for the loss to move; the reference trains the full model on rank 0


@pytest.mark.parity
@pytest.mark.slow
def test_parity(tp_bench_prepared):
    # A fresh session: parity needs the initial weights, which the benchmark entries train on.
    session = tp_bench_prepared
    session.setup()
    try:
        report = parity.check(session, STEPS)
        verdict = None
        if report is not None:   # rank 0
            tolerances = parity.Tolerances.for_dtype(session.cfg.dtype)
            verdict = (report.ok(tolerances),
                       parity.format_report(report, tolerances, session.cfg))
        ok, text = from_rank0(verdict)
    finally:
        session.close()
    assert ok, text
