"""The command line: every service is listed, and bad input gets one clear line, never a traceback."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def skillgen(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "skillgen.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_help_lists_the_services():
    out = skillgen("--help")
    assert out.returncode == 0
    for cmd in ("demo", "consumer", "bot", "model", "topics", "replay"):
        assert cmd in out.stdout
    bots = skillgen("bot", "--help")
    assert "console" in bots.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
        (["demo", "--timeout", "soon"], "invalid float value: 'soon'"),
        (["nonsense"], "invalid choice: 'nonsense'"),
        (["replay", "--since", "yesterday"], "not an ISO time"),
    ],
)
def test_bad_flags_get_one_line(args, expected):
    out = skillgen(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert expected in lines[0]
    assert "Traceback" not in out.stderr


def test_bad_settings_get_one_line():
    out = skillgen("topics", "ensure", env={"SKILL_METRICS_PORT": "not-a-port"})
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("skillgen topics ensure: invalid settings: metrics_port")
    assert "Traceback" not in out.stderr


def test_replay_mode_mistakes_are_explained():
    out = skillgen("replay", "--reprocess")
    assert out.returncode == 1
    assert "--reprocess needs somewhere to put results" in out.stderr
    assert "Traceback" not in out.stderr


def test_bots_import_without_torch():
    code = "import sys, bots.grammar, bots.console, bots.events, schemas, skillgen.runtime.kafka; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
