"""In-repo glue: the fixtures and hooks live in tp_bench.frontends.pytest_plugin, which an installed
tp_bench loads through its pytest11 entry point (named "tp_bench"). From a checkout that is not
installed (or with plugin autoloading off) it is registered here, once, under the same name."""

from tp_bench.frontends import pytest_plugin


def pytest_addoption(parser, pluginmanager):
    # pytest_addoption is replayed for plugins registered during it, so the plugin's own
    # options are added before the command line is parsed.
    if not (pluginmanager.is_registered(pytest_plugin) or pluginmanager.is_blocked("tp_bench")):
        pluginmanager.register(pytest_plugin, "tp_bench")
