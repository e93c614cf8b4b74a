"""`/skill-train` parsing, who may train, the requests it builds, and `/skill-adapters` per team."""

from __future__ import annotations

import re

import numpy as np
import pytest
from safetensors.numpy import save

from bots.settings import TeamPolicy, TrainCommandSettings
from bots.train_commands import (
    Attached,
    Cancel,
    Help,
    Member,
    NotAllowed,
    Train,
    TrainCommandError,
    cancel_request,
    check_allowed,
    check_files,
    describe_adapters,
    finetune_key,
    finetune_request,
    parse,
    progress_text,
    train_command,
)
from schemas.codec import decode, encode
from schemas.limits import IngestLimits
from schemas.messages import (
    EventKind,
    FineTuneCancel,
    FineTuneRequest,
    JobEvent,
    Origin,
)
from skillgen.adapters.registry import Registry
from tests.unit.test_registry import record
from trainer.settings import TrainerSettings

pytestmark = pytest.mark.unit

DISCORD = Origin(platform="discord", team_id="111", channel_id="1001", user_id="2001")
SLACK = Origin(platform="slack", team_id="T01", channel_id="C1", user_id="U1")
URL = "https://cdn.discordapp.com/attachments/1/2/drum.png"


def settings(**kw) -> TrainCommandSettings:
    return TrainCommandSettings(_env_file=None, **kw)


# --------------------------------------------------------------------------------------------------- parsing


def test_parses_a_train_command_with_free_text_caption():
    assert parse("/skill-train team-style --trigger zq --steps 300 --caption a drummer's grip, top view") == Train(
        "team-style", "zq", 300, "a drummer's grip, top view"
    )
    assert parse("team-style") == Train("team-style")


def test_parses_cancel_and_help():
    assert parse("/skill-train cancel team-style") == Cancel("team-style")
    assert parse("") == Help() == parse("help")


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Team Style", "give one adapter name first"),
        ("BadName!", "lowercase letters"),
        ("cancel", "usage: /skill-train cancel <name>"),
        ("cancel a b", "usage"),
        ("x --steps many", "--steps must be a whole number"),
        ("x --trigger two words", "--trigger must be one word"),
        ("x --seed 4", "unknown option --seed"),
        ("x --steps 1 --steps 2", "--steps is given twice"),
        ("x --caption", "--caption needs a value"),
    ],
)
def test_bad_commands_say_what_to_change(text, reason):
    with pytest.raises(TrainCommandError, match=reason):
        parse(text)


def test_reserved_words_are_not_adapter_names():
    with pytest.raises(TrainCommandError, match="reserved"):
        train_command("help")


# ----------------------------------------------------------------------------------------------- permission


def test_discord_members_train_with_a_configured_role():
    permissions = {"111": TeamPolicy(discord_role_ids={"42"})}
    check_allowed(permissions, DISCORD, Member("u1", role_ids=frozenset({"7", "42"})))
    with pytest.raises(NotAllowed, match="training roles"):
        check_allowed(permissions, DISCORD, Member("u1", role_ids=frozenset({"7"})))


def test_slack_admins_listed_users_and_user_groups_may_train_when_configured():
    permissions = {"T01": TeamPolicy(slack_admins=True, slack_user_ids={"U9"}, slack_usergroup_ids={"S1"})}
    check_allowed(permissions, SLACK, Member("U1", is_admin=True))
    check_allowed(permissions, SLACK, Member("U9"))
    check_allowed(permissions, SLACK, Member("U2", usergroup_ids=frozenset({"S1"})))
    with pytest.raises(NotAllowed, match="workspace's trainers"):
        check_allowed(permissions, SLACK, Member("U2", usergroup_ids=frozenset({"S2"})))
    with pytest.raises(NotAllowed):
        check_allowed({"T01": TeamPolicy(slack_user_ids={"U9"})}, SLACK, Member("U1", is_admin=True))


def test_a_team_without_a_policy_cannot_train_and_one_team_policy_does_not_open_another():
    permissions = {"222": TeamPolicy(discord_role_ids={"42"})}
    with pytest.raises(NotAllowed, match="not enabled for this team"):
        check_allowed(permissions, DISCORD, Member("u1", role_ids=frozenset({"42"})))


def test_trainer_settings_nest_under_double_underscores(monkeypatch):
    monkeypatch.setenv("SKILL_LORA__UNET_RANK", "16")
    monkeypatch.setenv("SKILL_LORA__UNET_TARGETS", '["to_q", "conv1"]')
    monkeypatch.setenv("SKILL_INGEST__MAX_IMAGES", "20")
    s = TrainerSettings(_env_file=None)
    assert (s.lora.unet_rank, s.lora.unet_targets, s.lora.text_rank, s.ingest.max_images) == (16, ["to_q", "conv1"], 4, 20)


def test_permissions_come_from_the_environment_as_json(monkeypatch):
    monkeypatch.setenv("SKILL_TRAIN_PERMISSIONS", '{"111": {"discord_role_ids": ["42"]}}')
    assert settings().train_permissions == {"111": TeamPolicy(discord_role_ids={"42"})}


# ------------------------------------------------------------------------------------------------- messages


def test_builds_the_finetune_request_that_the_codec_carries():
    req = finetune_request(parse("team-style --trigger zq --steps 300"), DISCORD, [URL], settings())
    assert (req.adapter, req.trigger, req.steps, req.image_urls) == ("team-style", "zq", 300, [URL])
    value, headers = encode(req)
    assert decode(value, FineTuneRequest, headers) == req
    assert finetune_key(req) == b"111/team-style"
    assert finetune_request(Train("x"), DISCORD, [URL], settings(default_train_steps=200)).steps == 200


def test_request_errors_are_for_the_person():
    with pytest.raises(TrainCommandError, match="attach the training images"):
        finetune_request(Train("x"), DISCORD, [], settings())
    with pytest.raises(TrainCommandError, match="downloads only come from"):
        finetune_request(Train("x"), DISCORD, ["https://evil.example/a.png"], settings())
    with pytest.raises(TrainCommandError, match="steps"):
        finetune_request(Train("x", steps=5), DISCORD, [URL], settings())


@pytest.mark.security
@pytest.mark.parametrize(
    "build",
    [
        lambda: parse("/skill-train team-style --trigger zq --caption a nude zq figure"),
        lambda: train_command("team-style", caption="a n u d e figure"),
        lambda: finetune_request(Train("x", caption="a nude figure"), DISCORD, [URL], settings()),
    ],
    ids=["slack-text", "discord-option", "request"],
)
def test_a_caption_the_prompt_policy_blocks_is_refused_at_the_bot(build):
    with pytest.raises(TrainCommandError) as err:
        build()
    assert str(err.value).startswith("--caption refused. Your prompt was blocked: it asks for sexual content or "
                                     "nudity. (ref "), str(err.value)


def test_a_request_may_carry_uploaded_blobs_instead_of_urls(tmp_path):
    from skillgen.runtime.blobstore import BlobStore

    ref = BlobStore((tmp_path / "blobs").as_uri()).put(b"\x89PNG", "application/octet-stream")
    req = finetune_request(Train("x", caption="a drum"), SLACK, [], settings(), images=[ref])
    assert (req.images, req.image_urls) == ([ref], [])
    value, headers = encode(req)
    assert decode(value, FineTuneRequest, headers) == req
    with pytest.raises(TrainCommandError, match="file 2: evil.example: downloads only come from"):
        finetune_request(Train("x"), DISCORD, [URL, "https://evil.example/<!here>.png"], settings())


def test_cancel_is_a_message_of_its_own_for_the_team():
    msg = cancel_request(Cancel("team-style"), DISCORD)
    value, headers = encode(msg)
    assert decode(value, FineTuneCancel, headers) == msg
    assert (msg.origin.team_id, msg.adapter) == ("111", "team-style")


def test_adapters_are_listed_for_the_asking_team_only(tmp_path):
    registry = Registry((tmp_path / "adapters").as_uri())
    weights = save({"a.lora.down.weight": np.zeros((2, 2), np.float32)})
    registry.publish("111", "team-style", weights, record())
    registry.publish("111", "team-style", weights, record())
    text = describe_adapters(registry, "111")
    assert "`team-style`: v1, v2 (latest v2: trigger `zq`, 500 steps on 12 images, by <@u1>" in text
    assert "no adapters yet" in describe_adapters(registry, "222")


def test_progress_lines_show_step_loss_and_time_left():
    event = JobEvent(request_id="r", kind=EventKind.progress, origin=DISCORD, job="finetune", adapter="team-style",
                     step=120, total_steps=500, loss=0.08412, eta_s=185)
    assert progress_text(event) == "Training `team-style`: step 120/500 · loss 0.0841 · about 3 min left"


@pytest.mark.parametrize(
    ("name", "declared", "kind"),
    [
        ("a.png", "image/png", "image"), ("a.JPG", None, "image"), ("a.webp", "application/octet-stream", "image"),
        ("set.zip", "application/x-zip-compressed", "zip"), ("set.zip", "", "zip"),
        ("a.png", "text/html", None),  # the declared type wins over a hopeful name
        ("a.gif", "image/gif", None), ("notes.txt", None, None),
    ],
)
def test_a_files_kind_comes_from_its_declared_type_else_its_name(name, declared, kind):
    assert Attached(name, declared).kind == kind


@pytest.mark.parametrize(
    ("files", "says"),
    [
        ([], "attach the training images"),
        ([Attached("<!here>.png", "image/png", 2_000_000)], "file 1 is 1.9 MB; files may be at most 1.0 MB"),
        ([Attached(f"{i}.png", "image/png", 10) for i in range(4)], "4 images sent; at most 3 per training"),
        ([Attached("a.zip", "application/zip"), Attached("b.zip", "application/zip")], "not several zips"),
        ([Attached(f"{i}.png", "image/png", 600_000) for i in range(3)], "add up to 1.7 MB; at most 1.5 MB"),
    ],
)
def test_check_files_refuses_before_any_download(files, says):
    limits = IngestLimits(max_images=3, max_file_bytes=1024 * 1024, max_total_bytes=1536 * 1024)
    with pytest.raises(TrainCommandError, match=re.escape(says)):
        check_files(files, limits)
    check_files([Attached("a.png", "image/png", 10)], limits)  # and a good one passes
