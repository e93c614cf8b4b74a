"""The Gradio page: a Draw tab (the `/skill` form, status with a progress bar, a gallery, Re-roll, Variations and
Cancel) and an Adapters tab (the team's adapters, as `/skill-adapters` lists them, and, where SKILL_WEB_TRAINING
allows, `/skill-train` from uploaded images with its progress and sample grid).

Every handler is async and runs on the server's event loop, the one the Kafka clients live on. Handlers that
follow a request stream its events as they come (Gradio generators); they have no concurrency limit, since all
they do is wait. Cancel is its own event, so it runs while a request is being followed.
"""

from __future__ import annotations

import gradio as gr

from bots import render
from bots.web.form import ASPECT_RATIOS, COUNTS, Form, notice_html, status_html
from bots.web.frontend import Frontend, TrainForm, View, new_user_id

CSS = """
.skill-status { display: flex; align-items: center; gap: 0.75rem; min-height: 1.5rem; }
.skill-status progress { width: 16rem; height: 0.9rem; }
#gallery img { image-rendering: pixelated; }  /* the embedded model's 64x64 icons, enlarged */
.skill-notice { color: var(--error-text-color, #b91c1c); min-height: 1.2rem; }
"""

INTRO = """\
# skillgen
Skill images on demand, the same `/skill` as in Discord and Slack. Describe a skill to draw; options can go in the
fields below or after the prompt as in chat (`--ar 16:9 --n 2 --seed 42`)."""


def _outputs(view: View):
    """A View as the Draw tab's outputs: notice, status, gallery (left as it is while it has no news)."""
    if view.final is not None:
        status = status_html(final=view.final) if view.final else status_html()
    else:
        status = status_html(view.progress) if view.progress is not None else gr.skip()
    gallery = gr.skip() if view.images is None else view.images
    notice = gr.skip() if view.notice is None else notice_html(view.notice)
    return notice, status, gallery


def _train_outputs(view: View):
    """A training's View as the Train section's outputs: notice, status, the sample grid (one image)."""
    notice, status, _ = _outputs(view)
    grid = gr.skip() if view.images is None else (view.images[0][0] if view.images else None)
    return notice, status, grid


def build(frontend: Frontend) -> gr.Blocks:
    async def draw(user_id, prompt, negative, aspect_ratio, size, count, steps, seed, adapter, relax):
        form = Form(prompt=prompt, negative=negative, aspect_ratio=aspect_ratio or "", size=size, count=count or "",
                    steps=steps, seed=seed, adapter=adapter, relax=bool(relax))
        async for view in frontend.draw(user_id, form):
            yield _outputs(view)

    async def reroll(user_id):
        async for view in frontend.remix(user_id, render.REROLL):
            yield _outputs(view)

    async def vary(user_id):
        async for view in frontend.remix(user_id, render.VARIATIONS):
            yield _outputs(view)

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
            notice = gr.HTML(notice_html(), elem_id="notice")
            status = gr.HTML(status_html(), elem_id="status")
            gallery = gr.Gallery(label="Images", columns=4, fit_columns=False, height="auto", preview=False,
                                 format="png", object_fit="contain", elem_id="gallery")
            with gr.Row():
                reroll_button = gr.Button("Re-roll", elem_id="reroll")
                vary_button = gr.Button("Variations", elem_id="vary")
                cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel")
        with gr.Tab("Adapters") as adapters_tab:
            adapter_list = gr.Markdown(line_breaks=True, elem_id="adapter-list")
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
            train_notice = gr.HTML(notice_html(), elem_id="train-notice")
            train_status = gr.HTML(status_html(), elem_id="train-status")
            sample_grid = gr.Image(label="Sample grid", type="pil", format="png", interactive=False,
                                   elem_id="sample-grid")

        fields = [user, prompt, negative, aspect_ratio, size, count, steps, seed, adapter, relax]
        shown = [notice, status, gallery]
        follow = {"concurrency_limit": None, "show_progress": "hidden"}  # they only wait on events
        draw_button.click(draw, fields, shown, **follow)
        prompt.submit(draw, fields, shown, **follow)
        reroll_button.click(reroll, [user], shown, **follow)
        vary_button.click(vary, [user], shown, **follow)
        cancel_button.click(cancel, [user], [notice], concurrency_limit=None, show_progress="hidden")
        adapters_tab.select(adapters, None, [adapter_list], show_progress="hidden")
        refresh.click(adapters, None, [adapter_list])
        train_button.click(train, [user, train_name, train_trigger, train_steps, train_caption, train_files],
                           [train_notice, train_status, sample_grid], **follow)
        cancel_train_button.click(cancel_training, [user], [train_notice], concurrency_limit=None,
                                  show_progress="hidden")
    return page
