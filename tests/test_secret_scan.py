"""Issue 11: the suite-wide scan for planted secrets (``tests/support/planted.py``) catches a leak
in each kind of output it watches — proved by a pytest session of its own that leaks on purpose."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support import planted
from tests.support.apps import REPO

LEAKY_TESTS = """
import logging
import os

from tests.support import planted
from tests.support.apps import REPO, start_app
from tests.support.net import Samples


def test_clean():
    print("nothing secret here")


def test_printed():
    print("dsn: postgresql://postgres:" + planted.DB_PASSWORD + "@127.0.0.1/app")


def test_logged():
    logging.getLogger("app").warning("calling %s", planted.with_credentials("http://h/?a=1"))


def test_exposition():
    Samples('up{url="/x?token=' + planted.URL_TOKEN + '"} 1\\n')


def test_log_of_a_real_app(tmp_path):
    (tmp_path / "leaky.py").write_text(
        "import os\\n"
        "print('metrics token is', os.environ['POOLWATCH_METRICS_TOKEN'], flush=True)\\n"
        "async def app(scope, receive, send):\\n"
        "    pass\\n"
    )
    path = os.pathsep.join([str(tmp_path), REPO, os.path.join(REPO, "agent")])
    env = {"PYTHONPATH": path, "POOLWATCH_METRICS_TOKEN": planted.METRICS_TOKEN}
    server = start_app("leaky:app", env, metrics=False, server_args=["--lifespan", "off"])
    server.stop()


def test_an_output_handed_to_the_scan():
    planted.scan("error: bad password " + planted.WRONG_DB_PASSWORD, "a CLI's stderr")
"""


def test_find_names_the_secret_and_masks_it():
    text = f"ok\nGET http://u:{planted.URL_PASSWORD}@h/ failed\nok"
    assert planted.find(text) == ["URL_PASSWORD: GET http://u:<URL_PASSWORD>@h/ failed"]
    assert planted.find("a clean line\n" * 100) == []


def test_a_leak_in_any_watched_output_fails_its_test(tmp_path):
    tests = tmp_path / "test_leaky.py"
    tests.write_text(LEAKY_TESTS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "agent")])}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "tests.support.secret_scan",
        "-p",
        "no:cacheprovider",
    ]
    done = subprocess.run(
        [*cmd, "-q", "-rE", str(tests)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "6 passed, 5 errors" in output, output  # each leaky test errs at teardown
    for test, leak in (
        ("test_printed", "DB_PASSWORD: dsn: postgresql://postgres:<DB_PASSWORD>@127.0.0.1/app"),
        ("test_logged", "URL_PASSWORD"),
        ("test_logged", "URL_TOKEN"),
        ("test_exposition", 'URL_TOKEN: up{url="/x?token=<URL_TOKEN>"} 1  (in a /metrics'),
        ("test_log_of_a_real_app", "METRICS_TOKEN: metrics token is <METRICS_TOKEN>  (in the log"),
        ("test_an_output_handed_to_the_scan", "WRONG_DB_PASSWORD"),
    ):
        report = output.split(f"ERROR at teardown of {test}", 1)[1].split("ERROR at teardown")[0]
        assert leak in report, (test, output)
    assert "ERROR at teardown of test_clean" not in output
