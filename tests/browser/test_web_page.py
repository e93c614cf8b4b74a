"""The web page in a real Chromium: a prompt becomes an image with the progress bar moving (and no Gradio timer text
beside it), Re-roll draws a different one, Upscale 2x and Vary redraw the image clicked in the gallery (and an
image too large to upscale gets the chat's refusal), Cancel stops a request, a training from uploaded images shows
its progress and sample grid and its adapter then draws, and bad input, a blocked prompt and an outage each get one
line, never a traceback."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from bots import render
from bots.locales import t
from bots.web.form import CHOOSE_AN_IMAGE, NOT_ANSWERING

pytestmark = pytest.mark.browser

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "web.png"
# Every status the page shows, recorded by the page itself (a poll could miss a step between two looks); and any
# elapsed-time text ("0.3s", "processing | 1.2s") that Gradio's own status trackers would put in the rendered page
# (innerText: what is laid out, even if transparent) while an event runs.
RECORD_STATUS = """() => {
  window.seenStatus = [];
  window.seenTimers = [];
  const status = document.querySelector('#status');
  new MutationObserver(() => {
    const box = status.querySelector('.skill-status');
    const bar = status.querySelector('progress');
    if (box) window.seenStatus.push({kind: box.dataset.kind, value: bar && bar.getAttribute('value'),
                                     max: bar && bar.getAttribute('max'), text: box.innerText});
  }).observe(status, {subtree: true, childList: true, attributes: true, characterData: true});
  new MutationObserver(() => {
    const timers = document.body.innerText.match(/[0-9]+[.][0-9]+ ?s\\b/g);
    if (timers) window.seenTimers.push(...timers);
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def open_page(page, url: str) -> None:
    page.goto(url)
    page.locator("#prompt textarea").wait_for()
    page.locator("#status .skill-status").wait_for(state="attached")
    page.evaluate(RECORD_STATUS)


def draw(page, prompt: str) -> None:
    page.locator("#prompt textarea").fill(prompt)
    page.locator("#draw").click()


def notice(page, timeout_ms: float = 30_000) -> str:
    """The one-line message, once there is one."""
    page.wait_for_function("() => document.querySelector('#notice .skill-notice').innerText.trim() !== ''",
                           timeout=timeout_ms)
    return page.locator("#notice .skill-notice").inner_text().strip()


def final_line(page, timeout_ms: float = 90_000) -> str:
    page.locator("#status .skill-status[data-kind=final]").wait_for(timeout=timeout_ms)
    return page.locator("#status .skill-line").inner_text().strip()


def images(page) -> list[bytes]:
    srcs = [img.get_attribute("src") for img in page.locator("#gallery img").all()]
    return [page.request.get(src).body() for src in srcs]


def natural_sizes(page) -> list[tuple[int, int]]:
    """The gallery's images as the browser decoded them (once each has loaded)."""
    page.wait_for_function("() => [...document.querySelectorAll('#gallery img')].every(i => i.complete)")
    return [tuple(size) for size in page.evaluate(
        "() => [...document.querySelectorAll('#gallery img')].map(i => [i.naturalWidth, i.naturalHeight])")]


def again(page, button: str) -> str:
    """Click a button that starts a new request and return that request's final line (not the previous one's)."""
    page.evaluate("() => document.querySelector('#status .skill-status').dataset.kind = 'stale'")
    page.locator(button).click()
    return final_line(page)


def no_timer_text(page) -> None:
    assert page.evaluate("window.seenTimers") == []  # only our own status line and bar, no Gradio "1.2s"


def test_a_prompt_becomes_an_image_while_the_progress_bar_moves(embedded_page, page, tmp_path):
    open_page(page, embedded_page.url)
    draw(page, "a red football skill icon on a light background")
    line = final_line(page)
    assert re.fullmatch(r"Done \(seed [0-9]+\)", line), line
    steps = [(int(s["value"]), int(s["max"])) for s in page.evaluate("window.seenStatus") if s["kind"] == "progress"]
    assert len({step for step, _ in steps}) >= 2, steps  # the bar moved, step by step
    assert [step for step, _ in steps] == sorted(step for step, _ in steps) and {total for _, total in steps} == {12}
    [png] = images(page)
    with Image.open(io.BytesIO(png)) as img:
        assert (img.format, img.size) == ("PNG", (64, 64))
    assert page.locator("#gallery").inner_text().count("seed ") == 1  # the caption names the seed
    no_timer_text(page)
    # README's picture is refreshed only when asked for (SKILL_UPDATE_SCREENSHOT=1): a test run leaves the tree clean.
    shot = SCREENSHOT if os.environ.get("SKILL_UPDATE_SCREENSHOT") == "1" else tmp_path / "web.png"
    page.screenshot(path=str(shot))
    with Image.open(shot) as img:
        assert img.width >= 800 and img.height >= 400


def test_reroll_draws_the_same_request_again_as_a_different_image(embedded_page, page):
    open_page(page, embedded_page.url)
    draw(page, "a blue guitar skill icon on a dark background")
    first_line = final_line(page)
    [first] = images(page)
    page.evaluate("() => document.querySelector('#status .skill-status').dataset.kind = 'stale'")
    page.locator("#reroll").click()
    second_line = final_line(page)
    [second] = images(page)
    assert second != first
    assert first_line != second_line and second_line.startswith("Done (seed ")  # a new seed


def test_upscale_and_vary_redraw_the_image_clicked_in_the_gallery(embedded_page, page):
    open_page(page, embedded_page.url)
    draw(page, "a yellow star skill icon on a dark background --n 2")
    assert final_line(page).startswith("Done (seed ")
    assert page.locator("#choice").inner_text().strip() == "Click an image to choose it for Upscale 2x or Vary."
    page.locator("#upscale").click()
    assert notice(page) == CHOOSE_AN_IMAGE  # two images and none chosen: nothing is drawn
    assert natural_sizes(page) == [(64, 64), (64, 64)]
    second_seed = page.locator("#gallery .thumbnail-item").nth(1).inner_text().strip()  # its caption: "seed N"
    page.locator("#gallery .thumbnail-item").nth(1).click()
    page.locator("#choice").get_by_text("Image 2 of 2 (64x64): Upscale 2x makes it 128x128").wait_for()
    assert again(page, "#upscale") == f"Done ({second_seed})"  # an upscale keeps the image's seed
    assert natural_sizes(page) == [(128, 128)]  # twice the size, the only image now
    [upscaled] = images(page)
    with Image.open(io.BytesIO(upscaled)) as img:
        assert (img.format, img.size) == ("PNG", (128, 128))
    assert page.locator("#notice .skill-notice").inner_text().strip() == ""  # no refusal: the notice is cleared
    line = again(page, "#vary-image")  # a lone image needs no choosing
    assert line.startswith("Done (seed ") and line != f"Done ({second_seed})"  # a variation has a new seed
    [varied] = images(page)
    assert varied != upscaled and natural_sizes(page) == [(128, 128)]  # redrawn at the image's own size
    no_timer_text(page)


def test_an_image_too_large_to_upscale_gets_the_chats_refusal(embedded_page, page):
    open_page(page, embedded_page.url)
    draw(page, "a white flag skill icon on a dark background --size 520x64")
    assert final_line(page).startswith("Done (seed ")
    choice = "Image 1 of 1 (520x64): Vary redraws it; it is too large to upscale."
    page.locator("#choice").get_by_text(choice).wait_for()
    page.locator("#upscale").click()
    assert notice(page) == t("too_large_to_upscale", width=520, height=64, max_px=1024)
    assert natural_sizes(page) == [(520, 64)]  # nothing was drawn


def test_cancel_stops_a_request_that_is_drawing(embedded_page, page):
    open_page(page, embedded_page.url)
    draw(page, "a green laptop skill icon on a dark background --steps 50 --n 4")
    page.locator("#status .skill-status[data-kind=progress]").wait_for(timeout=60_000)
    page.locator("#cancel").click()
    assert final_line(page).startswith("Cancelled")
    assert page.locator("#gallery img").count() == 0


def test_a_blocked_prompt_gets_the_chats_refusal_and_nothing_is_drawn(embedded_page, page):
    open_page(page, embedded_page.url)
    draw(page, "a severed head")
    line = notice(page)
    assert re.fullmatch(r"Your prompt was blocked: it asks for graphic violence or gore\. \(ref [0-9a-f]{8}\)", line)
    assert page.locator("#gallery img").count() == 0


@pytest.mark.parametrize(
    "prompt, reason",
    [
        ("a cat --size 1001x64", "--size/--ar width: must be a multiple of 8 between 64 and 1024 pixels, got 1001"),
        ("a cat --bogus 1", "unknown option --bogus; options are --no, --ar, --size, --steps, --seed, --n, --adapter, "
                            "--scheduler, --relax, --turbo"),
    ],
)
def test_bad_input_gets_the_same_one_line_reason_as_in_chat(embedded_page, page, prompt, reason):
    open_page(page, embedded_page.url)
    draw(page, prompt)
    assert notice(page) == reason


def test_the_options_fields_are_the_commands_options(embedded_page, page):
    open_page(page, embedded_page.url)
    page.get_by_role("button", name=re.compile("^Options")).click()
    page.locator("#size input, #size textarea").first.fill("64x96")
    page.locator("#seed input, #seed textarea").first.fill("7")
    draw(page, "a red football skill icon on a light background")
    assert final_line(page) == "Done (seed 7)"
    [png] = images(page)
    with Image.open(io.BytesIO(png)) as img:
        assert img.size == (64, 96)


def test_a_broker_outage_is_one_clear_line(web_server, page, tmp_path: Path):
    from skillgen.tools.embedded import free_port

    server = web_server(SKILL_KAFKA_BOOTSTRAP=f"127.0.0.1:{free_port()}", SKILL_WEB_PUBLISH_S="5",
                        SKILL_BLOB_URL=(tmp_path / "blobs").as_uri())
    open_page(page, server.url)
    draw(page, "a person playing guitar")
    assert notice(page) == render.QUEUE_DOWN
    assert "Traceback" not in page.content()


def test_no_consumer_is_one_clear_line(skill_env, web_server, page):
    server = web_server(SKILL_WEB_ANSWER_S="3")  # the test's broker and Redis, and no consumer at all
    open_page(page, server.url)
    draw(page, "a person playing guitar")
    assert notice(page) == NOT_ANSWERING
    assert "Traceback" not in page.content()



def test_training_from_uploaded_images_shows_progress_and_the_sample_grid(embedded_page, page, tmp_path: Path):
    from PIL import ImageDraw

    files = []
    for i in range(4):
        img = Image.new("RGB", (64, 64), (240, 240, 240))
        ImageDraw.Draw(img).ellipse((10 + i, 10, 54 - i, 54), fill=(200, 40 + 30 * i, 200))
        files.append(tmp_path / f"{i}.png")
        img.save(files[-1])
    open_page(page, embedded_page.url)
    page.get_by_role("tab", name="Adapters").click()
    page.locator("#adapter-list").get_by_text("Your team has no adapters yet").wait_for(timeout=30_000)
    page.locator("#train-name input, #train-name textarea").first.fill("circles")
    page.locator("#train-steps input, #train-steps textarea").first.fill("10")
    page.locator("#train-files input[type=file]").set_input_files([str(f) for f in files])
    page.wait_for_function("() => (document.querySelector('#train-files').innerText.match(/png/g) || []).length >= 4",
                           timeout=30_000)  # the four uploads are listed (by name: 0.png ... 3.png)
    page.evaluate("""() => { window.seenTraining = []; const s = document.querySelector('#train-status');
      new MutationObserver(() => window.seenTraining.push(s.innerText)).observe(s, {subtree: true, childList: true,
      characterData: true}); }""")
    page.locator("#train").click()
    page.locator("#train-status .skill-status[data-kind=final]").wait_for(timeout=240_000)
    final = page.locator("#train-status .skill-line").inner_text()
    assert final.startswith("Adapter circles@v1 is ready"), final
    assert any(re.search(r"Training circles: step [0-9]+/10", text) for text in page.evaluate("window.seenTraining"))
    page.locator("#sample-grid img").wait_for(timeout=30_000)
    page.locator("#refresh-adapters").click()
    page.locator("#adapter-list").get_by_text("circles").first.wait_for(timeout=30_000)
    page.get_by_role("tab", name="Draw").click()
    draw(page, "a sks skill icon --adapter circles")
    assert final_line(page).startswith("Done (seed ")
