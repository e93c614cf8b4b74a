"""The Gradio page: a Draw tab (the `/skill` form, status with a progress bar, a gallery whose images can be
clicked for Upscale 2x and Vary, Re-roll, Variations and Cancel) and an Adapters tab (the team's adapters, as
`/skill-adapters` lists them, and, where SKILL_WEB_TRAINING allows, `/skill-train` from uploaded images with its
progress and sample grid).

Every handler is async and runs on the server's event loop, the one the Kafka clients live on. Handlers that
follow a request stream its events as they come (Gradio generators); they have no concurrency limit, since all
they do is wait. Cancel is its own event, so it runs while a request is being followed.

The page shows only its own status line and bar: every event hides Gradio's progress (`show_progress="hidden"`), and
CSS removes the status tracker of each component an event writes to (class skill-quiet), whose elapsed-time text
("processing | 1.2s") would otherwise sit in the page, transparent but there.
"""

from __future__ import annotations

import gradio as gr

from bots import render
from bots.web.form import (
    ASPECT_RATIOS,
    COUNTS,
    Form,
    choice_line,
    notice_html,
    status_html,
)
from bots.web.frontend import Frontend, TrainForm, View, new_user_id

CSS = """
.skill-status { display: flex; align-items: center; gap: 0.75rem; min-height: 1.5rem; }
.skill-status progress { width: 16rem; height: 0.9rem; }
#gallery img { image-rendering: pixelated; }  /* the embedded model's 64x64 icons, enlarged */
.skill-notice { color: var(--error-text-color, #b91c1c); min-height: 1.2rem; }
.skill-quiet > [data-testid="status-tracker"] { display: none !important; }  /* Gradio's own timer text */
"""

QUIET = ["skill-quiet"]  # components whose Gradio status tracker (timer text) is removed
INTRO = """\
# skillgen
Skill images on demand, the same `/skill` as in Discord and Slack. Describe a skill to draw; options can go in the
fields below or after the prompt as in chat (`--ar 16:9 --n 2 --seed 42`)."""


def _outputs(view: View):
    """A View as the Draw tab's outputs: notice, status, gallery and the line under it (each left as it is while it
    has no news). New images come with no image chosen (nor highlighted in the gallery)."""
    if view.final is not None:
        status = status_html(final=view.final) if view.final else status_html()
    else:
        status = status_html(view.progress) if view.progress is not None else gr.skip()
    gallery = gr.skip() if view.images is None else gr.Gallery(value=view.images, selected_index=None)
    notice = gr.skip() if view.notice is None else notice_html(view.notice)
    choice = gr.skip() if view.images is None else choice_line(view.pictures or [], None)
    return notice, status, gallery, choice


def _train_outputs(view: View):
    """A training's View as the Train section's outputs: notice, status, the sample grid (one image)."""
    notice, status, _, _ = _outputs(view)
    grid = gr.skip() if view.images is None else (view.images[0][0] if view.images else None)
    return notice, status, grid


def build(frontend: Frontend) -> gr.Blocks:
    async def draw(user_id, prompt, negative, aspect_ratio, size, count, steps, seed, adapter, relax, turbo):
        form = Form(prompt=prompt, negative=negative, aspect_ratio=aspect_ratio or "", size=size, count=count or "",
                    steps=steps, seed=seed, adapter=adapter, relax=bool(relax), turbo=bool(turbo))
        async for view in frontend.draw(user_id, form):
            yield _outputs(view)

    def clicked(follow_click, action: str):
        """The handler of a button that makes a new request from the last one (`frontend.remix`) or from the chosen
        image (`frontend.from_image`), streaming its views."""
        async def handler(user_id):
            async for view in follow_click(user_id, action):
                yield _outputs(view)

        return handler

    reroll, vary = clicked(frontend.remix, render.REROLL), clicked(frontend.remix, render.VARIATIONS)
    upscale, vary_image = clicked(frontend.from_image, render.UPSCALE), clicked(frontend.from_image, render.VARY)

    async def choose(user_id, evt: gr.SelectData):
        return frontend.choose(user_id, evt.index)

    async def cancel(user_id):
        return notice_html(await frontend.cancel(user_id))

    async def adapters():
        return await frontend.adapters()

    async def train(user_id, name, trigger, steps, caption, files):
        form = TrainForm(name=name or "", trigger=trigger or "", steps=steps or "", caption=caption or "",
                         files=[str(f) for f in files or []])
        async for view in frontend.train(user_id, form):
            yield _train_outputs(view)

    async def cancel_training(user_id):
        return notice_html(await frontend.cancel_training(user_id))

    with gr.Blocks(title="skillgen") as page:
        user = gr.State(new_user_id)  # a new person per browser session
        gr.Markdown(INTRO)
        with gr.Tab("Draw"):
            with gr.Row(equal_height=True):
                prompt = gr.Textbox(label="Prompt", placeholder="a drummer's paradiddle, top view", lines=1,
                                    max_lines=4, scale=5, elem_id="prompt")
                draw_button = gr.Button("Draw", variant="primary", scale=1, elem_id="draw")
            with gr.Accordion("Options", open=False):
                with gr.Row():
                    negative = gr.Textbox(label="Leave out (--no)", placeholder="blurry, text", elem_id="negative")
                    adapter = gr.Textbox(label="Adapter (--adapter)", placeholder="team-style or team-style@v2",
                                         elem_id="adapter")
                with gr.Row():
                    aspect_ratio = gr.Dropdown(list(ASPECT_RATIOS), value="", label="Aspect ratio (--ar)",
                                               elem_id="ar")
                    size = gr.Textbox(label="Size (--size)", placeholder="512x768", elem_id="size")
                    count = gr.Radio(list(COUNTS), value="1", label="Images (--n)", elem_id="count")
                with gr.Row():
                    steps = gr.Textbox(label="Steps (--steps)", placeholder=str(frontend.settings.default_steps),
                                       elem_id="steps")
                    seed = gr.Textbox(label="Seed (--seed)", placeholder="random", elem_id="seed")
                    relax = gr.Checkbox(label="Relax mode (--relax): drawn when the GPUs have room", elem_id="relax")
                    turbo = gr.Checkbox(label="Turbo (--turbo): a quick draft in a few steps", elem_id="turbo")
            notice = gr.HTML(notice_html(), elem_id="notice", elem_classes=QUIET)
            status = gr.HTML(status_html(), elem_id="status", elem_classes=QUIET)
            # A click on an image chooses it (the select event); no preview: the click is the choice.
            gallery = gr.Gallery(label="Images", columns=4, fit_columns=False, height="auto", preview=False,
                                 allow_preview=False, format="png", object_fit="contain", elem_id="gallery",
                                 elem_classes=QUIET)
            with gr.Row(equal_height=True):
                choice = gr.Markdown(elem_id="choice", elem_classes=QUIET)
                upscale_button = gr.Button("Upscale 2x", scale=0, elem_id="upscale")
                vary_image_button = gr.Button("Vary", scale=0, elem_id="vary-image")
            with gr.Row():
                reroll_button = gr.Button("Re-roll", elem_id="reroll")
                vary_button = gr.Button("Variations", elem_id="vary")
                cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel")
        with gr.Tab("Adapters") as adapters_tab:
            adapter_list = gr.Markdown(line_breaks=True, elem_id="adapter-list", elem_classes=QUIET)
            refresh = gr.Button("Refresh", elem_id="refresh-adapters")
            gr.Markdown("### Train an adapter" + ("" if frontend.settings.web_training else
                                                  " (off on this page: SKILL_WEB_TRAINING)"))
            with gr.Row():
                train_name = gr.Textbox(label="Adapter name", placeholder="team-style", elem_id="train-name")
                train_trigger = gr.Textbox(label="Trigger word (--trigger)", placeholder="sks", elem_id="train-trigger")
                train_steps = gr.Textbox(label="Steps (--steps)", placeholder=str(frontend.settings.default_train_steps),
                                         elem_id="train-steps")
            train_caption = gr.Textbox(label="Caption (--caption)", placeholder="a photo of sks", elem_id="train-caption")
            train_files = gr.File(label="Images (PNG, JPEG or WebP) or one zip", file_count="multiple",
                                  file_types=[".png", ".jpg", ".jpeg", ".webp", ".zip"], type="filepath",
                                  elem_id="train-files")
            with gr.Row():
                train_button = gr.Button("Train", variant="primary", elem_id="train")
                cancel_train_button = gr.Button("Cancel training", variant="stop", elem_id="cancel-training")
            train_notice = gr.HTML(notice_html(), elem_id="train-notice", elem_classes=QUIET)
            train_status = gr.HTML(status_html(), elem_id="train-status", elem_classes=QUIET)
            sample_grid = gr.Image(label="Sample grid", type="pil", format="png", interactive=False,
                                   elem_id="sample-grid", elem_classes=QUIET)

        fields = [user, prompt, negative, aspect_ratio, size, count, steps, seed, adapter, relax, turbo]
        shown = [notice, status, gallery, choice]
        follow = {"concurrency_limit": None, "show_progress": "hidden"}  # they only wait on events (or not at all)
        draw_button.click(draw, fields, shown, **follow)
        prompt.submit(draw, fields, shown, **follow)
        reroll_button.click(reroll, [user], shown, **follow)
        vary_button.click(vary, [user], shown, **follow)
        gallery.select(choose, [user], [choice], **follow)
        upscale_button.click(upscale, [user], shown, **follow)
        vary_image_button.click(vary_image, [user], shown, **follow)
        cancel_button.click(cancel, [user], [notice], **follow)
        adapters_tab.select(adapters, None, [adapter_list], show_progress="hidden")
        refresh.click(adapters, None, [adapter_list], show_progress="hidden")
        train_button.click(train, [user, train_name, train_trigger, train_steps, train_caption, train_files],
                           [train_notice, train_status, sample_grid], **follow)
        cancel_train_button.click(cancel_training, [user], [train_notice], **follow)
    return page
