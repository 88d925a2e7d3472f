"""pytest plugin for the benchmark suite (tests_bench/): options, markers, fixtures, rank
discipline.

Loaded through the ``pytest11`` entry point (from any directory once tp_bench is installed) or
by the repository's root conftest.py. Under torchrun every rank runs pytest, and:

- collection and parametrization depend only on the world size, the options and the registered
  strategies, so every rank runs the same tests in the same order;
- only rank 0 prints and writes pytest-benchmark output: ranks > 0 get a silent terminal
  reporter and no --benchmark-json / --benchmark-save / --benchmark-autosave;
- after each test phase the ranks agree on its outcome (``tp_bench.rank_agreement``): a test
  that fails on one rank fails on every rank and the session goes on, or, when a rank is stuck
  in a collective, the session stops on every rank after rank 0 has saved the passed tests.

Nothing here imports torch until a suite test is collected: the plugin is loaded by every
pytest run in an environment where tp_bench is installed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest

from tp_bench.parallel.factory import available_strategies

IMPL_FIXTURE, MESH_FIXTURE = "tp_bench_impl", "tp_bench_mesh"
_SUITE_FIXTURES = {IMPL_FIXTURE, MESH_FIXTURE, "tp_bench_dist"}
_MARKERS = {
    "gpu": "runs on a GPU (auto-applied when CUDA is present; a test marked by hand is "
           "skipped without one)",
    "multi_gpu": "runs on several GPUs (auto-applied to meshes of more than one rank on CUDA; a "
                 "test marked by hand is skipped on one)",
    "parity": "checks the training step against a single-process reference",
    "slow": "takes longer than a benchmark entry (trains a reference model too)",
}


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@dataclass
class _State:
    """This pytest process's view of the run, kept in ``config.stash``."""

    rank: int
    world_size: int
    meshes: list                   # MeshShape, the parametrization of tp_bench_mesh
    active: bool = False           # the session runs suite tests (decided at collection)
    ctx: Any = None                # SharedMeshContext, once the process group exists
    guard: Any = None              # FailureGuard (several ranks only)
    agreement: Any = None          # RankAgreement (several ranks only)
    index: int = 0                 # the running test's position in the session
    failed: set = field(default_factory=set)     # nodeids failed in some phase on some rank
    finished: set = field(default_factory=set)   # nodeids whose teardown was agreed

    def context(self, config: pytest.Config):
        """The process group (created on first use) as a DistContext."""
        if self.ctx is None:
            from tp_bench import distributed
            from tp_bench.suite import SharedMeshContext

            ctx = distributed.setup()
            self.ctx = SharedMeshContext(**{k: getattr(ctx, k) for k in
                                            ("rank", "world_size", "local_rank", "device",
                                             "backend")})
            if self.world_size > 1:
                self._start_agreement(config)
        return self.ctx

    def _start_agreement(self, config: pytest.Config) -> None:
        import torch.distributed as dist

        from tp_bench.distributed import FailureGuard
        from tp_bench.rank_agreement import RankAgreement

        store = dist.distributed_c10d._get_default_store()
        self.guard = FailureGuard(self.ctx, on_abort=lambda message: _save_on_abort(config))
        self.guard.__enter__()
        self.agreement = RankAgreement(
            self.ctx, store, self.guard, grace_s=config.getoption("tp_bench_failure_grace"),
            timeout_s=dist.default_pg_timeout.total_seconds())  # as long as a collective waits
        self.agreement.start()

    def close(self) -> None:
        if self.agreement is not None:
            self.agreement.stop()
            self.guard.__exit__(None, None, None)
        if self.ctx is not None:
            from tp_bench import distributed

            distributed.teardown()
        self.ctx = self.agreement = self.guard = None


_STATE = pytest.StashKey[_State]()


def _state(config: pytest.Config) -> _State:
    return config.stash[_STATE]


# ---------------------------------------------------------------------- options and markers
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tp_bench", "tp_bench benchmark suite (tests_bench)")
    group.addoption("--tp-bench-mesh", action="append", metavar="DPxTP",
                    help="Mesh shapes to run, e.g. 2x4 (repeat or separate with commas); "
                         "default: every dp x tp = world size")
    group.addoption("--tp-bench-model", metavar="NAME",
                    help="Model preset, config directory or .json (as benchmark.py "
                         "--model_name) [default: tiny without a GPU, Qwen/Qwen3-0.6B with one]")
    group.addoption("--tp-bench-layers", type=int, metavar="N",
                    help="Number of layers, 0 = the model's [default: 2 without a GPU, 0 with one]")
    group.addoption("--tp-bench-seq", type=int, metavar="N",
                    help="Sequence length [default: 64 without a GPU, 2048 with one]")
    group.addoption("--tp-bench-batch", type=int, metavar="N",
                    help="Per-GPU micro batch size [default: 2 without a GPU, 1 with one]")
    group.addoption("--tp-bench-dtype", metavar="DTYPE",
                    help="Compute dtype: bfloat16, float16, float32 [default: bfloat16]")
    group.addoption("--tp-bench-rounds", type=int, metavar="N",
                    help="Timed rounds (training steps) per entry [default: 3 without a GPU, "
                         "10 with one]")
    group.addoption("--tp-bench-warmup", type=int, metavar="N",
                    help="Untimed warm-up rounds per entry [default: 1 without a GPU, 3 with one]")
    group.addoption("--tp-bench-args", default="", metavar="'OPTIONS'",
                    help="Further benchmark.py options for every entry, e.g. "
                         "'--zero_stage 2 --activation_checkpointing'")
    group.addoption("--tp-bench-failure-grace", type=float, default=60.0, metavar="SECONDS",
                    help="When a test fails on one rank, how long the other ranks may take to "
                         "finish that test phase before they are taken as stuck in a collective "
                         "and the session stops [default: 60]")


def _meshes(config: pytest.Config, world_size: int) -> list:
    from tp_bench.mesh_shape import MeshShape, mesh_shapes

    chosen = config.getoption("tp_bench_mesh")
    if not chosen:
        return mesh_shapes(world_size)
    try:
        meshes = [MeshShape.parse(t) for text in chosen for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise pytest.UsageError(f"--tp-bench-mesh: {exc}") from None
    for mesh in meshes:
        if mesh.dp * mesh.tp != world_size:
            raise pytest.UsageError(f"--tp-bench-mesh {mesh.dp}x{mesh.tp} needs "
                                    f"{mesh.dp * mesh.tp} ranks; the world size is {world_size}")
    return list(dict.fromkeys(meshes))


def _mark(config: pytest.Config, name: str, description: str) -> pytest.MarkDecorator:
    """pytest.mark.<name>, registered first (pytest.ini lists the common ones) so that
    --strict-markers accepts any mesh size."""
    if not any(line.split(":")[0].strip() == name for line in config.getini("markers")):
        config.addinivalue_line("markers", f"{name}: {description}")
    return getattr(pytest.mark, name)


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Ranks > 0 write no pytest-benchmark files; runs before pytest-benchmark reads its options."""
    if _env_int("RANK", 0) > 0 and hasattr(config.option, "benchmark_json"):
        opt = config.option
        opt.benchmark_json = opt.benchmark_save = opt.benchmark_autosave = None
        opt.benchmark_histogram = []
        opt.benchmark_cprofile_dump = []
        opt.benchmark_quiet = True


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    config.stash[_STATE] = _State(rank=rank, world_size=world_size,
                                  meshes=_meshes(config, world_size))
    for name, description in _MARKERS.items():
        _mark(config, name, description)
    if rank > 0:
        # A reporter on a null stream: every hook that writes to the terminal still runs (and
        # fails or passes the same way), but only rank 0 is heard. Builtin plugins that keep
        # the reporter are configured after this one (trylast hooks run in reverse order).
        manager = config.pluginmanager
        if manager.get_plugin("terminalreporter") is not None:
            manager.unregister(name="terminalreporter")
            null = open(os.devnull, "w")
            config.add_cleanup(null.close)
            manager.register(pytest.TerminalReporter(config, null), "terminalreporter")


# ---------------------------------------------------------------------- parametrization
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    config, names = metafunc.config, metafunc.fixturenames
    if IMPL_FIXTURE in names:
        impls = [pytest.param(name, id=name, marks=_mark(config, name, f"the {name} strategy"))
                 for name in available_strategies()]
        metafunc.parametrize(IMPL_FIXTURE, impls, indirect=True, scope="module")
    if MESH_FIXTURE in names:
        import torch

        cuda = torch.cuda.is_available()
        params = []
        for mesh in _state(config).meshes:
            marks = [_mark(config, f"dp{mesh.dp}", f"data-parallel size {mesh.dp}"),
                     _mark(config, f"tp{mesh.tp}", f"tensor-parallel size {mesh.tp}")]
            if cuda:
                marks.append(pytest.mark.gpu)
                if mesh.dp * mesh.tp > 1:
                    marks.append(pytest.mark.multi_gpu)
            params.append(pytest.param(mesh, id=mesh.id, marks=marks))
        metafunc.parametrize(MESH_FIXTURE, params, indirect=True, scope="module")


def _uses_suite(item: pytest.Item) -> bool:
    return bool(_SUITE_FIXTURES & set(getattr(item, "fixturenames", ())))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """After -m/-k selection: does this session run suite tests? The same answer on every rank."""
    state = _state(config)
    state.active = any(_uses_suite(item) for item in items)
    if state.active:
        from tp_bench.suite import device_clock

        for item in items:
            if _uses_suite(item) and "benchmark" in item.fixturenames:
                item.add_marker(pytest.mark.benchmark(timer=device_clock))


def pytest_collectreport(report: pytest.CollectReport) -> None:
    rank = _env_int("RANK", 0)
    if rank > 0 and report.failed:   # its reporter is silent, and collection differs: say so
        last = (report.longreprtext.strip().splitlines() or [""])[-1]
        print(f"tp_bench: rank {rank}: collection failed: {report.nodeid or '.'}: {last}",
              file=sys.stderr, flush=True)


def pytest_internalerror(excrepr) -> None:
    rank = _env_int("RANK", 0)
    if rank > 0:   # its reporter is silent, and the other ranks will not hear of it otherwise
        print(f"tp_bench: rank {rank}: pytest internal error:\n{excrepr}", file=sys.stderr,
              flush=True)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtestloop(session: pytest.Session):
    """Create the process group before the first test when several ranks run suite tests, so
    that every phase of every test can be agreed on; after the last, keep the benchmark entries
    of the tests that passed on every rank only."""
    state = _state(session.config)
    if state.active and state.world_size > 1 and not session.config.option.collectonly:
        state.context(session.config)
    try:
        return (yield)
    finally:
        _keep_passed_benchmarks(session.config)


# ---------------------------------------------------------------------- rank agreement
def _begin(item: pytest.Item, when: str) -> None:
    agreement = _state(item.config).agreement
    if agreement is not None:
        agreement.begin(_state(item.config).index, item.nodeid, when)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Optional[pytest.Item]):
    try:
        return (yield)
    finally:
        _state(item.config).index += 1


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _begin(item, "setup")
    marker_needs = {"gpu": 1, "multi_gpu": 2}
    for name, gpus in marker_needs.items():
        if item.get_closest_marker(name) is not None:
            import torch

            if not torch.cuda.is_available() or _state(item.config).world_size < gpus:
                pytest.skip(f"needs {'a GPU' if gpus == 1 else 'several GPUs'} ({name})")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    _begin(item, "call")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: Optional[pytest.Item]) -> None:
    _begin(item, "teardown")


def _outcome(rank: int, report: pytest.TestReport):
    from tp_bench.rank_agreement import Outcome

    longrepr = report.longrepr
    if report.skipped:
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr or "")
        return Outcome(rank, report.nodeid, "skipped", reason, reason)
    if report.failed:
        lines = report.longreprtext.strip().splitlines()
        crash = getattr(getattr(longrepr, "reprcrash", None), "message", None)
        summary = (crash or (lines[-1] if lines else "")).split("\n")[0]
        return Outcome(rank, report.nodeid, "failed", Outcome.trim(report.longreprtext), summary)
    return Outcome(rank, report.nodeid, "passed")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report: pytest.TestReport = yield
    state = _state(item.config)
    if state.agreement is not None:
        from tp_bench.rank_agreement import verdict

        outcomes = state.agreement.agree(_outcome(state.rank, report), state.index, call.when)
        message = verdict(outcomes)
        if message is not None:
            if report.failed:
                report.sections.append(("tp_bench: every rank", message))
            else:
                report.outcome = "failed"
                report.longrepr = f"{call.when} failed on another rank:\n{message}"
    if report.failed:
        state.failed.add(item.nodeid)
    elif call.when == "teardown":
        state.finished.add(item.nodeid)
    return report


# ---------------------------------------------------------------------- pytest-benchmark
def _keep_passed_benchmarks(config: pytest.Config) -> None:
    """Drop the pytest-benchmark entries of tests that failed on some rank or did not finish
    (when the session stops half-way), so tables, JSON and storage hold passed tests only."""
    session = getattr(config, "_benchmarksession", None)
    if session is not None:
        state = _state(config)
        passed = state.finished - state.failed
        session.benchmarks[:] = [b for b in session.benchmarks if b.fullname in passed]


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Versions, device and world size. Also called before any process group exists (when
    --benchmark-compare loads a saved run to compare machines), so it needs none."""
    import torch

    from tp_bench import results

    state = _state(config)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", _env_int("LOCAL_RANK", 0)) if cuda else torch.device("cpu")
    env = results.environment(device, state.world_size, "nccl" if cuda else "gloo")
    env.pop("date_utc")   # compared between runs; a date always differs
    machine_info["tp_bench"] = env


def _save_on_abort(config: pytest.Config) -> None:
    """Rank 0, when the session stops: write the JSON/storage of the tests that passed.

    Runs on FailureGuard's thread while the main thread may be inside a test, i.e. while pytest
    captures output, which the process leaves without ever showing: stop capturing first.
    """
    capture = config.pluginmanager.get_plugin("capturemanager")
    if capture is not None:
        capture.suspend_global_capture(in_=True)
    session = getattr(config, "_benchmarksession", None)
    if session is not None:
        _keep_passed_benchmarks(config)
        session.handle_saving()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    _state(session.config).close()


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def tp_bench_dist(request: pytest.FixtureRequest):
    """This rank's DistContext: the torchrun process group (a world of one without torchrun),
    destroyed at the end of the session."""
    return _state(request.config).context(request.config)


@pytest.fixture(scope="session")
def tp_bench_options(request: pytest.FixtureRequest, tp_bench_dist):
    """The suite's model and measurement options (suite.SuiteOptions), defaults by device."""
    from tp_bench.config import ConfigError
    from tp_bench.suite import SuiteOptions, parse_config_args

    get = request.config.getoption
    try:
        return SuiteOptions.resolve(
            tp_bench_dist.device.type, parse_config_args(get("tp_bench_args")),
            model=get("tp_bench_model"), layers=get("tp_bench_layers"), seq=get("tp_bench_seq"),
            batch=get("tp_bench_batch"), dtype=get("tp_bench_dtype"),
            rounds=get("tp_bench_rounds"), warmup=get("tp_bench_warmup"))
    except ConfigError as exc:
        pytest.fail(f"tp_bench options: {exc}", pytrace=False)


_IMPORT_ERRORS: dict[str, Optional[str]] = {}


@pytest.fixture(scope="module")
def tp_bench_impl(request: pytest.FixtureRequest, tp_bench_dist) -> str:
    """The strategy (``--impl``) under test, parametrized over the registered ones. A strategy
    whose module fails to import fails its tests with the import error."""
    from tp_bench.parallel.factory import get_strategy_class

    name = request.param
    if name not in _IMPORT_ERRORS:
        try:
            get_strategy_class(name)
            _IMPORT_ERRORS[name] = None
        except Exception as exc:   # noqa: BLE001 - any import failure is reported as such
            _IMPORT_ERRORS[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if _IMPORT_ERRORS[name]:
        pytest.fail(f"strategy {name!r} is registered but cannot be imported: "
                    f"{_IMPORT_ERRORS[name]}", pytrace=False)
    return name


@pytest.fixture(scope="module")
def tp_bench_mesh(request: pytest.FixtureRequest):
    """The (dp, tp) shape under test (mesh_shape.MeshShape), parametrized over the shapes that fit
    the world size (or --tp-bench-mesh)."""
    return request.param


@pytest.fixture(scope="module")
def tp_bench_prepared(tp_bench_impl, tp_bench_mesh, tp_bench_options, tp_bench_dist):
    """A validated, not yet built runner.Session; skipped when the model does not fit the mesh
    (e.g. heads not divisible by tp), which every rank decides alike."""
    from tp_bench.config import ConfigError
    from tp_bench.models import get_model_builder
    from tp_bench.runner import prepare

    try:
        cfg = tp_bench_options.config(tp_bench_impl, tp_bench_mesh).validate(
            tp_bench_dist.world_size)
        model = get_model_builder(cfg.model_name).model_config(cfg.num_layers)
    except ConfigError as exc:
        pytest.fail(f"tp_bench options: {exc}", pytrace=False)
    try:
        cfg.validate_model(model.num_attention_heads, model.num_key_value_heads)
    except ConfigError as exc:
        pytest.skip(f"{tp_bench_mesh.id}: {exc}")
    return prepare(cfg, tp_bench_dist)


@pytest.fixture(scope="module")
def tp_bench_session(tp_bench_prepared):
    """The built session for this impl, mesh and model, shared by the module's tests and freed
    when the parametrization moves on (pytest groups the tests of one module-scoped parameter)."""
    from tp_bench.suite import open_session

    with open_session(tp_bench_prepared) as session:
        yield session


@pytest.fixture(scope="module")
def tp_bench_steps(tp_bench_session):
    """suite.StepDriver over tp_bench_session: whole training steps, phase by phase."""
    from tp_bench.suite import StepDriver

    return StepDriver(tp_bench_session)


@pytest.fixture(scope="module")
def tp_bench_group(tp_bench_options, tp_bench_mesh) -> str:
    """pytest-benchmark group: model + mesh, so the impls sit side by side in one table."""
    return f"{tp_bench_options.label} {tp_bench_mesh.id}"
