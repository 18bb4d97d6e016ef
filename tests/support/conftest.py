"""Make the ``label_studio`` fixture available to tests/support even when the root conftest does
not (yet) load it with ``pytest_plugins = ["tests.support.labelstudio"]``; never registers it twice,
so the whole session shares one Label Studio either way."""

from __future__ import annotations

import pytest

_PLUGIN = "tests.support.labelstudio"


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin(_PLUGIN):
        config.pluginmanager.import_plugin(_PLUGIN)
