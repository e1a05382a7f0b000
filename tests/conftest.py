"""Suite-wide options: the long end-to-end runs (marker ``slow``) wait for ``--run-slow``.

The default suite (``pytest``) keeps within about ten minutes on two CPU cores; the few runs that
each take half a minute or more there are marked ``slow`` and reported as skipped. ``.ci/run`` runs
them after the default suite with ``pytest --run-slow -m slow``; ``pytest --run-slow`` runs all.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow", action="store_true", default=False,
        help="also run the tests marked slow (long end-to-end runs; CI runs them)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow end-to-end run: pytest --run-slow runs it (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
