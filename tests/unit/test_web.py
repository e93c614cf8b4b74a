"""The web front-end's pure parts and its work without a page: form fields become the `/skill` request the chat
would make, events become page text, and a request is admitted, published, followed, re-rolled, upscaled or varied
(one chosen image) and cancelled through the bots' own intake (a recording producer, events fed by hand)."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bots import grammar, render
from bots.grammar import CommandError, Defaults
from bots.intake import CANCELLING, Intake
from bots.locales import t
from bots.web.form import (
    CHOOSE_AN_IMAGE,
    NO_TRAINING_TO_CANCEL,
    NOT_ANSWERING,
    NOTHING_TO_CANCEL,
    NOTHING_TO_PICK,
    NOTHING_TO_REPEAT,
    TRAINING_OFF,
    Form,
    final_line,
    progress_of,
    status_html,
)
from bots.web.frontend import TEAM, Frontend, Session, TrainForm, WebSettings
from schemas.codec import decode
from schemas.messages import (
    BlobRef,
    EventKind,
    FineTuneCancel,
    FineTuneRequest,
    GenerateCancel,
    GenerateRequest,
    JobEvent,
    Origin,
    Platform,
)
from skillgen.runtime.blobstore import BlobStore

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
KEY = "k" * 32
ORIGIN = Session("web-0123456789abcdef").origin


def request(form: Form) -> GenerateRequest:
    return grammar.parse(form.parsed(), ORIGIN, Defaults(width=64, height=64, steps=20))


# -- the form --------------------------------------------------------------------------------------------------

def test_blank_fields_are_options_not_given():
    req = request(Form(prompt="a cellist's bow hold", count="1"))
    assert (req.prompt, req.negative_prompt, req.width, req.height, req.steps, req.num_images, req.seed, req.lane,
            req.adapter) == ("a cellist's bow hold", "", 64, 64, 20, 1, None, "fast", None)


def test_every_field_maps_to_its_option():
    req = request(Form(prompt="a drummer's paradiddle", negative="blurry, text", size="64x96", count="3", steps="7",
                       seed="42", adapter="team-style@v2", relax=True))
    assert (req.negative_prompt, req.width, req.height, req.num_images, req.steps, req.seed, req.lane) == (
        "blurry, text", 64, 96, 3, 7, 42, "relax")
    assert (req.adapter.name, req.adapter.version) == ("team-style", 2)
    assert request(Form(prompt="a violinist", aspect_ratio="16:9")).width > 64


def test_the_turbo_box_is_the_turbo_flag():
    req = request(Form(prompt="a rower's catch", count="1", turbo=True))
    assert (req.turbo, req.scheduler, req.steps, req.guidance) == (True, "lcm", 4, 1.0)
    assert request(Form(prompt="a rower's catch", steps="6", turbo=True)).steps == 6
    with pytest.raises(CommandError, match="^--turbo: turbo uses this service's fast LoRA"):
        request(Form(prompt="a rower's catch", adapter="team-style", turbo=True))
    assert request(Form(prompt="a rower's catch")).turbo is False


def test_options_typed_after_the_prompt_work_as_in_chat():
    req = request(Form(prompt="a violinist's bow hold --ar 16:9 --n 2", count="1"))
    assert req.prompt == "a violinist's bow hold" and req.num_images == 2 and req.width > req.height


@pytest.mark.parametrize(
    "form, reason",
    [
        (Form(prompt="a cat", size="1001x64"), "--size/--ar width: must be a multiple of 8 between 64 and 1024 pixels, "
                                               "got 1001"),
        (Form(prompt="a cat", steps="many"), "--steps must be a whole number, got 'many'; e.g. --steps 20"),
        (Form(prompt="a cat", aspect_ratio="16:9", size="64x64"), "use either ar or size, not both"),
        (Form(prompt="a cat --seed 1", seed="2"), "seed is given twice, as a field and as --seed in the prompt; keep one"),
        (Form(prompt="   "), "the prompt: prompt is empty: describe the skill to draw, e.g. 'a drummer's paradiddle, "
                            "top view'"),
    ],
)
def test_bad_input_gets_the_chats_own_reason(form, reason):
    with pytest.raises(CommandError) as exc:
        request(form)
    assert str(exc.value) == reason


def test_a_sessions_origin_is_a_valid_console_origin_on_the_web_team():
    assert (ORIGIN.platform, ORIGIN.team_id, ORIGIN.channel_id) == (Platform.console, TEAM, TEAM)
    Origin.model_validate(ORIGIN.model_dump())


# -- page text -------------------------------------------------------------------------------------------------

def event(kind: EventKind, **fields) -> JobEvent:
    return JobEvent(request_id="r1", kind=kind, origin=ORIGIN, **fields)


def test_queue_position_and_eta_then_steps_are_shown():
    assert progress_of(event(EventKind.queued, queue_position=3, eta_s=41.6, lane="relax")).line == (
        "Queued, position 3, ready in about 42s (relax mode)")
    assert progress_of(event(EventKind.queued, queue_position=0)).line == "Queued, next in line"
    step = progress_of(event(EventKind.progress, step=5, total_steps=20, eta_s=3))
    assert (step.line, step.step, step.total) == ("Drawing: step 5/20, ready in about 3s", 5, 20)
    assert '<progress class="skill-bar" value="5" max="20">' in status_html(step)


def test_final_lines_name_the_seeds_or_say_why():
    blob = BlobRef(url="file:///x/a.png", sha256="0" * 64, bytes=1, seed=7)
    assert final_line(event(EventKind.succeeded, blobs=[blob, blob.model_copy(update={"seed": 8})])) == (
        "Done (seed 7, 8)")
    assert final_line(event(EventKind.failed, message="out of memory")) == "Could not draw this: out of memory"
    assert final_line(event(EventKind.cancelled)) == "Cancelled"


def test_what_a_person_wrote_reaches_the_page_escaped():
    html = status_html(progress_of(event(EventKind.failed, message="<img src=x onerror=alert(1)>")),
                       final=final_line(event(EventKind.failed, message="<script>alert(1)</script>")))
    assert "<script>" not in html and "&lt;script&gt;" in html


# -- the front-end, with a recording producer and hand-fed events ---------------------------------------------

class Producer:
    def __init__(self, fail: bool = False):
        self.sent: list[tuple[str, bytes, bytes, list]] = []
        self.fail = fail

    async def send_and_wait(self, topic, value, key=None, headers=None):
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.append((topic, value, key, headers))

    async def stop(self):
        pass


class Events:
    """The follower's part the front-end uses: a queue per watched request id."""

    def __init__(self):
        self.queues: dict[str, asyncio.Queue] = {}

    def watch(self, request_id):
        return self.queues.setdefault(request_id, asyncio.Queue())

    def forget(self, request_id):
        self.queues.pop(request_id, None)

    async def stop(self):
        pass


@pytest.fixture
def web(tmp_path):
    settings = WebSettings(_env_file=None, signing_key=KEY, blob_url=(tmp_path / "blobs").as_uri(), web_answer_s=0.3,
                           web_stall_s=0.3, adapter_url=(tmp_path / "adapters").as_uri())
    frontend = Frontend(settings)
    frontend.intake = Intake(settings, Producer(), frontend.store)
    frontend.follower = Events()
    return frontend


async def run_with(web, views, answer):
    """Collect a request's views while `answer(request)` plays the consumer."""
    out = []
    async for view in views:
        out.append(view)
        if view.request_id and len(out) == 1:
            asyncio.get_running_loop().call_soon(answer, web.follower.queues[view.request_id], view.request_id)
    return out


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (seed % 256, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


async def test_a_request_is_published_followed_and_its_images_fetched(web):
    ref = BlobStore(web.settings.blob_url).put(png(9), seed=9)

    def consumer(queue, rid):
        for ev in (event(EventKind.queued, queue_position=1, eta_s=2), event(EventKind.progress, step=1, total_steps=2),
                   event(EventKind.succeeded, blobs=[ref])):
            queue.put_nowait(ev.model_copy(update={"request_id": rid}))

    views = await run_with(web, web.draw("web-a", Form(prompt="a person playing guitar --seed 9")), consumer)
    [(topic, value, key, headers)] = web.intake.producer.sent
    sent = decode(value, GenerateRequest, headers)
    assert topic == web.settings.topics.generate and sent.prompt == "a person playing guitar" and sent.seed == 9
    assert sent.origin.verify(sent.request_id, KEY.encode())  # sealed as the bots seal
    assert [v.progress.line for v in views if v.progress] == ["Queued", "Queued, position 1, ready in about 2s",
                                                              "Drawing: step 1/2"]
    assert views[-1].final == "Done (seed 9)" and [c for _, c in views[-1].images] == ["seed 9"]
    assert web.session("web-a").last == sent.request_id and web.session("web-a").current is None
    assert web.follower.queues == {}  # forgotten once final


async def test_reroll_repeats_the_last_request_with_a_new_seed(web):
    assert [v.notice for v in [v async for v in web.remix("web-b", render.REROLL)]] == [NOTHING_TO_REPEAT]
    ref = BlobStore(web.settings.blob_url).put(png(1), seed=1)

    def done(queue, rid):
        queue.put_nowait(event(EventKind.succeeded, blobs=[ref]).model_copy(update={"request_id": rid}))

    await run_with(web, web.draw("web-b", Form(prompt="a red ball", seed="1")), done)
    await run_with(web, web.remix("web-b", render.REROLL), done)
    first, second = (decode(v, GenerateRequest, h) for _, v, _, h in web.intake.producer.sent)
    assert second.prompt == first.prompt and second.reroll == 1 and second.request_id != first.request_id


def succeeds_with(*refs):
    def answer(queue, rid):
        queue.put_nowait(event(EventKind.succeeded, blobs=list(refs)).model_copy(update={"request_id": rid}))
    return answer


async def test_upscale_and_vary_redraw_the_chosen_image_of_the_last_picture(web):
    assert [v.notice for v in [v async for v in web.from_image("web-i", render.UPSCALE)]] == [NOTHING_TO_PICK]
    blobs = BlobStore(web.settings.blob_url)
    refs = [blobs.put(png(s), seed=s, width=64, height=64) for s in (3, 4)]
    await run_with(web, web.draw("web-i", Form(prompt="a red ball", count="2")), succeeds_with(*refs))
    session = web.session("web-i")
    assert (session.result, session.chosen) == (refs, None)
    assert [v.notice for v in [v async for v in web.from_image("web-i", render.VARY)]] == [CHOOSE_AN_IMAGE]
    assert web.choose("web-i", 1) == "Image 2 of 2 (64x64): Upscale 2x makes it 128x128; Vary redraws it."
    upscaled = blobs.put(png(5), seed=4, width=128, height=128)
    views = await run_with(web, web.from_image("web-i", render.UPSCALE), succeeds_with(upscaled))
    assert views[-1].final == "Done (seed 4)" and views[-1].pictures == [upscaled]
    drawn, up = (decode(v, GenerateRequest, h) for _, v, _, h in web.intake.producer.sent)
    assert (up.init_image, up.width, up.height, up.upscale, up.seed, up.num_images) == (refs[1], 128, 128, 2, 4, 1)
    assert up.prompt == drawn.prompt and up.origin.user_id == "web-i" and up.origin.verify(up.request_id, KEY.encode())
    assert (session.last, session.result, session.chosen) == (up.request_id, [upscaled], None)  # a new picture
    await run_with(web, web.from_image("web-i", render.VARY), succeeds_with(upscaled))  # a lone image: no choosing
    _, value, _, headers = web.intake.producer.sent[-1]
    vary = decode(value, GenerateRequest, headers)
    assert (vary.init_image, vary.width, vary.height, vary.upscale, vary.reroll) == (upscaled, 128, 128, 1, 1)


async def test_an_image_too_large_to_upscale_gets_the_chats_refusal(web):
    wide = BlobStore(web.settings.blob_url).put(png(6), seed=6, width=520, height=64)
    await run_with(web, web.draw("web-j", Form(prompt="a red ball", size="520x64")), succeeds_with(wide))
    assert web.choose("web-j", 0) == "Image 1 of 1 (520x64): Vary redraws it; it is too large to upscale."
    views = [v async for v in web.from_image("web-j", render.UPSCALE)]
    assert [v.notice for v in views] == [t("too_large_to_upscale", width=520, height=64, max_px=1024)]
    assert len(web.intake.producer.sent) == 1  # only the drawing: the refusal published nothing


async def test_nobody_answering_and_a_broker_down_each_get_one_line(web):
    views = [v async for v in web.draw("web-c", Form(prompt="a person playing guitar"))]
    assert views[-1].notice == NOT_ANSWERING and views[-1].final == ""
    web.intake.producer.fail = True
    views = [v async for v in web.draw("web-c", Form(prompt="a person playing guitar"))]
    assert views[-1].notice == render.QUEUE_DOWN


async def test_a_blocked_prompt_is_refused_before_anything_is_published(web):
    views = [v async for v in web.draw("web-d", Form(prompt="a severed head"))]
    assert len(views) == 1 and views[0].notice.startswith("Your prompt was blocked: it asks for graphic violence")
    assert web.intake.producer.sent == []


async def test_cancel_publishes_the_owners_sealed_cancel_keyed_by_the_request_id(web):
    assert await web.cancel("web-e") == NOTHING_TO_CANCEL
    answers = []

    def cancel_then_cancelled(queue, rid):
        async def go():
            while not web.intake.producer.sent:  # the request is published (and remembered) first
                await asyncio.sleep(0.01)
            answers.append(await web.cancel("web-e"))
            queue.put_nowait(event(EventKind.cancelled).model_copy(update={"request_id": rid}))
        asyncio.ensure_future(go())

    views = await run_with(web, web.draw("web-e", Form(prompt="a person playing guitar")), cancel_then_cancelled)
    assert answers == [CANCELLING] and views[-1].final == "Cancelled"
    (_, request_value, _, request_headers), (topic, value, key, headers) = web.intake.producer.sent
    req, msg = decode(request_value, GenerateRequest, request_headers), decode(value, GenerateCancel, headers)
    assert topic == web.settings.topics.generate_cancel and key == req.request_id.encode()
    assert msg.request_id == req.request_id and msg.origin.user_id == "web-e"
    assert msg.origin.verify(req.request_id, KEY.encode())


async def test_training_is_off_unless_the_operator_turns_it_on(web, tmp_path):
    image = tmp_path / "one.png"
    image.write_bytes(png(1))
    views = [v async for v in web.train("web-f", TrainForm(name="team-style", files=[str(image)]))]
    assert [v.notice for v in views] == [TRAINING_OFF] and web.intake.producer.sent == []


async def test_a_training_uploads_the_images_and_follows_the_trainer_to_its_sample_grid(web, tmp_path):
    web.settings.web_training = True
    files = []
    for i in range(2):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(png(i))
    grid = BlobStore(web.settings.blob_url).put(png(200))

    def trainer(queue, rid):
        for ev in (event(EventKind.progress, job="finetune", adapter="team-style", step=5, total_steps=20, loss=0.1),
                   event(EventKind.succeeded, job="finetune", adapter="team-style", blobs=[grid])):
            queue.put_nowait(ev.model_copy(update={"request_id": rid}))

    form = TrainForm(name="team-style", trigger="tsx", steps="20", caption="a photo of tsx", files=list(map(str, files)))
    views = await run_with(web, web.train("web-f", form), trainer)
    [(topic, value, key, headers)] = web.intake.producer.sent
    req = decode(value, FineTuneRequest, headers)
    assert (topic, key) == (web.settings.topics.finetune, b"web/team-style")
    assert (req.adapter, req.trigger, req.steps, req.caption) == ("team-style", "tsx", 20, "a photo of tsx")
    assert [BlobStore(web.settings.blob_url).get(ref) for ref in req.images] == [png(0), png(1)]
    assert req.origin.verify(req.request_id, KEY.encode())
    progress = [v.progress for v in views if v.progress and v.progress.total]
    assert progress[0].line.startswith("Training team-style: step 5/20") and progress[0].step == 5
    assert views[-1].final == "Adapter team-style is ready" and len(views[-1].images) == 1


async def test_a_training_with_bad_input_gets_the_chats_reason(web, tmp_path):
    web.settings.web_training = True
    views = [v async for v in web.train("web-g", TrainForm(name="team-style"))]
    assert views[-1].notice == "attach the training images (PNG, JPEG or WebP) or one zip of them"
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    views = [v async for v in web.train("web-g", TrainForm(name="team-style", files=[str(text)]))]
    assert views[-1].notice == "file 1 is not a PNG, JPEG or WebP image or a zip of them"


async def test_cancel_training_publishes_the_teams_cancel(web, tmp_path):
    assert await web.cancel_training("web-h") == NO_TRAINING_TO_CANCEL
    web.session("web-h").training = "team-style"
    assert await web.cancel_training("web-h") == "Asked the trainer to stop team-style."
    [(topic, value, key, headers)] = web.intake.producer.sent
    msg = decode(value, FineTuneCancel, headers)
    assert (topic, key, msg.adapter, msg.origin.user_id) == (web.settings.topics.finetune_cancel, b"web/team-style",
                                                             "team-style", "web-h")


async def test_the_adapters_tab_lists_the_web_teams_adapters(web):
    assert (await web.adapters()).startswith("Your team has no adapters yet")


def test_the_web_process_loads_no_ml_library():
    code = ("import sys, bots.web, bots.web.page, bots.web.frontend, bots.web.stack\n"
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'torch', 'diffusers', 'transformers', "
            "'onnxruntime', 'peft', 'nudenet', 'consumer', 'trainer'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
