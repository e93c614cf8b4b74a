"""Issue 13, items 1, 3 and 5: ids that become paths, keys and URLs; chat credentials; forged events.

Each test is an attack that must fail. The contracts refuse the ids, no message model has a place for a chat
credential, the blob store reads only its own names, and delivery posts only where a request the bots accepted
(sealed with SKILL_SIGNING_KEY) points: events written by anyone else are dead-lettered and never posted.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
from pydantic import BaseModel, ValidationError

from schemas import messages
from schemas.codec import header
from schemas.messages import (
    BlobRef,
    EventKind,
    FineTuneCancel,
    FineTuneRequest,
    GenerateRequest,
    JobEvent,
    Origin,
)
from skillgen.runtime.blobstore import BlobError, BlobStore
from tests.fakes import discord as fd
from tests.fakes.records import TopicReader
from tests.fakes.world import event, png_bytes
from tests.harness import SIGNING_KEY

pytestmark = pytest.mark.security

ORIGIN = {"platform": "discord", "team_id": "111", "channel_id": "222", "user_id": "333"}
BAD_REQUEST_IDS = ["../victim", "/", "a/b", "..", "a b", "x" * 65, ""]
MODELS_WITH_IDS = {
    GenerateRequest: {"origin": ORIGIN, "prompt": "a drummer"},
    FineTuneRequest: {"origin": ORIGIN, "adapter": "team-style", "image_urls": ["https://cdn.discordapp.com/a.png"]},
    JobEvent: {"origin": ORIGIN, "kind": "queued"},
}


@pytest.mark.parametrize("request_id", BAD_REQUEST_IDS)
@pytest.mark.parametrize("model", list(MODELS_WITH_IDS), ids=lambda m: m.__name__)
def test_every_message_model_refuses_a_request_id_that_could_name_a_path(model: type[BaseModel], request_id):
    with pytest.raises(ValidationError, match="request_id"):
        model.model_validate({**MODELS_WITH_IDS[model], "request_id": request_id})


@pytest.mark.parametrize("field", ["team_id", "channel_id", "user_id", "thread_id"])
@pytest.mark.parametrize("platform", ["discord", "slack", "console"])
@pytest.mark.parametrize("value", ["../../x", "../../guilds/1/members", "C1/../../x", "1?x=2", "1#f", "1 2", "..",
                                   ".hidden"])
def test_origin_ids_that_could_steer_a_rest_path_are_refused(platform, field, value):
    base = {"discord": ORIGIN, "slack": {"platform": "slack", "team_id": "T1", "channel_id": "C1", "user_id": "U1"},
            "console": {"platform": "console", "team_id": "local", "channel_id": "c", "user_id": "u"}}[platform]
    with pytest.raises(ValidationError, match=field):
        Origin.model_validate({**base, field: value})


def test_no_message_model_has_a_place_for_a_chat_credential():
    credential_words = ("token", "secret", "password", "webhook", "response_url", "authorization")
    for name in dir(messages):
        model = getattr(messages, name)
        if isinstance(model, type) and issubclass(model, BaseModel) and model.__module__ == messages.__name__:
            for field in model.model_fields:
                assert not any(word in field.lower() for word in credential_words), f"{name}.{field}"
            assert model.model_config.get("extra") == "forbid", f"{name} would carry unknown fields"
    with pytest.raises(ValidationError, match="interaction_token"):
        Origin.model_validate({**ORIGIN, "interaction_token": "aW50ZXJhY3Rpb246MTIz"})
    assert FineTuneCancel.model_fields.keys().isdisjoint({"interaction_token", "application_id"})


def test_the_blob_store_reads_only_its_own_content_addressed_names(tmp_path):
    (tmp_path / "secret.txt").write_text("the signing key")
    store = BlobStore((tmp_path / "blobs").as_uri())
    good = store.put(png_bytes(1))
    assert store.get(good) == png_bytes(1)
    root = store.url
    for url in [f"{root}/../secret.txt", f"{root}/{good.sha256[:2]}/../../secret.txt", f"{root}/other/{good.sha256}.png",
                f"{root}/{good.sha256[:2]}/{'0' * 64}.png", f"{root}/ab/{good.sha256}.png",
                "file:///etc/passwd"]:
        with pytest.raises(BlobError):
            store.get(good.model_copy(update={"url": url}))
    with pytest.raises(BlobError):  # the name is right but the digest claimed for it is not
        store.get(BlobRef(url=good.url, sha256="f" * 64, bytes=1))


def test_a_seal_binds_the_request_id_and_every_routing_field():
    key = SIGNING_KEY.encode()
    sealed = Origin.model_validate(ORIGIN).sealed("r1", key)
    assert sealed.verify("r1", key)
    assert not sealed.verify("r2", key)
    assert not sealed.verify("r1", b"another key of the same length as the real one!!")
    for field, other in [("channel_id", "999"), ("team_id", "998"), ("user_id", "997"), ("thread_id", "996"),
                         ("status_message_id", "995"), ("created_at", sealed.created_at - timedelta(days=30))]:
        assert not sealed.model_copy(update={field: other}).verify("r1", key), field


# -- forged events against the real delivery --------------------------------------------------------------------------
async def test_forged_events_post_nothing_and_go_to_the_dlq(world):
    """Whoever can write skill.events cannot make delivery post: not without a seal, not with a seal made for
    another request, not with a sealed origin whose channel was changed, not with a seal made with another key."""
    accepted = world.discord_origin(world.discord.deferred())
    accepted_id = uuid.uuid4().hex
    sealed = accepted.sealed(accepted_id, SIGNING_KEY.encode())
    forgeries = [
        event(accepted, EventKind.failed, uuid.uuid4().hex, message="<@everyone> free nitro at https://evil"),
        event(sealed, EventKind.failed, uuid.uuid4().hex, message="a seal for another request"),
        event(sealed.model_copy(update={"channel_id": "444444444444444444"}), EventKind.failed, accepted_id,
              message="the right seal, another channel"),
        event(accepted.sealed(accepted_id, b"k" * 48), EventKind.failed, accepted_id, message="another key"),
    ]
    # and a genuinely sealed origin from before the delivery markers' lifetime: its "posted" marker may be gone
    old = accepted.model_copy(update={"created_at": accepted.created_at - timedelta(days=8)})
    old_id = uuid.uuid4().hex
    forgeries.append(event(old.sealed(old_id, SIGNING_KEY.encode()), EventKind.failed, old_id, message="replayed"))
    async with world.running():
        await world.send(*forgeries, seal=False)
        # and one real result after them, so we know delivery has read past the forgeries
        good = world.discord.deferred()
        await world.send(event(world.discord_origin(good), EventKind.succeeded, uuid.uuid4().hex,
                               blobs=[world.image()]))
        await world.discord.wait_for(lambda c: c.method == "PATCH" and good.token in c.path and c.status == 200)
        await asyncio.sleep(0.5)
    posted = [c for c in world.discord.calls if c.method in ("POST", "PATCH") and good.token not in c.path]
    assert posted == [], [(c.method, c.path) for c in posted]
    async with TopicReader(world.env.vars["SKILL_KAFKA_BOOTSTRAP"], world.env.topics.dlq(world.env.topics.events),
                           JobEvent) as dlq:
        await dlq.wait(len(forgeries))
    reasons = sorted(header(h, "error").split(":")[0] for h in dlq.headers)
    too_old = "the request is 8.0 days old, older than the delivery markers live (SKILL_MARKER_TTL_S)"
    assert reasons == ["the event's origin seal does not verify"] * 4 + [too_old]
    assert {e.message for e in dlq.seen} == {f.message for f in forgeries}
    # the channel holds the two deferred responses, and only the genuine request says anything: its result and the
    # ping that tells its requester (a follow-up)
    said = [m for m in world.discord.channel(fd.CHANNEL_ID) if m.content and m.id != good.original.id]
    assert good.original.content.startswith("✅") and [m.content[:1] for m in said] == ["🔔"], said
