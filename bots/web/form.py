"""The page's pure parts: its form fields as the `/skill` grammar's options, and a request's events as page text.

The fields are the options of Discord's `/skill` (bots/grammar.py's names: no, ar, size, steps, seed, n, adapter,
relax, turbo), handed to `grammar.from_options` with the prompt, so the prompt box may also carry `--options` as in
chat and every mistake gets the chat's own one-line reason. A blank field is an option not given.

Everything a person controls (a prompt, a consumer's message that may quote one) reaches the page HTML-escaped.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from bots import grammar, image_actions, render
from bots.train_commands import progress_text
from schemas.messages import BlobRef, EventKind, JobEvent, Platform

ASPECT_RATIOS = ("", "1:1", "4:3", "3:4", "16:9", "9:16", "3:2", "2:3")  # "": the deployment's default size
COUNTS = ("1", "2", "3", "4")
NOT_ANSWERING = "The image service is not answering; try again in a minute."
STOPPED_ANSWERING = "The image service stopped answering about this request; try again in a minute."
OOPS = "Something went wrong on our side; try again in a minute."
NOTHING_TO_REPEAT = "Draw something first: Re-roll and Variations repeat your last picture."
NOTHING_TO_PICK = "Draw something first: Upscale 2x and Vary redraw one image of your last picture."
CHOOSE_AN_IMAGE = "Choose an image first: click it in the gallery, then Upscale 2x or Vary."
NOTHING_TO_CANCEL = "Nothing to cancel: none of your requests is queued or drawing."
NO_TRAINING_TO_CANCEL = "Nothing to cancel: no training of yours is running here."
TRAINING_OFF = ("Training from this page is off. An operator turns it on with SKILL_WEB_TRAINING=true (only for a "
                "page behind access control: everyone here is one team); or use /skill-train in Discord or Slack.")


@dataclass(frozen=True)
class Form:
    """The Draw tab's fields, as the page sends them (strings; a blank one is an option not given)."""

    prompt: str = ""
    negative: str = ""
    aspect_ratio: str = ""
    size: str = ""
    count: str = ""
    steps: str = ""
    seed: str = ""
    adapter: str = ""
    relax: bool = False
    turbo: bool = False

    def parsed(self) -> grammar.Parsed:
        """The command these fields make; raises CommandError (the chat's message) for a bad one."""
        options = {"no": self.negative, "ar": self.aspect_ratio, "size": self.size, "n": self.count,
                   "steps": self.steps, "seed": self.seed, "adapter": self.adapter, "relax": self.relax,
                   "turbo": self.turbo}
        cleaned = {name: value.strip() if isinstance(value, str) else value for name, value in options.items()}
        if cleaned["n"] == "1":
            cleaned["n"] = ""  # the default: so `--n 2` typed in the prompt is not "given twice"
        return grammar.from_options(self.prompt or "", cleaned)


@dataclass(frozen=True)
class Progress:
    """Where a request stands: one line, and a bar (`step` of `total`; total 0: no bar yet)."""

    line: str
    step: int = 0
    total: int = 0
    kind: str = "queued"


def about(eta_s: float | None) -> str:
    return f", ready in about {max(1, round(eta_s))}s" if eta_s is not None else ""


def progress_of(event: JobEvent) -> Progress:
    """A status that is not final: queue position and ETA, drawing, or step k of n (a training: the trainer's line)."""
    if event.job == "finetune":
        step, total = (event.step or 0, event.total_steps or 0) if event.kind == EventKind.progress else (0, 0)
        return Progress(progress_text(event).replace("`", ""), step, total, kind=event.kind.value)
    lane = f" ({render.LANE_NOTES[event.lane]})" if event.lane in render.LANE_NOTES else ""
    if event.kind == EventKind.queued:
        position = event.queue_position
        where = "" if position is None else ", next in line" if position == 0 else f", position {position}"
        return Progress(f"Queued{where}{about(event.eta_s)}{lane}", kind="queued")
    if event.kind == EventKind.progress and event.step is not None and event.total_steps:
        return Progress(f"Drawing: step {event.step}/{event.total_steps}{about(event.eta_s)}",
                        event.step, event.total_steps, kind="progress")
    return Progress(f"Drawing{about(event.eta_s)}", kind="started")


def seeds_of(event: JobEvent) -> list[int | None]:
    return [blob.seed for blob in event.blobs]


def caption(seed: int | None) -> str:
    return f"seed {seed}" if seed is not None else ""


def final_line(event: JobEvent) -> str:
    """A terminal event in one line: done with its seeds, or why not."""
    said = render.said(event.message, Platform.console)
    if event.job == "finetune":  # the trainer's message is a whole sentence
        ready = f"Adapter {event.adapter} is ready" if event.kind == EventKind.succeeded else event.kind.value
        return (said or ready).replace("`", "")
    if event.kind == EventKind.succeeded:
        seeds = [s for s in seeds_of(event) if s is not None]
        seed_note = f" (seed {', '.join(map(str, seeds))})" if seeds else ""
        return f"Done{seed_note}{' · from cache' if event.cache_level else ''}"
    if event.kind == EventKind.blocked:
        return said
    if event.kind == EventKind.cancelled:
        return "Cancelled" + (f": {said}" if said else "")
    return f"Could not draw this: {said}"


def status_html(progress: Progress | None = None, final: str | None = None) -> str:
    """The status area: a progress bar with its line while the request runs, the final line after."""
    if final is not None:
        return f'<div class="skill-status" data-kind="final"><span class="skill-line">{html.escape(final)}</span></div>'
    if progress is None:
        return '<div class="skill-status" data-kind="idle"></div>'
    bar = (f'<progress class="skill-bar" value="{progress.step}" max="{progress.total}"></progress>'
           if progress.total else '<progress class="skill-bar"></progress>')  # indeterminate while queued
    return (f'<div class="skill-status" data-kind="{progress.kind}">{bar}'
            f'<span class="skill-line">{html.escape(progress.line)}</span></div>')


def choice_line(refs: list[BlobRef], chosen: int | None) -> str:
    """Under the gallery: which image Upscale 2x and Vary redraw (`chosen`, from 1; a lone image needs no choice)
    and, where its size is known, whether it can be upscaled (image_actions.upscalable, as the chat offers U<i>)."""
    if not refs:
        return ""
    if chosen is None and len(refs) > 1:
        return "Click an image to choose it for Upscale 2x or Vary."
    index = chosen or 1
    ref = refs[index - 1]
    if ref.width is None or ref.height is None:
        return f"Image {index} of {len(refs)}: Upscale 2x or Vary redraws it."
    size = f"Image {index} of {len(refs)} ({ref.width}x{ref.height}): "
    if image_actions.upscalable(ref.width, ref.height):
        factor = image_actions.UPSCALE_FACTOR
        return size + f"Upscale 2x makes it {ref.width * factor}x{ref.height * factor}; Vary redraws it."
    return size + "Vary redraws it; it is too large to upscale."


def notice_html(text: str = "") -> str:
    """A one-line message for the person (a refusal, an outage, "Cancelling…"); empty clears it."""
    return f'<div class="skill-notice">{html.escape(text)}</div>' if text else '<div class="skill-notice"></div>'
