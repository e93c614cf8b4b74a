"""Rate limits and quotas: sliding windows per person (across every team) and per team, SKILL_ADMINS exempt from
the per-person ones only, a clear time to retry; the same rules in Redis (shared by replicas) and in memory (no
Redis, or Redis down)."""

import time

import pytest

from bots.errors import RateLimited, Refusal
from bots.ratelimit import Limit, RateLimiter, limits_from
from bots.settings import BotSettings
from schemas.messages import Origin, Platform
from skillgen.runtime.redis import RedisLink, Store


def origin(user: str = "U1", team: str = "T1") -> Origin:
    return Origin(platform=Platform.slack, team_id=team, channel_id="C1", user_id=user)


@pytest.fixture(params=[pytest.param("memory", marks=pytest.mark.unit),
                        pytest.param("redis", marks=pytest.mark.integration)])
async def store(request):
    if request.param == "memory":
        yield Store(None)
        return
    server = request.getfixturevalue("redis_server")
    prefix = request.getfixturevalue("namespace").redis_prefix
    store = Store(RedisLink(server.url, decode_responses=True), prefix)
    yield store
    keys = [k async for k in store.link.client.scan_iter(match=prefix + "*")]
    if keys:
        await store.link.client.delete(*keys)
    await store.close()


async def test_the_request_over_the_limit_is_told_when_to_retry(store):
    limiter = RateLimiter([Limit("user", 2, 60, "requests")], store)
    await limiter.admit(origin(), 1)
    await limiter.admit(origin(), 1)
    before = time.time()
    with pytest.raises(RateLimited) as info:
        await limiter.admit(origin(), 1)
    assert "You have reached your limit of 2 requests per minute. Try again in 60 seconds (at " in str(info.value)
    assert before + 58 <= info.value.retry_at_s <= before + 61


async def test_a_window_frees_its_oldest_use_as_it_slides(store):
    limiter = RateLimiter([Limit("user", 1, 1, "requests")], store)
    await limiter.admit(origin(), 1)
    with pytest.raises(RateLimited) as info:
        await limiter.admit(origin(), 1)
    assert info.value.retry_at_s - time.time() <= 1.01
    time.sleep(1.05)
    await limiter.admit(origin(), 1)


async def test_team_limits_span_people_and_a_refusal_costs_nothing(store):
    limiter = RateLimiter([Limit("user", 2, 60, "requests"), Limit("team", 2, 60, "requests")], store)
    await limiter.admit(origin("U1"), 1)
    await limiter.admit(origin("U2"), 1)
    with pytest.raises(RateLimited, match="your team's limit of 2 requests per minute"):
        await limiter.admit(origin("U1"), 1)
    await limiter.admit(origin("U3", team="T2"), 1)  # another team is not affected
    # U1's refused attempt was not counted: once the team has room U1 has one request left, not zero.
    roomy = RateLimiter([Limit("user", 2, 60, "requests")], store)
    await roomy.admit(origin("U1"), 1)


async def test_quotas_count_images(store):
    limiter = RateLimiter([Limit("user", 5, 86400, "images")], store)
    await limiter.admit(origin(), 4)
    with pytest.raises(RateLimited, match="your limit of 5 images per day"):
        await limiter.admit(origin(), 2)
    await limiter.admit(origin(), 1)
    with pytest.raises(Refusal, match="--n 6 is more than your limit of 5 images per day; ask for at most 5"):
        await limiter.admit(origin(), 6)


async def test_admins_skip_the_per_person_limits_but_not_their_teams(store):
    limits = [Limit("user", 1, 60, "requests"), Limit("user", 2, 86400, "images"),
              Limit("team", 4, 60, "requests"), Limit("team", 5, 86400, "images")]
    limiter = RateLimiter(limits, store, admins={"slack:UADMIN"})
    for _ in range(3):  # over their own rate and quota
        await limiter.admit(origin("UADMIN"), 1)
    await limiter.admit(origin("U1"), 1)
    with pytest.raises(RateLimited, match="your team's limit of 4 requests per minute"):
        await limiter.admit(origin("UADMIN"), 1)
    with pytest.raises(Refusal, match="--n 6 is more than your team's limit of 5 images per day"):
        await limiter.admit(origin("UADMIN"), 6)


@pytest.mark.security
async def test_nobody_else_is_exempt(store):
    limiter = RateLimiter([Limit("user", 1, 60, "requests")], store, admins={"discord:UADMIN"})
    await limiter.admit(origin("U1"), 1)
    with pytest.raises(TypeError):  # what a Discord server administrator used to get: there is no such door now
        await limiter.admit(origin("U1"), 1, admin=True)
    with pytest.raises(RateLimited):
        await limiter.admit(origin("U1"), 1)
    await limiter.admit(origin("UADMIN"), 1)  # an entry names a platform: discord:UADMIN is not slack:UADMIN
    with pytest.raises(RateLimited):
        await limiter.admit(origin("UADMIN"), 1)


@pytest.mark.security
async def test_a_person_in_several_teams_has_one_allowance(store):
    limiter = RateLimiter([Limit("user", 2, 60, "requests"), Limit("user", 3, 86400, "images")], store)
    await limiter.admit(origin("U1", team="T1"), 1)
    await limiter.admit(origin("U1", team="T2"), 1)
    with pytest.raises(RateLimited, match="your limit of 2 requests per minute"):
        await limiter.admit(origin("U1", team="T3"), 1)
    assert RateLimiter._key(limiter.limits[0], origin("U1", team="T9")) == "rl:user:slack:U1:requests:60"
    assert RateLimiter._key(Limit("team", 2, 60, "requests"), origin("U1", team="T9")) == "rl:team:slack:T9:requests:60"


@pytest.mark.unit
def test_settings_turn_limits_off_with_zero():
    limits = limits_from(BotSettings(rate_user_per_min=3, rate_team_per_min=0, quota_user_per_day=0,
                                     quota_team_per_day=100))
    assert limits == [Limit("user", 3, 60, "requests"), Limit("team", 100, 86400, "images")]


async def test_replicas_share_the_window_through_redis(redis_server, namespace):
    stores = [Store(RedisLink(redis_server.url, decode_responses=True), namespace.redis_prefix) for _ in range(2)]
    a, b = (RateLimiter([Limit("user", 2, 60, "requests")], s) for s in stores)
    await a.admit(origin(), 1)
    await b.admit(origin(), 1)
    with pytest.raises(RateLimited):
        await a.admit(origin(), 1)
    for s in stores:
        await s.close()


async def test_a_redis_outage_falls_back_to_this_process(redis_factory, caplog):
    server = redis_factory()
    store = Store(RedisLink(server.url, timeout_s=0.5, decode_responses=True))
    limiter = RateLimiter([Limit("user", 1, 60, "requests")], store)
    server.stop()
    await limiter.admit(origin(), 1)
    with pytest.raises(RateLimited):
        await limiter.admit(origin(), 1)
    assert "Redis unavailable" in caplog.text
    await store.close()


class HangingStore:
    """A Store whose Redis never answers (and whose client has no socket timeout)."""

    def __init__(self):
        self.calls = 0

    def key(self, name: str) -> str:
        return name

    async def call(self, fn, default):
        import asyncio

        self.calls += 1
        await asyncio.Event().wait()


@pytest.mark.unit
async def test_a_redis_that_hangs_is_time_boxed_and_left_alone_by_a_breaker():
    store = HangingStore()
    limiter = RateLimiter([Limit("user", 2, 60, "requests")], store, time_box_s=0.2, breaker_s=30)
    t0 = time.monotonic()
    await limiter.admit(origin(), 1)  # Redis's answer is not waited for past the time box: the local window admits
    assert time.monotonic() - t0 < 0.5 and limiter.local_only and store.calls == 1
    await limiter.admit(origin(), 1)
    with pytest.raises(RateLimited):  # the local window still counts
        await limiter.admit(origin(), 1)
    assert store.calls == 1  # the breaker kept Redis out of the next calls
    limiter.box.reset()  # the breaker's 30 s are over: Redis is asked again
    await limiter.admit(origin("U2"), 1, within_s=0.1)
    assert store.calls == 2
