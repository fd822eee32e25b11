"""pytest plugin: a test whose outputs hold a planted secret fails (see ``planted.py``)."""

from __future__ import annotations

import pytest

from tests.support import planted


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if call.when != "teardown":
        return report
    # the teardown report carries the sections captured in every phase of the test
    for title, content in report.sections:
        planted.scan(content, title)
    leaks = planted.drain()
    if leaks:
        message = "planted secrets leaked into outputs:\n  " + "\n  ".join(leaks)
        report.outcome = "failed"
        report.longrepr = f"{report.longrepr}\n{message}" if report.longrepr else message
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Outputs registered outside any test (session fixtures) are scanned last."""
    leaks = planted.drain()
    if leaks:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("planted secrets leaked into outputs:\n  " + "\n  ".join(leaks))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
