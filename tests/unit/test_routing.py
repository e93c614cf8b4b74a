"""The consumer's routing rules (policy -> adapter -> cache -> draw) and its retry and split rules, without Kafka."""

from __future__ import annotations

import pytest

from consumer.cache import L1, CacheEntry, TwoLevelCache
from consumer.flight import Flight
from consumer.gpu import RETRIES_SPENT, GiveUp, Requeue, after_failure
from consumer.keys import ResolvedAdapter, batch_key, cache_key, image_seeds
from consumer.routing import NO_TURBO, Draw, Hit, Refuse, Router
from schemas.messages import AdapterRef, BlobRef, EventKind, GenerateRequest, Origin
from skillgen.inference.errors import AdapterError, DoesNotFit
from skillgen.safety import PromptPolicy

pytestmark = pytest.mark.unit

ORIGIN = Origin(platform="console", team_id="local", channel_id="c1", user_id="u1")
ADAPTER = ResolvedAdapter(name="clay", version=3, path="/adapters/clay/v3/x.safetensors", sha256="a" * 64)
BLOB = BlobRef(url="file:///blobs/ab/" + "b" * 64 + ".png", sha256="b" * 64, bytes=10)
POLICY_ID = "0123456789abcdef"


def request(prompt: str = "a drummer's paradiddle, top view", **kw) -> GenerateRequest:
    return GenerateRequest(origin=ORIGIN, prompt=prompt, width=64, height=64, steps=2, **kw)


class Resolver:
    def __init__(self, fail: bool = False):
        self.fail, self.calls = fail, []

    def __call__(self, ref: AdapterRef, team_id: str) -> ResolvedAdapter:
        self.calls.append((str(ref), team_id))
        if self.fail:
            raise AdapterError(f"no adapter named {ref.name!r} in your team")
        return ADAPTER


@pytest.fixture(scope="module")
def policy() -> PromptPolicy:
    return PromptPolicy.from_settings()


def router(policy, resolver=None, cache=None) -> Router:
    return Router(policy, resolver or Resolver(), cache or TwoLevelCache(L1(1 << 20)), "model|sha|torch|fp32",
                  POLICY_ID)


async def test_a_blocked_prompt_is_refused_before_its_adapter_is_even_looked_up(policy):
    resolver = Resolver()
    route = await router(policy, resolver).route(request("a nude figure", adapter=AdapterRef.parse("clay")))
    assert isinstance(route, Refuse) and route.kind == EventKind.blocked and route.stage == "prompt"
    assert "blocked" in route.message and resolver.calls == []


@pytest.mark.security
async def test_a_team_outside_the_allowlist_is_refused_before_anything_is_looked_up(policy):
    """Whoever writes skill.generate is not trusted to have passed the bots: the consumer checks the team again."""
    from skillgen.runtime.settings import CommonSettings

    settings = CommonSettings(allowed_teams="slack:T1,discord:111")
    resolver, cache = Resolver(), TwoLevelCache(L1(1 << 20))
    rt = Router(policy, resolver, cache, "model|sha|torch|fp32", POLICY_ID, settings.team_allowed)
    outsider = Origin(platform="slack", team_id="T9", channel_id="C1", user_id="U1")
    route = await rt.route(request(adapter=AdapterRef.parse("clay")).model_copy(update={"origin": outsider}))
    assert isinstance(route, Refuse) and route.kind == EventKind.failed and route.stage == "team"
    assert "SKILL_ALLOWED_TEAMS" in route.message and resolver.calls == []
    insider = Origin(platform="slack", team_id="T1", channel_id="C1", user_id="U1")
    assert isinstance(await rt.route(request().model_copy(update={"origin": insider})), Draw)
    assert isinstance(await rt.route(request()), Draw)  # the console (local) always may


async def test_an_unknown_adapter_fails_with_the_registrys_words(policy):
    route = await router(policy, Resolver(fail=True)).route(request(adapter=AdapterRef.parse("clay@v9")))
    assert route == Refuse(EventKind.failed, "no adapter named 'clay' in your team", "adapter")


async def test_a_miss_is_drawn_under_the_key_of_everything_that_decides_the_pixels(policy):
    req = request(adapter=AdapterRef.parse("clay"), num_images=2)
    route = await router(policy).route(req)
    assert route == Draw(cache_key(req, "model|sha|torch|fp32", ADAPTER, POLICY_ID), batch_key(req, ADAPTER),
                         ADAPTER, image_seeds(req))
    assert len(route.seeds) == 2 and route.batch.adapter == ADAPTER.key


async def test_a_cached_picture_is_a_hit_and_names_its_level(policy):
    req = request()
    cache = TwoLevelCache(L1(1 << 20))
    cache.l1.put(cache_key(req, "model|sha|torch|fp32", None, POLICY_ID), CacheEntry(blobs=[BLOB], model="m"))
    route = await router(policy, cache=cache).route(req)
    assert isinstance(route, Hit) and route.level == "l1" and route.entry.blobs == [BLOB]
    # another seed is another picture: a miss
    assert isinstance(await router(policy, cache=cache).route(request(seed=7)), Draw)


FAST = ResolvedAdapter(name="turbo", version=1, path="/models/lcm/pytorch_lora_weights.safetensors", sha256="c" * 64)


async def test_a_turbo_request_is_drawn_with_the_fast_lora_under_its_own_keys(policy):
    resolver = Resolver()
    rt = Router(policy, resolver, TwoLevelCache(L1(1 << 20)), "model|sha|torch|fp32", POLICY_ID, fast_adapter=FAST)
    turbo = GenerateRequest(origin=ORIGIN, prompt="a rower's catch", width=64, height=64, turbo=True)
    route = await rt.route(turbo)
    assert route == Draw(cache_key(turbo, "model|sha|torch|fp32", FAST, POLICY_ID), batch_key(turbo, FAST), FAST,
                         image_seeds(turbo))
    assert (route.batch.adapter, route.batch.scheduler, route.batch.steps) == (FAST.key, "lcm", 4)
    assert resolver.calls == []  # no registry look-up: the fast LoRA is the service's own
    plain = await rt.route(request("a rower's catch"))  # the same router draws other requests as before
    assert plain.adapter is None and plain.key != route.key and plain.batch != route.batch


async def test_a_turbo_request_fails_clearly_where_no_fast_lora_is_configured(policy):
    route = await router(policy).route(request(turbo=True))
    assert route == Refuse(EventKind.failed, NO_TURBO, "turbo")
    assert route.message == "turbo is not available on this service: no fast LoRA is configured (SKILL_FAST_LORA)"
    # the prompt policy still comes first
    blocked = await router(policy).route(request("a nude figure", turbo=True))
    assert blocked.kind == EventKind.blocked


def flight(attempts: int = 0, prompt: str = "a rower's catch") -> Flight:
    req = request(prompt)
    f = Flight(cache_key(req, "m", None, POLICY_ID), batch_key(req, None), req, None, image_seeds(req))
    f.attempts = attempts
    return f


def test_a_failed_batch_of_several_is_split_and_each_retried_alone_at_once():
    flights = [flight(prompt=f"p{i}") for i in range(3)]
    actions = after_failure(flights, RuntimeError("cuda error"), max_retries=2, retry_backoff_ms=200)
    assert actions == [Requeue(f, 0.0, 0) for f in flights]


def test_a_request_failing_alone_is_retried_with_doubling_backoff_then_given_up():
    exc = RuntimeError("flaky")
    f0, f1, f2 = flight(0), flight(1), flight(2)
    assert after_failure([f0], exc, 2, 200) == [Requeue(f0, 0.2, 1)]
    assert after_failure([f1], exc, 2, 200) == [Requeue(f1, 0.4, 2)]
    assert after_failure([f2], exc, 2, 200) == [GiveUp(f2, RETRIES_SPENT, exc)]


def test_an_error_that_names_the_request_itself_is_given_up_at_once_and_not_dead_lettered():
    f = flight()
    exc = DoesNotFit("1024x1024 does not fit in this GPU's memory")
    assert after_failure([f], exc, 2, 200) == [GiveUp(f, str(exc), None)]
