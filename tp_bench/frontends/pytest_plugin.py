"""pytest plugin for the benchmark suite (tests_bench/): options, markers, fixtures; the hooks
are thin calls into one SuiteRun (frontends.suite_run) kept in ``config.stash``.

Loaded through the ``pytest11`` entry point (from any directory once tp_bench is installed) or
by the repository's root conftest.py. Under torchrun every rank runs pytest; only rank 0 prints
and writes pytest-benchmark output (ranks > 0 get a silent terminal reporter and no
--benchmark-json / --benchmark-save / --benchmark-autosave).
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import pytest

from tp_bench.core.config import BenchConfig
from tp_bench.frontends.suite_options import SUITE_OPTIONS
from tp_bench.frontends.suite_run import SuiteRun, env_int, mesh_dims
from tp_bench.strategies import registry

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
_RUN = pytest.StashKey[SuiteRun]()


def _run(config: pytest.Config) -> SuiteRun:
    return config.stash[_RUN]


# ---------------------------------------------------------------------- options and markers
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tp_bench", "tp_bench benchmark suite (tests_bench)")
    group.addoption("--tp-bench-mesh", action="append", metavar="DPxTP",
                    help="Mesh shapes to run, e.g. 2x4 (repeat or separate with commas); "
                         "default: every dp x tp = world size")
    fields = {f.name: f for f in BenchConfig.option_fields()}
    for option in SUITE_OPTIONS:
        help_text = option.help or fields[option.field].metadata["help"]
        group.addoption(f"--tp-bench-{option.name}", type=option.kind, metavar=option.name.upper(),
                        help=f"{help_text} [default: {option.cpu} without a GPU, "
                             f"{option.cuda} with one]")
    group.addoption("--tp-bench-args", default="", metavar="'OPTIONS'",
                    help="Further benchmark.py options for every entry, e.g. "
                         "'--zero_stage 2 --activation_checkpointing'")
    group.addoption("--tp-bench-failure-grace", type=float, default=60.0, metavar="SECONDS",
                    help="When a test fails on one rank, how long the other ranks may take to "
                         "finish that test phase before they are taken as stuck in a collective "
                         "and the session stops [default: 60]")


def _mark(config: pytest.Config, name: str, description: str) -> pytest.MarkDecorator:
    """pytest.mark.<name>, registered first (pytest.ini lists the common ones) so that
    --strict-markers accepts any mesh size."""
    if not any(line.split(":")[0].strip() == name for line in config.getini("markers")):
        config.addinivalue_line("markers", f"{name}: {description}")
    return getattr(pytest.mark, name)


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Ranks > 0 write no pytest-benchmark files; runs before pytest-benchmark reads its options."""
    if env_int("RANK", 0) > 0 and hasattr(config.option, "benchmark_json"):
        opt = config.option
        opt.benchmark_json = opt.benchmark_save = opt.benchmark_autosave = None
        opt.benchmark_histogram = []
        opt.benchmark_cprofile_dump = []
        opt.benchmark_quiet = True


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    rank, world_size = env_int("RANK", 0), env_int("WORLD_SIZE", 1)
    config.stash[_RUN] = SuiteRun(rank=rank, world_size=world_size,
                                  meshes=mesh_dims(config.getoption("tp_bench_mesh"), world_size),
                                  failure_grace_s=config.getoption("tp_bench_failure_grace"))
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
                 for name in registry.available()]
        metafunc.parametrize(IMPL_FIXTURE, impls, indirect=True, scope="module")
    if MESH_FIXTURE in names:
        import torch

        cuda = torch.cuda.is_available()
        params = []
        for dims in _run(config).meshes:
            marks = [_mark(config, f"dp{dims.dp}", f"data-parallel size {dims.dp}"),
                     _mark(config, f"tp{dims.tp}", f"tensor-parallel size {dims.tp}")]
            if cuda:
                marks.append(pytest.mark.gpu)
                if dims.world_size > 1:
                    marks.append(pytest.mark.multi_gpu)
            params.append(pytest.param(dims, id=dims.label, marks=marks))
        metafunc.parametrize(MESH_FIXTURE, params, indirect=True, scope="module")


def _uses_suite(item: pytest.Item) -> bool:
    return bool(_SUITE_FIXTURES & set(getattr(item, "fixturenames", ())))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """After -m/-k selection: does this session run suite tests? The same answer on every rank."""
    run = _run(config)
    run.active = any(_uses_suite(item) for item in items)
    if run.active:
        from tp_bench.frontends.suite import device_clock

        for item in items:
            if _uses_suite(item) and "benchmark" in item.fixturenames:
                item.add_marker(pytest.mark.benchmark(timer=device_clock))


def pytest_collectreport(report: pytest.CollectReport) -> None:
    rank = env_int("RANK", 0)
    if rank > 0 and report.failed:   # its reporter is silent, and collection differs: say so
        last = (report.longreprtext.strip().splitlines() or [""])[-1]
        print(f"tp_bench: rank {rank}: collection failed: {report.nodeid or '.'}: {last}",
              file=sys.stderr, flush=True)


def pytest_internalerror(excrepr) -> None:
    rank = env_int("RANK", 0)
    if rank > 0:   # its reporter is silent, and the other ranks will not hear of it otherwise
        print(f"tp_bench: rank {rank}: pytest internal error:\n{excrepr}", file=sys.stderr,
              flush=True)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtestloop(session: pytest.Session):
    """Create the process group before the first test when several ranks run suite tests, so
    that every phase of every test can be agreed on."""
    run = _run(session.config)
    if run.active and run.world_size > 1 and not session.config.option.collectonly:
        run.context(session.config)
    return (yield)


# ---------------------------------------------------------------------- rank agreement
@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Optional[pytest.Item]):
    try:
        return (yield)
    finally:
        _run(item.config).index += 1


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _run(item.config).begin(item, "setup")
    for name, gpus in {"gpu": 1, "multi_gpu": 2}.items():
        if item.get_closest_marker(name) is not None:
            import torch

            if not torch.cuda.is_available() or _run(item.config).world_size < gpus:
                pytest.skip(f"needs {'a GPU' if gpus == 1 else 'several GPUs'} ({name})")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    _run(item.config).begin(item, "call")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: Optional[pytest.Item]) -> None:
    _run(item.config).begin(item, "teardown")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report: pytest.TestReport = yield
    _run(item.config).agree(item, report, call.when)
    return report


# ---------------------------------------------------------------------- pytest-benchmark
@pytest.hookimpl(wrapper=True)
def pytest_benchmark_group_stats(config: pytest.Config, benchmarks: list, group_by: str):
    """The terminal tables show the tests that passed on every rank only."""
    groups = yield
    if not _run(config).active:
        return groups
    kept = [(name, _run(config).passed(list(entries))) for name, entries in groups]
    return [(name, entries) for name, entries in kept if entries]


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: list,
                                 output_json: dict) -> None:
    """The JSON and storage hold the tests that passed on every rank (and finished) only."""
    if _run(config).active:
        output_json["benchmarks"] = _run(config).passed(output_json["benchmarks"])


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Versions, device and world size. Also called before any process group exists (when
    --benchmark-compare loads a saved run to compare machines), so it needs none."""
    import torch

    from tp_bench.core import results

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", env_int("LOCAL_RANK", 0)) if cuda else torch.device("cpu")
    env = results.environment(device, _run(config).world_size, "nccl" if cuda else "gloo")
    env.pop("date_utc")   # compared between runs; a date always differs
    machine_info["tp_bench"] = env


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    _run(session.config).close()


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def tp_bench_dist(request: pytest.FixtureRequest):
    """This rank's DistContext: the torchrun process group (a world of one without torchrun),
    destroyed at the end of the session."""
    return _run(request.config).context(request.config)


@pytest.fixture(scope="session")
def tp_bench_options(request: pytest.FixtureRequest, tp_bench_dist):
    """The suite's model and measurement options (SuiteOptions), defaults by device."""
    from tp_bench.core.errors import ConfigError
    from tp_bench.frontends.suite_options import SuiteOptions, parse_config_args

    get = request.config.getoption
    try:
        return SuiteOptions.resolve(
            tp_bench_dist.device.type, parse_config_args(get("tp_bench_args")),
            **{o.name: get(f"tp_bench_{o.name}") for o in SUITE_OPTIONS})
    except ConfigError as exc:
        pytest.fail(f"tp_bench options: {exc}", pytrace=False)


_IMPORT_ERRORS: dict[str, Optional[str]] = {}


@pytest.fixture(scope="module")
def tp_bench_impl(request: pytest.FixtureRequest, tp_bench_dist) -> str:
    """The strategy (``--impl``) under test, parametrized over the registered ones. A strategy
    whose module fails to import fails its tests with the import error."""
    name = request.param
    if name not in _IMPORT_ERRORS:
        try:
            registry.get(name)
            _IMPORT_ERRORS[name] = None
        except Exception as exc:   # noqa: BLE001 - any import failure is reported as such
            _IMPORT_ERRORS[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if _IMPORT_ERRORS[name]:
        pytest.fail(f"strategy {name!r} is registered but cannot be imported: "
                    f"{_IMPORT_ERRORS[name]}", pytrace=False)
    return name


@pytest.fixture(scope="module")
def tp_bench_mesh(request: pytest.FixtureRequest):
    """The (dp, tp) shape under test (core.dims.ParallelDims), parametrized over the shapes
    that fit the world size (or --tp-bench-mesh)."""
    return request.param


@pytest.fixture(scope="module")
def tp_bench_prepared(tp_bench_impl, tp_bench_mesh, tp_bench_options, tp_bench_dist):
    """A validated, not yet built engine Session. Skipped when the model does not fit the mesh
    (e.g. heads not divisible by tp) or an option does not apply to the impl, which every rank
    decides alike."""
    from tp_bench.core.errors import ConfigError
    from tp_bench.engine.session import prepare

    cfg = tp_bench_options.config(tp_bench_impl, tp_bench_mesh)
    try:
        cfg.validate(tp_bench_dist.world_size)
    except ConfigError as exc:
        pytest.fail(f"tp_bench options: {exc}", pytrace=False)
    try:
        return prepare(cfg, tp_bench_dist)
    except ConfigError as exc:   # the impl or the mesh does not take this configuration
        pytest.skip(f"{tp_bench_impl} {tp_bench_mesh.label}: {exc}")


@pytest.fixture(scope="module")
def tp_bench_session(tp_bench_prepared):
    """The built session for this impl, mesh and model, shared by the module's tests and freed
    when the parametrization moves on (pytest groups the tests of one module-scoped parameter)."""
    tp_bench_prepared.setup()
    try:
        yield tp_bench_prepared
    finally:
        tp_bench_prepared.close()


@pytest.fixture(scope="module")
def tp_bench_steps(tp_bench_session):
    """The engine's StepDriver over tp_bench_session: whole training steps, phase by phase."""
    return tp_bench_session.driver("none", per_step_memory=False)


@pytest.fixture(scope="module")
def tp_bench_group(tp_bench_options, tp_bench_mesh) -> str:
    """pytest-benchmark group: model + mesh, so the impls sit side by side in one table."""
    return f"{tp_bench_options.label} {tp_bench_mesh.label}"
