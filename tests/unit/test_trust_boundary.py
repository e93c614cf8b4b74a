"""Issue 13's trust boundary, in memory: signed L2 envelopes, the safety policy's fingerprint in the cache key,
and rediss:// URLs. The same attacks against real redis-servers: tests/integration/test_cache_security.py (not
this file's name: tests/unit and tests/integration are not packages, so two test modules may not share one)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from pydantic import SecretStr
from redis.asyncio.connection import SSLConnection

from consumer.cache import L2, CacheEntry, mac_key
from schemas.messages import BlobRef
from skillgen.runtime.redis import RedisLink, connect
from skillgen.safety import SafetySettings, postprocess
from skillgen.safety.fingerprint import policy_description, policy_fingerprint

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
KEY = "ab" * 32  # a cache key
ENTRY = CacheEntry(
    blobs=[BlobRef(url=f"file:///b/{'a' * 64}.png", sha256="a" * 64, bytes=10, seed=1)],
    model="m",
    created_at=datetime(2025, 1, 1, tzinfo=timezone.utc),
)
EVIL = CacheEntry(blobs=[BlobRef(url="https://evil.example/x.png", sha256="e" * 64, bytes=10)], model="m")
SIGNING_KEY = SecretStr("s" * 40)


def l2(key: bytes | None = mac_key(SIGNING_KEY)) -> L2:
    """An L2 whose link is never called: these tests only seal and open envelopes."""
    return L2(RedisLink("redis://127.0.0.1:1/0"), "p:", 60, key)


# -- rediss:// -------------------------------------------------------------------------------------------------


async def test_a_rediss_url_gives_tls_connections_with_its_password_without_connecting():
    client = connect("rediss://:pw@cache.example:6380/0")
    try:
        pool = client.connection_pool
        assert pool.connection_class is SSLConnection
        assert pool.connection_kwargs["password"] == "pw"
        assert (pool.connection_kwargs["host"], pool.connection_kwargs["port"]) == ("cache.example", 6380)
        assert not pool._available_connections and not pool._in_use_connections  # nothing was dialled
    finally:
        await client.aclose()
    link = RedisLink("rediss://:pw@cache.example:6380/0")
    assert link.url == "rediss://:***@cache.example:6380/0"  # the password never reaches a log line
    await link.close()


# -- signed envelopes ------------------------------------------------------------------------------------------


def test_a_sealed_entry_opens_under_its_key_and_is_an_envelope():
    cache = l2()
    sealed = cache.seal(KEY, ENTRY)
    assert set(json.loads(sealed)) == {"entry", "mac"}
    assert cache.open(KEY, sealed) == ENTRY
    assert cache.open(KEY, sealed.encode()) == ENTRY  # what redis-py answers
    assert l2().open(KEY, sealed) == ENTRY  # another process with the same SKILL_SIGNING_KEY


@pytest.mark.security
@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda: EVIL.model_dump_json(), id="unsigned entry (planted, or from before signing)"),
        pytest.param(lambda: l2(b"x" * 32).seal(KEY, EVIL), id="signed with another key"),
        pytest.param(lambda: l2().seal("cd" * 32, EVIL), id="a genuine envelope moved to another key"),
        pytest.param(lambda: json.dumps({**json.loads(l2().seal(KEY, ENTRY)), "entry": EVIL.model_dump_json()}),
                     id="a genuine MAC on another entry"),
        pytest.param(lambda: json.dumps({"entry": EVIL.model_dump_json(), "mac": "0" * 64}), id="a made-up MAC"),
        pytest.param(lambda: json.dumps({"entry": EVIL.model_dump_json(), "mac": "é" * 64}), id="a non-hex MAC"),
        pytest.param(lambda: json.dumps({"entry": json.loads(EVIL.model_dump_json()), "mac": "0" * 64}),
                     id="entry as an object"),
        pytest.param(lambda: b"cposix\nsystem\n(S'touch /tmp/x'\ntR.", id="a pickle"),
        pytest.param(lambda: b"\xff\xfe\x00garbage", id="not UTF-8"),
        pytest.param(lambda: "[1, 2]", id="JSON that is not an envelope"),
    ],
)
def test_anything_but_our_own_envelope_under_a_key_is_a_miss(forge, caplog):
    with caplog.at_level(logging.WARNING, "skillgen.consumer.cache"):
        assert l2().open(KEY, forge()) is None
    assert KEY in caplog.text and "evil" not in caplog.text  # the key is logged, never the value


@pytest.mark.security
def test_a_bad_value_is_warned_about_once_per_key(caplog):
    cache = l2()
    with caplog.at_level(logging.WARNING, "skillgen.consumer.cache"):
        for _ in range(3):
            assert cache.open(KEY, EVIL.model_dump_json()) is None
        assert cache.open("cd" * 32, EVIL.model_dump_json()) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [KEY in r.getMessage() for r in warnings] == [True, False]


@pytest.mark.security
def test_without_a_signing_key_entries_are_private_to_their_process(caplog):
    assert mac_key(None) is None
    with caplog.at_level(logging.WARNING, "skillgen.consumer.cache"):
        mine, peer = l2(None), l2(None)  # random keys: `key=None`
    assert "SKILL_SIGNING_KEY is unset" in caplog.text and "private" in caplog.text
    sealed = mine.seal(KEY, ENTRY)
    assert mine.open(KEY, sealed) == ENTRY
    assert peer.open(KEY, sealed) is None  # a miss, never a wrong answer
    # and the MAC key is not the signing key itself (that one also seals origins)
    assert mac_key(SIGNING_KEY) != SIGNING_KEY.get_secret_value().encode()


# -- the safety policy's fingerprint -------------------------------------------------------------------------


def safety(tmp_path: Path, terms: str = "forbidden thing\n", **kw) -> SafetySettings:
    path = tmp_path / "extra.en.txt"
    path.write_text(terms, encoding="utf-8")
    return SafetySettings(_env_file=None, **{"extra_terms": [path], "nsfw_threshold": 0.6, "checker_dir": None, **kw})


def test_the_fingerprint_is_short_hex_and_describes_each_part(tmp_path):
    fp = policy_fingerprint(safety(tmp_path))
    assert len(fp) == 16 and int(fp, 16) >= 0
    described = policy_description(safety(tmp_path))
    assert set(described) == {"prompt", "image", "postprocess"}
    assert described["image"]["nudenet"]["threshold"] == 0.6 and described["image"]["sd_checker"] is None


@pytest.mark.security
def test_a_stricter_prompt_term_list_changes_the_fingerprint(tmp_path):
    base = policy_fingerprint(safety(tmp_path))
    assert policy_fingerprint(safety(tmp_path, "forbidden thing\nanother thing\n")) != base
    assert policy_fingerprint(safety(tmp_path, "forbidden things\n")) != base
    # a comment or blank line decides nothing
    assert policy_fingerprint(safety(tmp_path, "# why\n\nforbidden thing\n")) == base


@pytest.mark.security
def test_an_image_threshold_or_checker_changes_the_fingerprint(tmp_path):
    base = policy_fingerprint(safety(tmp_path))
    assert policy_fingerprint(safety(tmp_path, nsfw_threshold=0.5)) != base
    checker = tmp_path / "checker"
    (checker / "safety_checker").mkdir(parents=True)
    (checker / "feature_extractor").mkdir()
    (checker / "safety_checker" / "config.json").write_text('{"a": 1}')
    with_checker = policy_fingerprint(safety(tmp_path, checker_dir=checker))
    assert with_checker != base
    (checker / "safety_checker" / "config.json").write_text('{"a": 2}')
    assert policy_fingerprint(safety(tmp_path, checker_dir=checker)) != with_checker
    # the same weights elsewhere (another host's path) are the same policy
    elsewhere = tmp_path / "elsewhere"
    for sub in ("safety_checker", "feature_extractor"):
        (elsewhere / sub).mkdir(parents=True)
    (elsewhere / "safety_checker" / "config.json").write_text('{"a": 2}')
    assert policy_fingerprint(safety(tmp_path, checker_dir=elsewhere)) == policy_fingerprint(
        safety(tmp_path, checker_dir=checker)
    )


@pytest.mark.security
def test_a_new_postprocessing_rule_changes_the_fingerprint(tmp_path, monkeypatch):
    base = policy_fingerprint(safety(tmp_path))
    monkeypatch.setattr(postprocess, "POSTPROCESS_VERSION", postprocess.POSTPROCESS_VERSION + 1)
    assert policy_fingerprint(safety(tmp_path)) != base


@pytest.mark.security
def test_the_same_settings_give_the_same_fingerprint_in_a_fresh_interpreter(tmp_path):
    settings = safety(tmp_path, "forbidden thing\n禁止的东西\n", nsfw_threshold=0.7)
    here = policy_fingerprint(settings)
    code = (
        "import sys\n"
        "from skillgen.safety import SafetySettings\n"
        "from skillgen.safety.fingerprint import policy_fingerprint\n"
        "settings = SafetySettings(_env_file=None, extra_terms=[sys.argv[1]], nsfw_threshold=0.7, checker_dir=None)\n"
        "print(policy_fingerprint(settings))\n"
    )
    seen = set()
    for seed in ("1", "2"):  # another hash seed: no set or dict order may leak in
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKILL_SAFETY_")} | {"PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code, str(settings.extra_terms[0])], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120, check=True)
        seen.add(out.stdout.strip())
    assert seen == {here}
