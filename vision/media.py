"""Images from `data:` URLs, local files and http(s) URLs, with the limits a server needs.

    loader = MediaLoader(MediaConfig(allowed_media_dir="/srv/images"))
    image = loader.load("https://example.com/cat.png")      # PIL.Image in RGB

Rules (each refusal is a MediaError whose message says why):
  * `data:image/...;base64,...`: decoded in memory.
  * `file://` URLs and plain paths: only inside `allowed_media_dir` (after resolving symlinks
    and `..`); refused everywhere when it is not set.
  * `http(s)://`: connect and read timeouts; every address the host resolves to must be public
    (private, loopback, link-local, multicast, reserved and unspecified addresses are refused
    unless `allow_private`); redirects are followed by hand, each hop checked the same way.
  * At most `max_bytes` bytes are read (the body is streamed and cut off) and at most
    `max_pixels` pixels decoded (checked on the header, before decoding).

The address check resolves the name before httpx connects, so a DNS answer that changes in
between (rebinding) is not caught; a deployment that must stop that needs an egress proxy.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image, UnidentifiedImageError


class MediaError(ValueError):
    """An image that cannot be used; the message names the reason (for a 400)."""


@dataclass(frozen=True)
class MediaConfig:
    allowed_media_dir: str | None = None  # local files are refused when None
    allow_private: bool = False  # http(s) to private/loopback/link-local addresses
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    max_bytes: int = 20 * 2**20
    max_pixels: int = 6000 * 6000
    max_redirects: int = 5

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "read_timeout", "max_bytes", "max_pixels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be > 0")
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects={self.max_redirects!r} is invalid: must be >= 0")


class MediaLoader:
    """Thread-safe; the server calls `load` on worker threads (decoding is CPU work)."""

    def __init__(self, config: MediaConfig | None = None) -> None:
        self.config = config or MediaConfig()
        self._root = Path(self.config.allowed_media_dir).resolve() if self.config.allowed_media_dir else None

    def load(self, url: str) -> Image.Image:
        """A URL (data:, file:, http:, https:) or a local path -> an RGB PIL image."""
        if not isinstance(url, str) or not url:
            raise MediaError("the image URL is empty")
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return self.decode(_data_url_bytes(url, self.config.max_bytes))
        if scheme in ("http", "https"):
            return self.decode(self._fetch(url))
        if scheme == "file":
            return self.decode(self._read_file(urllib.parse.unquote(urllib.parse.urlparse(url).path)))
        if scheme and len(scheme) > 1:  # (one letter: a Windows drive, i.e. a path)
            raise MediaError(f"URL scheme {scheme!r} is not supported: use data:, file:, http: or https:")
        return self.decode(self._read_file(url))

    def decode(self, data: bytes) -> Image.Image:
        """Bytes -> RGB image, refusing more than max_pixels before anything is decoded."""
        if len(data) > self.config.max_bytes:
            raise MediaError(f"the image is {len(data)} bytes, over the limit of {self.config.max_bytes}")
        try:
            image = Image.open(io.BytesIO(data))  # reads the header only
            w, h = image.size
            if w * h > self.config.max_pixels:
                raise MediaError(f"the image is {w}x{h} = {w * h} pixels, over the limit of {self.config.max_pixels}")
            image.load()
        except MediaError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise MediaError(f"the image cannot be decoded: {e}") from None
        return image if image.mode == "RGB" else image.convert("RGB")

    # -- local files ---------------------------------------------------------------------------
    def _read_file(self, path: str) -> bytes:
        if self._root is None:
            raise MediaError("local image files are not allowed: the server was started without --allowed-media-dir")
        p = Path(path).resolve()
        if not p.is_relative_to(self._root):
            raise MediaError(f"local image {path!r} is outside the allowed media directory {str(self._root)!r}")
        if not p.is_file():
            raise MediaError(f"local image {path!r} does not exist")
        size = p.stat().st_size
        if size > self.config.max_bytes:
            raise MediaError(f"the image is {size} bytes, over the limit of {self.config.max_bytes}")
        return p.read_bytes()

    # -- http(s) -------------------------------------------------------------------------------
    def _fetch(self, url: str) -> bytes:
        c = self.config
        timeout = httpx.Timeout(c.read_timeout, connect=c.connect_timeout)
        with httpx.Client(timeout=timeout, follow_redirects=False) as client:
            for _ in range(c.max_redirects + 1):
                self._check_host(url)
                try:
                    with client.stream("GET", url) as r:
                        if r.is_redirect:
                            url = str(r.url.join(r.headers.get("location", "")))
                            continue
                        if r.status_code != 200:
                            raise MediaError(f"fetching the image returned HTTP {r.status_code}")
                        return self._read_body(r)
                except httpx.TimeoutException:
                    raise MediaError(f"fetching the image timed out (connect {c.connect_timeout}s, "
                                     f"read {c.read_timeout}s)") from None
                except httpx.HTTPError as e:
                    raise MediaError(f"fetching the image failed: {e}") from None
        raise MediaError(f"fetching the image took more than {c.max_redirects} redirects")

    def _read_body(self, r: httpx.Response) -> bytes:
        limit = self.config.max_bytes
        declared = r.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise MediaError(f"the image is {declared} bytes, over the limit of {limit}")
        body = bytearray()
        for chunk in r.iter_bytes():
            body += chunk
            if len(body) > limit:
                raise MediaError(f"the image is over the limit of {limit} bytes")
        return bytes(body)

    def _check_host(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise MediaError(f"redirect to {url!r} is not an http(s) URL")
        if self.config.allow_private:
            return
        try:
            infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError) as e:
            raise MediaError(f"the image host {parts.hostname!r} cannot be resolved: {e}") from None
        for info in infos:
            addr = ipaddress.ip_address(info[4][0].split("%", 1)[0])
            if addr.version == 6 and addr.ipv4_mapped is not None:  # ::ffff:127.0.0.1 is loopback too
                addr = addr.ipv4_mapped
            if _refused(addr):
                raise MediaError(f"the image host {parts.hostname!r} resolves to the non-public address {addr}, "
                                 "which is refused (start the server with --allow-private-media to allow it)")


def _refused(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Private, loopback, link-local, reserved, unspecified, shared (CGNAT) and multicast."""
    return not addr.is_global or addr.is_multicast


def _data_url_bytes(url: str, max_bytes: int) -> bytes:
    """`data:[<mime>][;base64],<payload>`: only base64 image payloads are images."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise MediaError("the data URL has no ',' before its payload")
    meta = header[5:].split(";")
    if meta[0] and not meta[0].lower().startswith("image/"):
        raise MediaError(f"the data URL's media type {meta[0]!r} is not an image type")
    if "base64" not in (m.lower() for m in meta[1:]):
        raise MediaError("the data URL is not base64-encoded (expected ';base64,')")
    if len(payload) // 4 * 3 > max_bytes:  # (before decoding it)
        raise MediaError(f"the image is about {len(payload) // 4 * 3} bytes, over the limit of {max_bytes}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("the data URL's base64 payload is invalid") from None
