"""The fake Slack refuses what Slack refuses, so a green Slack test means the real service would take it too."""

import aiohttp
import pytest

from tests.fakes.slack import FakeSlack

pytestmark = pytest.mark.integration


@pytest.fixture
async def fake():
    fake = await FakeSlack().start()
    try:
        yield fake
    finally:
        await fake.stop()


def response_url_of(body: str) -> str:
    from urllib.parse import parse_qs

    return parse_qs(body)["response_url"][0]


async def post(url: str, text: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.post(url, json={"text": text}) as resp:
        return resp.status, await resp.text()


async def test_a_response_url_takes_five_posts(fake):
    url = response_url_of(fake.command_body("a cat"))
    assert [await post(url, f"answer {n}") for n in range(5)] == [(200, "ok")] * 5
    assert await post(url, "a sixth") == (404, "used_url")
    assert [e.text for e in fake.ephemerals] == [f"answer {n}" for n in range(5)]


async def test_a_response_url_expires_after_30_minutes(fake):
    url = response_url_of(fake.command_body("a cat"))
    fake.advance(29 * 60)
    assert await post(url, "in time") == (200, "ok")
    fake.advance(2 * 60)
    assert await post(url, "too late") == (404, "expired_url")
    assert await post(url.rsplit("/", 1)[0] + "/made-up", "never issued") == (404, "no_such_url")
