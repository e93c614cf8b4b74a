"""What the chat front-ends and delivery count (served on SKILL_METRICS_PORT by skillgen.runtime.observability)."""

from __future__ import annotations

from prometheus_client import Counter

COMMANDS = Counter("skill_bot_commands_total", "Commands received by the chat front-ends", ["platform", "outcome"])
# outcome: ok, refused (the platform said no for good), forged (seal), duplicate (the request's result was posted)
POSTS = Counter("skill_delivery_posts_total", "Final results posted by delivery", ["platform", "kind", "outcome"])
BAD_HEADERS = Counter("skill_delivery_bad_headers_total",
                      "Re-queue headers delivery did not believe (not a finite number, too far ahead)", ["header"])
RETRIES = Counter("skill_delivery_retries_total", "Delivery waits, retries and re-queues", ["platform", "reason"])
TRAIN_COMMANDS = Counter(
    "skill_bot_train_commands_total",
    "/skill-train, its cancel and /skill-adapters, by what became of them",
    ["platform", "command", "outcome"],
)
DROPPED = Counter("skill_delivery_dropped_total",
                  "Posts delivery gave up on without a dead letter: a closed DM (Discord 50007), a result's ping",
                  ["platform", "reason"])
MISSING_PERMISSION = Counter("skill_delivery_missing_permission_total",
                             "Results the bot could not post in their channel (Discord 50001/50013); the requester "
                             "was sent a direct message instead", ["platform", "code"])
