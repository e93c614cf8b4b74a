"""The English catalogue, the reference: every other language has exactly these keys and {placeholders}."""

MESSAGES = {
    "queued": "⏳ {who} queued{n}{where}{lane}: {what}",
    "n_images": " ({n} images)",
    "position_estimate": ", position ~{position}",
    "position": ", position {position}",
    "ready": ", ready {when}",
    "ready_by": ", ready by {when}",
    "lane_relax": " · relax mode",
    "lane_replay": " · re-run lane",
    "progress": "🎨 {who} {bar} step {step}/{total}{ready}: {what}",
    "drawing": "🎨 {who} drawing{ready}: {what}",
    "your_request": "your request",
    "the_request": "the request",
    "done": "✅ {who}{what}{seeds}{cached}{rerun}",
    "seeds": " (seed {seeds})",
    "from_cache": " · from cache",
    "rerun": " · re-run of an earlier request{why}",
    "failed": "❌ {who}could not draw {what}: {message}{rerun}",
    "blocked": "🚫 {message} Nothing was posted to the channel.{rerun}",
    "cancelled": "🛑 cancelled: {what}{why}",
    "done_see_below": "{done} · done: see below",
    "cannot_upload": "❌ {who} I could not post the images here: invite me with `/invite @skillgen`.",
    "ping_picture_ready": "🔔 {who} Your picture is ready (above).",
    "ping_picture_failed": "🔔 {who} Your picture could not be done (above).",
    "ping_training_ready": "🔔 {who} Your training is ready (above).",
    "ping_training_failed": "🔔 {who} Your training could not be done (above).",
    "queue_down_request": "❌ Your request could not be queued (the queue is unreachable). Try again in a minute.",
    "queue_down_cancel": "❌ The cancel could not be queued (the queue is unreachable). Try again in a minute.",
    "busy": "busy: about {queued_min} min of work is queued; try again in about {retry_min} min",
    "at_cap": "you already have {count} requests waiting; wait for one to finish (or cancel one)",
    "slow": "I could not look up the request behind this button just now; try again in a minute.",
    "forgotten": (
        "I no longer have the request behind this button (results can be re-rolled for a "
        "limited time); run /skill again with the same prompt."
    ),
    "not_owner_cancel": "Only the person who asked can cancel this.",
    "cancel_forgotten": "I no longer have this request, so it cannot be cancelled (it is probably finished).",
    "cancelling": "Cancelling…",
    "not_owner_delete": "Only the person who asked can delete this.",
    "delete_forgotten": (
        "I no longer have this request, so I cannot tell who asked for it; someone who may manage messages here "
        "can remove it."
    ),
    "no_such_image": "This result has no image {index}.",
    "too_large_to_upscale": (
        "This image is {width}x{height}: twice that is more than {max_px} pixels a side, so it cannot be upscaled."
    ),
    "parameters": "Copy this line to ask for the same picture again:\n{line}",
    # Button labels: a result's and a status's, shown to the whole channel in the requester's language.
    "button_reroll": "Re-roll",
    "button_vary": "Variations",
    "button_remix": "Remix",
    "button_params": "Parameters",
    "button_delete": "Delete",
    "button_cancel": "Cancel",
    "button_upscale_one": "Upscale 2x",
    "button_vary_one": "Vary",
    # Remix's modal (Discord: title and label at most 45 characters, placeholder 100; Slack: title, submit and
    # close 24, label and hint 2000): tests/unit/test_locales.py checks every language.
    "remix_title": "Remix: same seed and options",
    "remix_label": "Prompt",
    "remix_placeholder": "add --ar 16:9, --n 2, ... to change an option",
    "remix_slack_title": "Remix",
    "remix_submit": "Draw",
    "remix_close": "Cancel",
    "remix_slack_label": "Prompt (same seed and options)",
    "remix_hint": "Add --ar 16:9, --n 2, ... to change an option.",
    "remix_too_slow": "I could not open the Remix form in time; click Remix again.",
    "remix_empty": "Write the prompt to draw (the seed and options stay as they were unless you add --options).",
    # /skill help (grammar.help_text): {command} as the person's client shows the command (Discord's zh: /技能图).
    "help": (
        "**{command}** draws a skill image and posts it here.\n"
        "`{command} <prompt> [--no <negative>] [--ar 16:9 | --size 512x768] [--steps N] [--seed N] [--n 1-4] "
        "[--adapter name[@vN]] [--relax] [--turbo]`\n"
        "• `--no` things to keep out of the picture  • `--ar` aspect ratio, or `--size` exact WxH (multiples of 8, "
        "64-1024)\n"
        "• `--steps` 1-50  • `--seed` 0-4294967295 for a repeatable image  • `--n` images, 1-4\n"
        "• `--adapter` one of your team's LoRA adapters, latest version or `name@v2`\n"
        "• `--relax` relax mode: no hurry, drawn when the GPUs have room (spares your team's fast share)\n"
        "• `--turbo` turbo: a quick draft in a few steps (4, at most 8 with `--steps`); not with `--adapter`\n"
        "• **Cancel** on the status stops your request while it is queued or drawing\n"
        "Example: `{command} a drummer's paradiddle, top view --ar 16:9 --n 2`"
    ),
    # The grammar's refusals (bots/grammar.py): the option names stay as typed, in every language.
    "unknown_option": "unknown option --{name}; options are {options}",
    "given_twice": "--{name} is given twice; keep one",
    "takes_no_value": "--{name} takes no value; put it after the prompt, e.g. {example}",
    "needs_value": "--{name} needs a value, e.g. {example}",
    "ar_or_size": "use either --ar or --size, not both",
    "unknown_field": "unknown option {name}; options are {options}",
    "field_given_twice": "{name} is given twice, as a field and as --{name} in the prompt; keep one",
    "ar_or_size_fields": "use either ar or size, not both",
    "help_takes_no_options": "`help` takes no options; write a prompt to draw, or just `help`",
    "whole_number": "--{name} must be a whole number, got {value}; e.g. {example}",
    "size_format": "--size must look like 512x768, got {value}",
    "ar_format": "--ar must look like 16:9, got {value}",
    "ar_extreme": "--ar {value} is too extreme; use a ratio between 1:4 and 4:1",
    # The rate limits (bots/ratelimit.py).
    "rate_limited": "You have reached {limit}. Try again in {wait} (at {at}).",
    "n_over_limit": "--n {images} is more than {limit}; ask for at most {count}",
    "limit_user": "your limit of {count} {unit} per {per}",
    "limit_team": "your team's limit of {count} {unit} per {per}",
    "unit_requests": "requests",
    "unit_images": "images",
    "per_minute": "minute",
    "per_hour": "hour",
    "per_day": "day",
    "per_seconds": "{seconds} seconds",
    "seconds": "{n} seconds",
    "minutes": "{n} minutes",
    "hours": "{n} hours",
    # Told privately when the bot may not post in the request's channel (Discord 403 50001 / 50013).
    "missing_permission": (
        "⚠️ I could not post your result in {channel}: the bot {lacking} that channel. Ask a server admin to give the "
        "bot View Channel, Send Messages, Attach Files, Embed Links and Read Message History there (and Send "
        "Messages in Threads for threads). Here is your result:"
    ),
    "cannot_see": "cannot see",
    "not_allowed_in": "is not allowed to post in",
    # Slack: a channel the bot cannot post in (bots/slack_bot.py `cannot_post`), and a Delete that failed.
    "slack_not_in_channel": "I am not in this channel: add me with `/invite @skillgen`, then run the command again.",
    "slack_channel_not_found": (
        "I cannot see this channel: add me with `/invite @skillgen`, then run the command again."),
    "slack_is_archived": "This channel is archived, so I cannot post the result here.",
    "slack_not_in_dm": "I cannot post in this conversation: run the command in a channel I am in, or in a DM with me.",
    "slack_cannot_post": "I cannot post here ({error}).",
    "cannot_delete": "I could not delete it ({error}).",
    # A team SKILL_ALLOWED_TEAMS does not list (bots/intake.py).
    "not_allowed": (
        "skillgen is not enabled for this {where}. Ask whoever runs it to add `{who}` to SKILL_ALLOWED_TEAMS."),
    "where_discord": "Discord server",
    "where_slack": "Slack workspace",
    "where_team": "team",
}
