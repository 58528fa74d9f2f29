"""A request's images: ``image_url`` values (``data:`` URIs, or remote URLs when enabled) -> RGB PIL images, within
``Limits``.

Every failure is a 400 ``APIError`` whose message names the request field (``param``) and the problem, with a
``code`` naming the rule; no Pillow, socket or SSL message reaches the client. Checks run in this order, each
before the work it guards (RELIABILITY.md S4-S7, S9, D4):

1. The URL scheme: ``data:`` always; ``http(s)://`` only with ``Limits.remote_urls``; anything else refused.
2. The encoded size: a base64 payload's length before it is decoded; a remote body's Content-Length, then its
   running byte count while it streams in.
3. The format, from the magic bytes (never the MIME type or a file name), against ``Limits.allowed_formats``:
   the decoder of any other format is never invoked (S5).
4. Width x height, from the header (``Image.open`` is lazy), against ``max_image_pixels`` and ``min_image_side``,
   and for ``load_images`` the request's total against ``max_request_pixels``, all before any pixel data is
   decoded (S6). Pillow's decompression-bomb warning counts as an error too (a second guard: the size check
   does not rely on it, as warning filters are process-wide and threads may race on them).
5. Decoding, by ``vlmlab.processing.image.load_image``: the path training uses (D5), so the first frame of an
   animation, EXIF orientation, and RGB with alpha composited on white; truncated or corrupt data is an error.

Remote fetching (S9) takes an allowlisted host, resolves it once, refuses it if any of its addresses is not
public (loopback, private, link-local, shared, reserved, multicast, and IPv4 inside IPv6), then connects to
an address it checked (no second lookup that DNS rebinding could answer differently); TLS is verified against
the host name. It sends one GET with ``http.client`` (which reads no proxy settings), follows no redirects,
stops reading at ``max_image_bytes``, and gives up at ``fetch_timeout_s`` for the whole fetch, however slowly
the server trickles bytes. DNS resolution itself is bounded by the system resolver's own timeout.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import io
import ipaddress
import re
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Sequence
from urllib.parse import urlsplit

from PIL import Image

from vlmlab.errors import ImageError
from vlmlab.processing import image as image_decoding
from vlmlab.serving.errors import APIError, invalid_request, quote, too_many_images
from vlmlab.serving.limits import Limits
from vlmlab.serving.protocol import ImageRef

# Signatures of the formats vlmlab can decode (WEBP: "RIFF", 4 size bytes, "WEBP", checked apart).
MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
READ_CHUNK = 64 * 1024  # bytes read from a remote body at a time: the cap is overshot by this at most
_URL_UNSAFE = re.compile(r"[\x00-\x20\x7f]")  # what http.client refuses in a request target
# A host as urlsplit gives it (lowercased, IPv6 without brackets): ASCII letters, digits, "-", "_", ".", ":" only;
# non-ASCII names must come IDNA-encoded, and "\\" or "%" never reach DNS or the Host header.
_HOST = re.compile(r"[a-z0-9_.:-]+")


def load_image(url: str, limits: Limits, param: str) -> Image.Image:
    """One ``image_url`` -> a new RGB image, every check of the module applied.

    ``param`` is the request field the URL came from (``"messages[0].content[1].image_url.url"``); errors name
    it. Raises ``APIError`` 400 with code ``invalid_image_url`` (bad URI, bad base64, empty, other scheme),
    ``remote_urls_disabled``, ``image_domain_not_allowed``, ``image_address_not_allowed``,
    ``image_fetch_failed`` (network failure, timeout, non-200 status, redirect), ``image_too_large`` (bytes or
    pixels), ``image_too_small``, ``unsupported_image_format`` or ``invalid_image`` (truncated or corrupt).
    Blocking (network and decoding): call it from a worker thread, not the event loop."""
    data = read_image_url(url, limits, param)
    probe_image(data, limits, param)
    return decode_image(data, limits, param)


def load_images(images: Sequence[ImageRef], limits: Limits) -> list[Image.Image]:
    """All images of a request (``protocol.to_chat(...).images``), in order.

    The count is checked before anything is read, and every image's header and the request's total pixels
    before any image is decoded. Raises ``APIError`` as ``load_image`` and ``check_request_images`` do."""
    if len(images) > limits.max_images_per_request:
        raise too_many_images(images[limits.max_images_per_request].param, limits.max_images_per_request)
    data = [read_image_url(ref.url, limits, ref.param) for ref in images]
    sizes = [probe_image(d, limits, ref.param) for d, ref in zip(data, images)]
    check_request_images(sizes, limits)
    return [decode_image(d, limits, ref.param) for d, ref in zip(data, images)]


def check_request_images(images: Sequence[Image.Image | tuple[int, int]], limits: Limits) -> None:
    """The per-request limits over images (PIL images or ``(width, height)`` sizes): raises ``APIError`` 400
    ``too_many_images`` over ``max_images_per_request`` and ``too_many_pixels`` over ``max_request_pixels``."""
    if len(images) > limits.max_images_per_request:
        raise too_many_images("messages", limits.max_images_per_request)
    sizes = [im.size if isinstance(im, Image.Image) else im for im in images]
    total = sum(w * h for w, h in sizes)
    if total > limits.max_request_pixels:
        raise invalid_request(
            f"messages: the images hold {total} pixels together, over the limit of {limits.max_request_pixels}",
            "messages",
            "too_many_pixels",
        )


def sniff_format(data: bytes) -> str | None:
    """The Pillow format name the magic bytes of ``data`` announce, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in MAGIC if data.startswith(magic)), None)


def probe_image(data: bytes, limits: Limits, param: str) -> tuple[int, int]:
    """``(width, height)`` of encoded image bytes, from the header alone (no pixel is decoded), with the format
    and the size checked.

    Raises ``APIError`` 400 ``unsupported_image_format``, ``image_too_large``, ``image_too_small`` or
    ``invalid_image``."""
    fmt = sniff_format(data)
    if fmt not in limits.allowed_formats:
        raise invalid_request(
            f"{param}: not an image of an accepted format ({', '.join(limits.allowed_formats)}; recognised "
            "by content, not by MIME type)",
            param,
            "unsupported_image_format",
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # local: global filters untouched
        try:
            with Image.open(io.BytesIO(data), formats=(fmt,)) as image:
                width, height = image.size
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            # Pillow refused the header's size before we saw it: far over any sensible limit. Its message
            # holds the pixel count the header claims ("Image size (N pixels) exceeds ...").
            claimed = re.search(r"\((\d+) pixels\)", str(e))
            raise _too_many_pixels(param, int(claimed.group(1)) if claimed else None, limits) from None
        except Exception:  # whatever an allowed plugin raises on a damaged header
            raise _corrupt(param) from None
    if width * height > limits.max_image_pixels:
        raise _too_many_pixels(param, (width, height), limits)
    if min(width, height) < limits.min_image_side:
        raise invalid_request(
            f"{param}: image is {width} x {height} pixels, under the minimum side of {limits.min_image_side}",
            param,
            "image_too_small",
        )
    return width, height


def decode_image(data: bytes, limits: Limits, param: str) -> Image.Image:
    """Encoded bytes that passed ``probe_image`` -> RGB (raises ``APIError`` 400 ``invalid_image``)."""
    try:
        return image_decoding.load_image(data, max_pixels=limits.max_image_pixels, name=param)
    except ImageError:
        raise _corrupt(param) from None


def read_image_url(url: str, limits: Limits, param: str) -> bytes:
    """The encoded bytes an ``image_url`` points at: a ``data:`` URI's payload, or a remote body.

    Raises ``APIError`` 400 as ``load_image`` does for URLs, fetching and byte size."""
    scheme, colon, _ = url.partition(":")
    scheme = scheme.lower() if colon else ""
    if scheme == "data":
        return _data_uri_bytes(url, limits, param)
    if scheme in ("http", "https"):
        if not limits.remote_urls:
            raise invalid_request(
                f"{param}: remote image URLs are disabled on this server; send the image as a data: URI",
                param,
                "remote_urls_disabled",
            )
        return _fetch(url, limits, param)
    what = f"unsupported URL scheme {quote(scheme)}" if scheme else "not a data: URI"
    raise _bad_url(param, f"{what}; send the image as a data:image/...;base64 URI")


# -- data: URIs ----------------------------------------------------------------------------------------------
def _data_uri_bytes(url: str, limits: Limits, param: str) -> bytes:
    """``data:[<media type>][;...];base64,<payload>`` -> the decoded payload. The media type is ignored: the
    format is read from the bytes."""
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise _bad_url(param, "data URI has no ',' before its data")
    if header.rsplit(";", 1)[-1].strip().lower() != "base64":
        raise _bad_url(param, "data URI must be base64-encoded (data:image/png;base64,...)")
    if any(c in payload for c in " \t\r\n"):
        payload = "".join(payload.split())  # line-wrapped (MIME) base64
    if not payload:
        raise _bad_url(param, "data URI holds no data")
    if len(payload) // 4 * 3 - 2 > limits.max_image_bytes:  # the decoded size, give or take the padding
        raise _too_many_bytes(param, limits)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):  # bad characters or padding; non-ASCII text
        raise _bad_url(param, "data URI payload is not valid base64") from None
    if len(data) > limits.max_image_bytes:
        raise _too_many_bytes(param, limits)
    return data


# -- remote URLs ---------------------------------------------------------------------------------------------
def _fetch(url: str, limits: Limits, param: str) -> bytes:
    https, host, port, target = _split_url(url, limits, param)
    addresses = _resolve(host, port, limits, param)

    sockets: list[socket.socket] = []  # the live sockets, for the watchdog
    timed_out = threading.Event()

    def abort() -> None:  # unblocks a read in progress, however slowly the server sends
        timed_out.set()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(limits.fetch_timeout_s, abort)
    watchdog.daemon = True
    watchdog.start()
    try:
        sock = _connect(addresses, time.monotonic() + limits.fetch_timeout_s, sockets)
        if https:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            sockets.append(sock)
        body = _get(sock, host, port, https, target, limits, param)
    except APIError:
        raise
    except Exception as err:  # OSError (socket, TLS), http.client.HTTPException, ...
        raise _fetch_failed(param, host, "timed out" if timed_out.is_set() else _reason(err)) from None
    finally:
        watchdog.cancel()
        for s in sockets:
            s.close()
    if timed_out.is_set():  # the shutdown can end a body without a length as if it were complete
        raise _fetch_failed(param, host, "timed out")
    return body


def _split_url(url: str, limits: Limits, param: str) -> tuple[bool, str, int, str]:
    """``(https, host, port, request target)`` of an allowlisted ``http(s)://`` URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a bad port or IPv6 literal
        raise _bad_url(param, "malformed URL") from None
    host = parts.hostname
    if not host:
        raise _bad_url(param, "URL has no host")
    if parts.username is not None or parts.password is not None:
        raise _bad_url(param, "credentials in image URLs are not accepted")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not _HOST.fullmatch(host) or _URL_UNSAFE.search(target):
        raise _bad_url(
            param, "URL has spaces or control characters, or a host that is not a plain name or IP"
        )
    if not limits.host_allowed(host):
        raise invalid_request(
            f"{param}: host {quote(host)} is not one of the allowed image domains",
            param,
            "image_domain_not_allowed",
        )
    https = parts.scheme.lower() == "https"
    return https, host, port or _default_port(https), target


def _default_port(https: bool) -> int:
    return 443 if https else 80


def _get(
    sock: socket.socket, host: str, port: int, https: bool, target: str, limits: Limits, param: str
) -> bytes:
    """One GET over the connected ``sock``: the body of a 200, at most ``max_image_bytes`` of it."""
    conn = http.client.HTTPConnection(host, port)
    conn.sock = sock  # already connected, to the address that was checked: http.client never resolves
    host_header = f"[{host}]" if ":" in host else host
    if port != _default_port(https):
        host_header += f":{port}"
    headers = {
        "Host": host_header,
        "Accept-Encoding": "identity",
        "Connection": "close",
        "User-Agent": "vlmlab",
    }
    conn.request("GET", target, headers=headers)
    response = conn.getresponse()
    if 300 <= response.status < 400:
        raise _fetch_failed(param, host, f"redirect (HTTP {response.status}) not followed")
    if response.status != 200:
        raise _fetch_failed(param, host, f"HTTP status {response.status}")
    length = response.getheader("Content-Length", "")
    if length.isdigit() and int(length) > limits.max_image_bytes:
        raise _too_many_bytes(param, limits)
    body, size = [], 0
    while chunk := response.read(READ_CHUNK):
        size += len(chunk)
        if size > limits.max_image_bytes:
            raise _too_many_bytes(param, limits)
        body.append(chunk)
    return b"".join(body)


def _resolve(host: str, port: int, limits: Limits, param: str) -> list[tuple]:
    """The ``(family, sockaddr)`` of every address of ``host``; all must be public unless
    ``allow_private_addresses``."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):  # socket.gaierror, an over-long label, ...
        raise _fetch_failed(param, host, "its name could not be resolved") from None
    addresses = list(dict.fromkeys((family, sockaddr) for family, _, _, _, sockaddr in infos))
    if not limits.allow_private_addresses:
        for _, sockaddr in addresses:
            if not is_public_address(sockaddr[0]):
                raise invalid_request(
                    f"{param}: host {quote(host)} resolves to a private or reserved address",
                    param,
                    "image_address_not_allowed",
                )
    return addresses


def is_public_address(address: str) -> bool:
    """Whether an IP address is globally routable unicast (IPv4 embedded in IPv6 judged by its IPv4 part)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # without an IPv6 zone ("fe80::1%eth0")
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and not is_public_address(str(embedded)):
            return False
    return ip.is_global and not ip.is_multicast


def _connect(addresses: list[tuple], deadline: float, sockets: list[socket.socket]) -> socket.socket:
    """A TCP connection to the first of ``addresses`` that answers before ``deadline``."""
    error: Exception = ConnectionError("no address")
    for family, sockaddr in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sockets.append(sock)
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            error = err
    raise error


def _reason(err: Exception) -> str:
    """A fixed phrase for a network failure: never the exception's own text."""
    if isinstance(err, TimeoutError):
        return "timed out"
    if isinstance(err, ssl.SSLCertVerificationError):
        return "TLS certificate not valid for the host"
    if isinstance(err, ssl.SSLError):
        return "TLS error"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, http.client.HTTPException):
        return "invalid HTTP response"
    return "connection failed"


# -- errors --------------------------------------------------------------------------------------------------
def _bad_url(param: str, problem: str) -> APIError:
    return invalid_request(f"{param}: {problem}", param, "invalid_image_url")


def _fetch_failed(param: str, host: str, reason: str) -> APIError:
    return invalid_request(
        f"{param}: could not fetch the image from {quote(host)} ({reason})", param, "image_fetch_failed"
    )


def _too_many_bytes(param: str, limits: Limits) -> APIError:
    return invalid_request(
        f"{param}: image data is over the limit of {limits.max_image_bytes} bytes", param, "image_too_large"
    )


def _too_many_pixels(param: str, size: tuple[int, int] | int | None, limits: Limits) -> APIError:
    if isinstance(size, tuple):
        what = f"{size[0]} x {size[1]} pixels"
    else:
        what = f"{size} pixels" if size else "too many pixels"
    return invalid_request(
        f"{param}: image is {what}, over the limit of {limits.max_image_pixels} pixels",
        param,
        "image_too_large",
    )


def _corrupt(param: str) -> APIError:
    return invalid_request(f"{param}: truncated or corrupt image data", param, "invalid_image")
