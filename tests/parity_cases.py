"""Several ``tp-bench parity`` checks in one torchrun launch, one process group: the parity
tests start the interpreter and its libraries once per world size instead of once per case.

    torchrun --nproc_per_node=N tests/parity_cases.py OUT_DIR CASES_JSON

CASES_JSON maps a case name to its parity arguments; each case's report goes to
OUT_DIR/<name>.json (rank 0), its output to OUT_DIR/<name>.log. A case that raises is recorded
in OUT_DIR/<name>.error and the launch stops there (the other ranks may be inside a collective).
"""

import contextlib
import json
import sys
import traceback
from pathlib import Path

from tp_bench.core import dist
from tp_bench.frontends.cli import parity_parser, run_parity


def main() -> int:
    out, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    ctx = dist.setup()
    for name, argv in cases.items():
        args = parity_parser().parse_args([*argv, "--report", str(out / f"{name}.json")])
        log = out / f"{name}.log" if ctx.rank == 0 else Path("/dev/null")
        with open(log, "w") as stream, contextlib.redirect_stdout(stream):
            try:
                run_parity(args, ctx)
            except BaseException:   # noqa: BLE001 - recorded, then the launch stops
                (out / f"{name}.error").write_text(f"rank {ctx.rank}:\n{traceback.format_exc()}")
                return 1
    dist.teardown()
    return 0


if __name__ == "__main__":
    dist.leave(main())
