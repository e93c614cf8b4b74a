"""The catalogues (bots/locales): every key in every language with the same placeholders, Discord's locales read
as ours, and the status lines, refusals and pings in Chinese as in English."""

import string
from datetime import datetime, timezone

import pytest

from bots import image_actions, locales, render
from bots.errors import RateLimited, Refusal
from bots.locales import CATALOGUES, en
from schemas.messages import (
    BlobRef,
    EventKind,
    GenerateRequest,
    JobEvent,
    Origin,
    Platform,
)

pytestmark = pytest.mark.unit

DISCORD = Origin(platform=Platform.discord, team_id="222", channel_id="333", user_id="555",
                 created_at=datetime(2030, 1, 1, tzinfo=timezone.utc))


def placeholders(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


@pytest.mark.parametrize("lang", sorted(CATALOGUES))
def test_every_language_has_every_key_with_the_same_placeholders(lang):
    catalogue = CATALOGUES[lang]
    assert set(catalogue) == set(en.MESSAGES)
    for key, text in en.MESSAGES.items():
        assert placeholders(catalogue[key]) == placeholders(text), key
        assert catalogue[key].strip(), key


def test_discord_locales_are_read_as_ours():
    assert [locales.from_discord(x) for x in ("zh-CN", "zh-TW", "en-US", "en-GB", "ja", None, "")] == [
        "zh", "zh", "en", "en", "en", "en", "en"]


def event(kind: EventKind, **fields) -> JobEvent:
    return JobEvent(request_id="r1", kind=kind, origin=DISCORD, prompt="a cellist's vibrato",
                    created_at=DISCORD.created_at, **fields)


def test_status_lines_results_and_pings_in_chinese():
    req = GenerateRequest(origin=DISCORD, prompt="a cellist's vibrato", num_images=2, lane="relax")
    assert render.queued(req, lang="zh") == "⏳ <@555> 已排队（2 张） · 放松模式：*a cellist's vibrato*"
    assert render.queued(req) == "⏳ <@555> queued (2 images) · relax mode: *a cellist's vibrato*"
    queued = event(EventKind.queued, queue_position=3, eta_s=90)
    assert render.status(queued, "zh") == "⏳ <@555> 已排队，第 3 位，预计 <t:1893456090:R> 完成：*a cellist's vibrato*"
    progress = event(EventKind.progress, step=5, total_steps=20)
    assert render.status(progress, "zh") == "🎨 <@555> ▰▰▱▱▱▱▱▱▱▱ 第 5/20 步：*a cellist's vibrato*"
    done = event(EventKind.succeeded, blobs=[BlobRef(url="file:///x.png", sha256="a" * 64, bytes=1, seed=7)])
    assert render.done(done, "zh") == "✅ <@555> *a cellist's vibrato*（种子 7）"
    assert render.discord_ping(done, "zh") == "🔔 <@555> 你的图片已完成（见上方）。"
    assert render.cancelled(event(EventKind.cancelled), "zh") == "🛑 已取消：*a cellist's vibrato*"
    failed = event(EventKind.failed, message="out of memory")
    assert render.failed(failed, "zh") == "❌ <@555> 无法绘制 *a cellist's vibrato*：out of memory"
    assert render.queue_down(lang="zh") == "❌ 你的请求未能加入队列（队列无法连接）。请一分钟后再试。"
    assert render.status(progress, "fr") == render.status(progress)  # no catalogue: English


def test_refusals_from_the_catalogue_are_said_in_the_senders_language():
    refused = Refusal.of("at_cap", count=5)
    assert str(refused) == "you already have 5 requests waiting; wait for one to finish (or cancel one)"
    assert refused.say("zh") == "你已有 5 个请求在等待；请等其中一个完成（或取消一个）"
    assert Refusal("--steps: too many").say("zh") == "--steps: too many"  # the grammar's own words stay English


def test_slack_locales_are_read_as_ours():
    """users.info's `user.locale` (absent without include_locale, or when the lookup failed: English)."""
    assert [locales.from_slack(x) for x in ("zh-CN", "zh-TW", "en-US", "en-GB", "ja-JP", None, "")] == [
        "zh", "zh", "en", "en", "en", "en", "en"]


def test_button_labels_are_the_requesters_and_per_image_numbers_stay_as_they_are():
    assert [render.label(a, "zh") for a in render.ACTIONS] == ["重新生成", "变体", "改写重绘", "参数", "删除"]
    assert [render.label(a) for a in render.ACTIONS] == ["Re-roll", "Variations", "Remix", "Parameters", "Delete"]
    [row] = render.discord_buttons("r1", render.STATUS_ACTIONS, lang="zh")
    assert [b["label"] for b in row["components"]] == ["取消"]
    [_, actions] = render.slack_blocks("⏳", "r1", render.STATUS_ACTIONS, lang="zh")
    assert [e["text"]["text"] for e in actions["elements"]] == ["取消"]
    one = event(EventKind.succeeded, blobs=[BlobRef(url="file:///x.png", sha256="a" * 64, bytes=1, width=256,
                                                    height=256, seed=7)])
    assert image_actions.offered(one, "zh") == [[(render.UPSCALE, 1, "放大 2 倍"), (render.VARY, 1, "变化")]]
    assert image_actions.offered(one) == [[(render.UPSCALE, 1, "Upscale 2x"), (render.VARY, 1, "Vary")]]
    two = event(EventKind.succeeded, blobs=one.blobs * 2)
    assert image_actions.offered(two, "zh") == image_actions.offered(two)  # U1, U2 / V1, V2 in every language


@pytest.mark.parametrize("lang", sorted(CATALOGUES))
def test_remix_s_modals_are_within_discords_and_slacks_limits_in_every_language(lang):
    from bots.discord_bot import remix_modal
    from bots.slack_remix import remix_view

    modal = remix_modal("skill:remix:" + "r" * 32 + ":4294967295", "a prompt", lang).to_dict()
    [[box]] = [row["components"] for row in modal["components"]]
    assert 1 <= len(modal["title"]) <= 45 and 1 <= len(box["label"]) <= 45 and 1 <= len(box["placeholder"]) <= 100
    assert modal["title"] == locales.t("remix_title", lang)
    view = remix_view("a prompt", "{}", lang)
    assert all(1 <= len(view[k]["text"]) <= 24 for k in ("title", "submit", "close"))
    [block] = view["blocks"]
    assert 1 <= len(block["label"]["text"]) <= 2000 and 1 <= len(block["hint"]["text"]) <= 2000
    assert view["title"]["text"] == locales.t("remix_slack_title", lang)


def test_the_help_names_discords_command_as_a_chinese_client_shows_it():
    from bots.locales.commands import shown_as

    assert [shown_as("skill", lang) for lang in ("en", "zh")] == ["/skill", "/技能图"]
    assert shown_as("skill-adapters", "zh") == "/技能适配器" and shown_as("an-extensions", "zh") == "/an-extensions"


def refusal(call) -> Refusal:
    with pytest.raises(Refusal) as caught:
        call()
    return caught.value


def test_the_grammars_refusals_are_said_in_the_senders_language_options_as_typed():
    from bots import grammar

    unknown = refusal(lambda: grammar.split("a cat --colour red"))
    assert str(unknown) == unknown.say("en") == ("unknown option --colour; options are --no, --ar, --size, --steps, "
                                                 "--seed, --n, --adapter, --scheduler, --relax, --turbo")
    assert unknown.say("zh").startswith("未知选项 --colour；可用的选项有 --no, --ar")
    bad = refusal(lambda: grammar.parse("a cat --steps lots", DISCORD))
    assert str(bad) == "--steps must be a whole number, got 'lots'; e.g. --steps 20"
    assert bad.say("zh") == "--steps 必须是整数，收到的是 'lots'；例如 --steps 20"
    assert refusal(lambda: grammar.parse("a cat --ar 9:1", DISCORD)).say("zh") == "--ar 9:1 太极端了；请用 1:4 到 4:1 之间的比例"
    # The request contract's own words stay as it says them.
    assert refusal(lambda: grammar.parse("a cat --steps 99", DISCORD)).say("zh") == (
        "--steps: Input should be less than or equal to 50")


async def test_rate_limits_are_said_in_the_senders_language():
    from bots.ratelimit import Limit, RateLimiter
    from skillgen.runtime.redis import Store

    limiter = RateLimiter([Limit("user", 1, 60, "requests"), Limit("team", 3, 86400, "images")], Store(None))
    with pytest.raises(Refusal) as caught:
        await limiter.admit(DISCORD, 4)
    over = caught.value
    assert str(over) == "--n 4 is more than your team's limit of 3 images per day; ask for at most 3"
    assert over.say("zh") == "--n 4 超过了团队的上限（每天 3 张图片）；最多只能要 3 张"
    await limiter.admit(DISCORD, 1)
    with pytest.raises(RateLimited) as caught:
        await limiter.admit(DISCORD, 1)
    limited = caught.value
    assert str(limited).startswith("You have reached your limit of 1 requests per minute. Try again in 60 seconds (at ")
    assert limited.say("zh").startswith("你已达到你的上限（每分钟 1 个请求）。请 60 秒后再试（")
    assert limited.say("zh").endswith(" UTC）。") and limited.retry_at_s > 0
    assert Limit("team", 5, 30, "images").describe("zh") == "团队的上限（每 30 秒 5 张图片）"


def test_what_slack_refuses_a_post_with_is_said_in_the_persons_language():
    from bots.slack_post import cannot_post

    assert cannot_post("is_archived") == "This channel is archived, so I cannot post the result here."
    assert cannot_post("is_archived", "zh") == "这个频道已归档，我无法在这里发布结果。"
    assert cannot_post("ratelimited", "zh") == "我无法在这里发消息（ratelimited）。"
    assert cannot_post("not_in_dm").startswith("I cannot post in this conversation")
    assert render.discord_missing_permission("42", False, "zh").startswith("⚠️ 我无法在 <#42> 发布你的结果：机器人无权发消息到")
