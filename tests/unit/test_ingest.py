"""Hostile-input tests for trainer.ingest: one test (at least) per limit of the issue's point 2.

The URL and address policy is tested as pure functions; the download path against a local aiohttp server,
with the test-only loosening (plain http, a loopback host:port on the allowlist) injected here and nowhere else.
"""

from __future__ import annotations

import gzip
import io
import json
import stat
import struct
import zipfile
import zlib

import pytest
from aiohttp import web
from PIL import Image

from schemas import limits
from schemas.limits import IngestLimits
from skillgen.runtime import fetch
from skillgen.runtime.fetch import IngestError, check_address, check_url, download_all
from trainer import ingest
from trainer.ingest import collect, unpack_zip

pytestmark = pytest.mark.unit

LIMITS = IngestLimits()


def png(side: int = 16, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), color).save(buf, format="PNG")
    return buf.getvalue()


def encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format=fmt)
    return buf.getvalue()


def make_zip(members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def zip_with(info: zipfile.ZipInfo, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(info, data)
    return buf.getvalue()


def with_declared_size(png_bytes: bytes, width: int, height: int) -> bytes:
    """The PNG with its IHDR rewritten to claim another size (and a valid CRC): a decompression bomb's header."""
    ihdr_at = 8
    length = struct.unpack(">I", png_bytes[ihdr_at : ihdr_at + 4])[0]
    body = bytearray(png_bytes[ihdr_at + 8 : ihdr_at + 8 + length])
    body[0:8] = struct.pack(">II", width, height)
    chunk = b"IHDR" + bytes(body)
    rest = png_bytes[ihdr_at + 12 + length :]
    return png_bytes[:ihdr_at] + struct.pack(">I", length) + chunk + struct.pack(">I", zlib.crc32(chunk)) + rest


# --------------------------------------------------------------------------------------------- URL policy


def test_the_default_allowlist_accepts_discord_and_slack_file_urls():
    for url in (
        "https://cdn.discordapp.com/attachments/1/2/drum.png?ex=1&is=2&hm=3",
        "https://media.discordapp.net/attachments/1/2/drum.webp",
        "https://files.slack.com/files-pri/T1-F2/drum.jpg",
    ):
        assert check_url(url, LIMITS).host


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://cdn.discordapp.com/a.png", "only https"),
        ("ftp://cdn.discordapp.com/a.png", "only https"),
        ("https://evil.example/a.png", "downloads only come from"),
        ("https://cdn.discordapp.com.evil.example/a.png", "downloads only come from"),
        ("https://xcdn.discordapp.com/a.png", "downloads only come from"),
        ("https://cdn.discordapp.com:8443/a.png", "downloads only come from"),
        ("https://user:pw@cdn.discordapp.com/a.png", "credentials"),
        ("https:///a.png", "no host"),
        ("not a url at all", "only https"),
    ],
)
def test_urls_outside_the_policy_are_refused_with_the_reason(url, reason):
    with pytest.raises(IngestError, match=reason):
        check_url(url, LIMITS)


def test_the_signed_query_of_a_discord_url_is_not_echoed_back():
    with pytest.raises(IngestError) as err:
        check_url("http://cdn.discordapp.com/a.png?hm=secret-signature", LIMITS)
    assert "secret-signature" not in str(err.value)


@pytest.mark.parametrize(
    "address, kind",
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.7", "private"),
        ("172.16.5.4", "private"),
        ("169.254.169.254", "link-local"),  # the cloud metadata service
        ("fe80::1", "link-local"),
        ("::ffff:10.0.0.1", "private"),  # IPv4-mapped IPv6 is unwrapped
        ("::ffff:127.0.0.1", "loopback"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "not a public address"),  # carrier-grade NAT
    ],
)
def test_addresses_inside_the_network_are_refused(address, kind):
    with pytest.raises(IngestError, match=kind):
        check_address(address, "cdn.discordapp.com", LIMITS)


def test_public_addresses_pass_and_tests_may_allow_private_ones():
    check_address("162.159.128.233", "cdn.discordapp.com", LIMITS)
    check_address("2606:4700::6810:1", "cdn.discordapp.com", LIMITS)
    check_address("127.0.0.1", "localhost", IngestLimits(allow_private_addresses=True))


def test_an_allowlisted_ip_literal_is_still_checked_as_an_address():
    limits = IngestLimits(allowed_hosts=("169.254.169.254",))
    with pytest.raises(IngestError, match="link-local"):
        check_url("https://169.254.169.254/latest/meta-data", limits)


async def test_the_resolver_refuses_a_host_that_resolves_to_loopback():
    resolver = fetch.CheckedResolver(LIMITS)
    try:
        with pytest.raises(IngestError, match="localhost resolves to 127.0.0.1, a loopback address"):
            await resolver.resolve("localhost", 443)
    finally:
        await resolver.close()


# ----------------------------------------------------------------------------------------- download path


@pytest.fixture
async def server():
    """A local HTTP server; `server.url(path)`, `server.seen` (path -> request headers)."""
    seen: dict[str, dict] = {}
    big = b"\x89PNG" + b"x" * 5000

    async def image(request):
        seen[request.path] = dict(request.headers)
        return web.Response(body=png(), content_type="image/png")

    async def chunked(request):
        resp = web.StreamResponse()  # no Content-Length: only the running byte count can stop it
        await resp.prepare(request)
        for _ in range(10):
            await resp.write(big)
        return resp

    def answer(make):
        async def handler(request):
            raise make(request)

        return handler

    async def big_png(request):
        return web.Response(body=big, content_type="image/png")

    routes = {
        "/a.png": image,
        "/b.png": image,
        "/big.png": big_png,
        "/chunked.png": chunked,
        "/missing.png": answer(lambda r: web.HTTPNotFound()),
        "/loop": answer(lambda r: web.HTTPFound("/loop")),
        "/away": answer(lambda r: web.HTTPFound("https://evil.example/a.png")),
        "/hop": answer(lambda r: web.HTTPFound(f"http://localhost:{r.url.port}/b.png")),
    }
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]

    class Server:
        def url(self, path: str, host: str = "127.0.0.1") -> str:
            return f"http://{host}:{port}{path}"

        def limits(self, **kw) -> IngestLimits:
            base = {
                "allowed_hosts": (f"127.0.0.1:{port}", f"localhost:{port}"),
                "require_https": False,
                "allow_private_addresses": True,
            }
            return IngestLimits(**{**base, **kw})

    s = Server()
    s.seen = seen
    yield s
    await runner.cleanup()


async def test_downloads_images_from_an_allowed_host(server):
    files = await download_all([server.url("/a.png"), server.url("/b.png")], server.limits())
    assert [name for name, _ in files] == ["a.png", "b.png"]
    assert Image.open(io.BytesIO(files[0][1])).size == (16, 16)


async def test_a_redirect_loop_stops_at_the_redirect_cap(server):
    with pytest.raises(IngestError, match="^file 1: more than 3 redirects"):
        await download_all([server.url("/loop")], server.limits())


async def test_a_redirect_to_a_host_off_the_allowlist_is_refused(server):
    with pytest.raises(IngestError, match="^file 1: evil.example: downloads only come from"):
        await download_all([server.url("/away")], server.limits())


async def test_a_host_resolving_to_loopback_is_refused_at_connect_time(server):
    with pytest.raises(IngestError, match="localhost resolves to 127.0.0.1, a loopback address"):
        await download_all([server.url("/a.png", host="localhost")], server.limits(allow_private_addresses=False))


async def test_http_errors_are_reported_with_the_status(server):
    with pytest.raises(IngestError, match="^file 2: 127.0.0.1: the server answered HTTP 404$"):
        await download_all([server.url("/a.png"), server.url("/missing.png")], server.limits())


async def test_a_file_over_the_byte_limit_is_refused_by_content_length(server):
    with pytest.raises(IngestError, match="^file 1: the file is 5004 bytes; the limit is 4096 bytes"):
        await download_all([server.url("/big.png")], server.limits(max_file_bytes=4096))


async def test_a_body_without_content_length_is_cut_at_the_byte_limit(server):
    with pytest.raises(IngestError, match="^file 1: the file is over 20000 bytes"):
        await download_all([server.url("/chunked.png")], server.limits(max_file_bytes=20_000))


async def test_the_total_byte_limit_counts_every_file(server):
    one = len(png())
    with pytest.raises(IngestError, match="add up to more than"):
        await download_all([server.url("/a.png"), server.url("/b.png")], server.limits(max_total_bytes=one + 10))


async def test_too_many_urls_are_refused_before_any_download(server):
    with pytest.raises(IngestError, match="3 files sent; at most 2"):
        await download_all([server.url("/a.png")] * 3, server.limits(max_images=2))
    assert server.seen == {}


async def test_the_slack_token_goes_to_slack_hosts_only_and_never_across_a_redirect(server, monkeypatch):
    monkeypatch.setattr(limits, "SLACK_HOSTS", ("127.0.0.1",))  # stands in for files.slack.com
    await download_all([server.url("/a.png"), server.url("/hop")], server.limits(), slack_token="xoxb-secret")
    assert server.seen["/a.png"]["Authorization"] == "Bearer xoxb-secret"
    assert "Authorization" not in server.seen["/b.png"]  # reached through localhost after the redirect


# ------------------------------------------------------------------------------------------------- images


def test_png_jpeg_and_webp_are_accepted_as_rgb():
    files = [(f"x.{fmt.lower()}", encoded(fmt)) for fmt in ("PNG", "JPEG", "WEBP")]
    examples = collect(files, "zq", None, LIMITS)
    assert [e.image.mode for e in examples] == ["RGB"] * 3


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_image_formats_are_refused(fmt):
    with pytest.raises(IngestError, match="^image 1 is not a PNG, JPEG or WebP image$"):
        collect([(f"x.{fmt.lower()}", encoded(fmt))], "zq", None, LIMITS)


def test_text_posing_as_an_image_is_refused():
    with pytest.raises(IngestError, match="^image 2 is not a PNG, JPEG or WebP image$"):
        collect([("a.png", png()), ("notes.png", b"<html>login</html>")], "zq", None, LIMITS)


def test_a_decompression_bomb_is_refused_from_its_header():
    bomb = with_declared_size(png(), 60_000, 60_000)
    with pytest.raises(IngestError, match="image 1 (declares an enormous size|is 60000x60000)"):
        collect([("bomb.png", bomb)], "zq", None, LIMITS)


def test_the_pixel_limit_is_checked_before_decoding():
    with pytest.raises(IngestError, match="image 1 is 64x64 = 4096 pixels; at most 1000"):
        collect([("big.png", png(64))], "zq", None, IngestLimits(max_pixels=1000))


def test_a_truncated_image_is_refused():
    data = png(64, (10, 200, 30))
    with pytest.raises(IngestError, match="image 1 is (truncated or corrupt|not a PNG)"):
        collect([("cut.png", data[: len(data) // 2])], "zq", None, LIMITS)


def test_the_image_count_limit_counts_zip_members_too():
    archive = make_zip({f"{i}.png": png() for i in range(3)})
    with pytest.raises(IngestError, match="4 images sent; at most 3"):
        collect([("a.png", png()), ("set.zip", archive)], "zq", None, IngestLimits(max_images=3))


# --------------------------------------------------------------------------------------------------- zips


def test_a_zip_with_too_many_members_is_refused():
    archive = make_zip({f"{i}.png": b"" for i in range(5)})
    with pytest.raises(IngestError, match="file 1 has 5 entries; at most 4"):
        unpack_zip("file 1", archive, IngestLimits(max_zip_members=4))


def test_a_zip_whose_members_unpack_past_the_total_is_refused():
    archive = make_zip({"a.png": b"x" * 600, "b.png": b"x" * 600})
    with pytest.raises(IngestError, match="unpacks to 1200 bytes; at most 1000"):
        unpack_zip("file 1", archive, IngestLimits(max_zip_total_bytes=1000))


def test_a_member_over_the_file_limit_is_refused():
    archive = make_zip({"a.png": b"x" * 600})
    with pytest.raises(IngestError, match="^entry 1 of file 1 is 600 bytes; the limit is 500"):
        unpack_zip("file 1", archive, IngestLimits(max_file_bytes=500))


def test_a_highly_compressed_member_is_refused():
    archive = make_zip({"zeros.png": bytes(1_000_000)}, zipfile.ZIP_DEFLATED)
    with pytest.raises(IngestError, match=r"^entry 1 of file 1 is compressed \d+:1; at most 50:1"):
        unpack_zip("file 1", archive, LIMITS)


@pytest.mark.parametrize(
    "member, reason",
    [
        ("/etc/passwd.png", "absolute path"),
        ("C:/Windows/a.png", "absolute path"),
        ("../../a.png", r"climbs out of the zip with '\.\.'"),
        ("imgs/../../a.png", r"climbs out of the zip with '\.\.'"),
        ("..\\a.png", r"climbs out of the zip with '\.\.'"),
        ("inner.zip", "archive inside the zip"),
        ("inner.tar.gz", "archive inside the zip"),
    ],
)
def test_zip_member_paths_and_nested_archives_are_refused(member, reason):
    info = zipfile.ZipInfo(member)
    with pytest.raises(IngestError, match=f"^entry 1 of file 1 .*{reason}") as err:
        unpack_zip("file 1", zip_with(info, b"x"), LIMITS)
    assert member not in str(err.value)


def test_an_archive_hiding_behind_an_image_name_is_refused_by_its_bytes():
    archive = make_zip({"innocent.png": gzip.compress(b"x" * 100)})
    with pytest.raises(IngestError, match="entry 1 of file 1 is a gzip archive inside the zip"):
        unpack_zip("file 1", archive, LIMITS)
    nested = make_zip({"also.png": make_zip({"a.png": png()})})
    with pytest.raises(IngestError, match="entry 1 of file 1 is a zip archive inside the zip"):
        unpack_zip("file 1", nested, LIMITS)


def test_a_symlink_member_is_refused():
    info = zipfile.ZipInfo("link.png")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with pytest.raises(IngestError, match="entry 1 of file 1 is a symbolic link"):
        unpack_zip("file 1", zip_with(info, b"/etc/passwd"), LIMITS)


def test_an_encrypted_member_is_refused():
    archive = bytearray(make_zip({"secret.png": png()}))
    # zipfile cannot write encrypted members: set the "encrypted" flag in the local and the central header
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = archive.index(signature) + flag_at
        archive[at] |= 0x1
    with pytest.raises(IngestError, match="entry 1 of file 1 is encrypted"):
        unpack_zip("file 1", bytes(archive), LIMITS)


def test_a_corrupt_zip_is_refused():
    with pytest.raises(IngestError, match="file 1 is not a readable zip"):
        collect([("set.zip", b"PK\x03\x04 and then garbage")], "zq", None, LIMITS)


def test_an_empty_zip_says_no_images_were_found():
    with pytest.raises(IngestError, match="no images found"):
        collect([("set.zip", make_zip({}))], "zq", None, LIMITS)


def test_macos_metadata_in_a_zip_is_skipped():
    archive = make_zip({"a.png": png(), "__MACOSX/._a.png": b"\x00\x05\x16\x07", ".DS_Store": b"Bud1"})
    assert [e.name for e in collect([("set.zip", archive)], "zq", None, LIMITS)] == ["a.png"]


# ----------------------------------------------------------------------------------------------- captions


def test_captions_come_from_a_jsonl_file_and_carry_the_trigger():
    captions = "\n".join(json.dumps(r) for r in [
        {"file_name": "a.png", "text": "zq drummer, top view"},
        {"file": "imgs/b.png", "caption": "a violinist"},
    ])
    archive = make_zip({"a.png": png(), "imgs/b.png": png(), "c.png": png(), "captions.jsonl": captions.encode()})
    examples = {e.name: e.caption for e in collect([("set.zip", archive)], "zq", None, LIMITS)}
    assert examples == {"a.png": "zq drummer, top view", "imgs/b.png": "zq, a violinist", "c.png": "a zq picture"}


def test_captions_come_from_a_csv_file():
    archive = make_zip({"a.png": png(), "captions.csv": b"file_name,text\na.png,\"a zq cellist, close-up\"\n"})
    (example,) = collect([("set.zip", archive)], "zq", None, LIMITS)
    assert example.caption == "a zq cellist, close-up"


@pytest.mark.parametrize(
    "name, body, reason",
    [
        ("captions.jsonl", b'{"file_name": "nope.png", "text": "x"}',
         "line 1 of the captions file names a file that is not in the zip"),
        ("captions.jsonl", b"{not json", "line 1 of the captions file is not JSON"),
        ("captions.jsonl", b'["a.png", "x"]', "line 1 of the captions file is not a JSON object"),
        ("captions.csv", b"name,words\na.png,x\n", "line 2 of the captions file needs a file_name"),
        ("captions.jsonl", json.dumps({"file_name": "a.png", "text": "x" * 600}).encode(), "600 characters"),
        ("captions.jsonl", b"\xff\xfe\x00bad", "not UTF-8"),
    ],
)
def test_bad_captions_files_are_refused_with_the_line(name, body, reason):
    archive = make_zip({"a.png": png(), name: body})
    with pytest.raises(IngestError, match=reason):
        collect([("set.zip", archive)], "zq", None, LIMITS)


def test_without_a_captions_file_the_template_uses_the_trigger_and_the_command_caption():
    (plain,) = collect([("a.png", png())], "zq", None, LIMITS)
    (given,) = collect([("a.png", png())], "zq", "a drummer, top view", LIMITS)
    assert (plain.caption, given.caption) == ("a zq picture", "zq, a drummer, top view")


def test_the_dataset_hash_depends_on_content_not_order():
    a = collect([("a.png", png(color=(1, 2, 3))), ("b.png", png())], "zq", None, LIMITS)
    b = collect([("b.png", png()), ("a.png", png(color=(1, 2, 3)))], "zq", None, LIMITS)
    c = collect([("a.png", png(color=(1, 2, 3))), ("b.png", png())], "other", None, LIMITS)
    assert ingest.dataset_sha256(a) == ingest.dataset_sha256(b) != ingest.dataset_sha256(c)
