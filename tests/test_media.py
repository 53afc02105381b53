"""vision.media: data URLs, allowed local files, http(s) with address checks on every hop, limits."""

from __future__ import annotations

import base64
import io
import ipaddress
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

import vision.media as media
from vision.media import MediaConfig, MediaError, MediaLoader


def png_bytes(w: int, h: int, mode: str = "RGB", seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = torch.randint(0, 256, (h, w, channels), generator=g, dtype=torch.uint8).squeeze(-1).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def test_data_url_decodes_to_rgb_with_its_pixels():
    raw = png_bytes(13, 7, "RGBA", seed=1)
    img = MediaLoader().load(data_url(raw))
    assert img.mode == "RGB" and img.size == (13, 7)
    assert img.tobytes() == Image.open(io.BytesIO(raw)).convert("RGB").tobytes()


@pytest.mark.parametrize("url, reason", [
    ("data:image/png;base64,@@@@", "base64 payload is invalid"),
    ("data:text/plain;base64,aGVsbG8=", "not an image type"),
    ("data:image/png,rawbytes", "not base64-encoded"),
    ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), "cannot be decoded"),
    ("ftp://example.com/a.png", "scheme 'ftp' is not supported"),
    ("", "empty"),
])
def test_bad_data_urls_and_schemes_say_why(url, reason):
    with pytest.raises(MediaError, match=reason):
        MediaLoader().load(url)


def test_byte_and_pixel_limits():
    raw = png_bytes(40, 30)
    with pytest.raises(MediaError, match=r"over the limit of 100"):
        MediaLoader(MediaConfig(max_bytes=100)).load(data_url(raw))
    with pytest.raises(MediaError, match=r"40x30 = 1200 pixels, over the limit of 1000"):
        MediaLoader(MediaConfig(max_pixels=1000)).load(data_url(raw))
    assert MediaLoader(MediaConfig(max_pixels=1200)).load(data_url(raw)).size == (40, 30)


def test_local_files_only_inside_the_allowed_dir(tmp_path):
    inside, outside = tmp_path / "media", tmp_path / "secret"
    inside.mkdir(), outside.mkdir()
    (inside / "a.png").write_bytes(png_bytes(5, 6))
    (outside / "b.png").write_bytes(png_bytes(5, 6))
    (inside / "link.png").symlink_to(outside / "b.png")
    with pytest.raises(MediaError, match="--allowed-media-dir"):
        MediaLoader().load(str(inside / "a.png"))
    loader = MediaLoader(MediaConfig(allowed_media_dir=str(inside)))
    assert loader.load(str(inside / "a.png")).size == (5, 6)
    assert loader.load(f"file://{inside / 'a.png'}").size == (5, 6)
    for bad in (outside / "b.png", inside / ".." / "secret" / "b.png", inside / "link.png"):
        with pytest.raises(MediaError, match="outside the allowed media directory"):
            loader.load(str(bad))
    with pytest.raises(MediaError, match="does not exist"):
        loader.load(str(inside / "missing.png"))


@pytest.mark.parametrize("addr", ["127.0.0.1", "::1", "10.1.2.3", "192.168.0.7", "172.16.5.4", "169.254.169.254",
                                  "fe80::1", "fc00::5", "0.0.0.0", "::ffff:127.0.0.1", "224.0.0.1", "100.64.0.1"])
def test_non_public_addresses_are_refused(monkeypatch, addr):
    monkeypatch.setattr(media.socket, "getaddrinfo", lambda *a, **k: [(None, None, None, "", (addr, 80))])
    shown = addr.removeprefix("::ffff:")  # an IPv4-mapped address is named as the IPv4 one
    with pytest.raises(MediaError, match=f"non-public address {shown}"):
        MediaLoader().load("http://images.example/a.png")


class _Handler(BaseHTTPRequestHandler):
    image = png_bytes(9, 4, seed=3)
    release = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        routes = {
            "/img.png": lambda: self._send(200, self.image),
            "/to-img": lambda: self._redirect("/img.png"),
            "/to-private": lambda: self._redirect("http://10.0.0.1/img.png"),
            "/loop": lambda: self._redirect("/loop"),
            "/missing": lambda: self._send(404, b"no"),
            "/big": self._big,
            "/stall": self._stall,
        }
        routes.get(self.path, lambda: self._send(404, b"no"))()

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, where: str) -> None:
        self.send_response(302)
        self.send_header("Location", where)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _big(self) -> None:  # no Content-Length: the reader must cut the body off itself
        self.send_response(200)
        self.end_headers()
        for _ in range(64):
            self.wfile.write(b"x" * 4096)

    def _stall(self) -> None:  # headers never come until the test ends: a read timeout by construction
        self.release.wait(30)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    _Handler.release.set()
    server.shutdown()


def test_http_fetch_is_refused_for_loopback_unless_allowed(image_server):
    with pytest.raises(MediaError, match="non-public address 127.0.0.1.*--allow-private-media"):
        MediaLoader().load(f"{image_server}/img.png")
    img = MediaLoader(MediaConfig(allow_private=True)).load(f"{image_server}/img.png")
    assert img.tobytes() == Image.open(io.BytesIO(_Handler.image)).convert("RGB").tobytes()


def test_every_redirect_hop_is_checked(image_server, monkeypatch):
    # Treat this test's loopback server as public, so only the redirect's target decides.
    monkeypatch.setattr(media, "_refused", lambda addr: addr in ipaddress.ip_network("10.0.0.0/8"))
    loader = MediaLoader()
    assert loader.load(f"{image_server}/to-img").size == (9, 4)
    with pytest.raises(MediaError, match="non-public address 10.0.0.1"):
        loader.load(f"{image_server}/to-private")
    with pytest.raises(MediaError, match="more than 5 redirects"):
        loader.load(f"{image_server}/loop")


def test_http_errors_limits_and_timeouts(image_server):
    loader = MediaLoader(MediaConfig(allow_private=True, max_bytes=50_000, read_timeout=0.3))
    with pytest.raises(MediaError, match="HTTP 404"):
        loader.load(f"{image_server}/missing")
    with pytest.raises(MediaError, match="over the limit of 50000 bytes"):
        loader.load(f"{image_server}/big")
    with pytest.raises(MediaError, match="timed out"):
        loader.load(f"{image_server}/stall")
