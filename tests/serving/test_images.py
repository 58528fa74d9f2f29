"""Tests of vlmlab.serving.images (RELIABILITY.md S4-S7, S9): every bad image or URL is a 400 with its code and
param, before the work it guards; remote fetching against a local server on 127.0.0.1."""

from __future__ import annotations

import base64
import dataclasses
import re
import shutil
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin

from test_image import encode, noise, png_header_only  # tests/ is on sys.path, as for `from conftest import`
from vlmlab.errors import ConfigError
from vlmlab.serving.errors import APIError
from vlmlab.serving.images import (
    check_request_images,
    is_public_address,
    load_image,
    load_images,
    probe_image,
    sniff_format,
)
from vlmlab.serving.limits import Limits
from vlmlab.serving.protocol import ImageRef

LIMITS = Limits()
PARAM = "messages[0].content[1].image_url.url"
LEAKS = re.compile(r"Traceback|0x[0-9a-fA-F]{8,}|(/[\w.-]+){2,}|Errno|PIL|\.py\b")


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def refused(url: str, limits: Limits = LIMITS, param: str = PARAM) -> APIError:
    with pytest.raises(APIError) as info:
        load_image(url, limits, param)
    err = info.value
    message = err.body()["error"]["message"]
    assert err.status == 400 and err.type == "invalid_request_error" and err.param == param
    assert message.startswith(f"{param}: ") and "\n" not in message and not LEAKS.search(message), message
    return err


# -- data: URIs ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_allowed_formats_load_as_rgb(fmt):
    image = noise()
    out = load_image(data_uri(encode(image, fmt), f"image/{fmt.lower()}"), LIMITS, PARAM)
    assert out.mode == "RGB" and out.size == image.size
    if fmt == "PNG":  # lossless
        assert np.array_equal(np.asarray(out), np.asarray(image))


def test_one_pixel_and_alpha_images():
    assert load_image(data_uri(encode(Image.new("L", (1, 1), 7), "PNG")), LIMITS, PARAM).size == (1, 1)
    rgba = Image.new("RGBA", (3, 2), (255, 0, 0, 0))  # fully transparent red: white after compositing
    assert load_image(data_uri(encode(rgba, "PNG")), LIMITS, PARAM).getpixel((0, 0)) == (255, 255, 255)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert load_image(data_uri(gif, "image/gif"), LIMITS, PARAM).getpixel((4, 4)) == (255, 0, 0)


def test_format_comes_from_the_bytes_not_the_mime_type():
    png = encode(noise(), "PNG")
    for mime in ("image/jpeg", "text/html", "application/octet-stream", ""):
        assert load_image(data_uri(png, mime), LIMITS, PARAM).size == (64, 48)
    assert sniff_format(png) == "PNG" and sniff_format(b"RIFF\0\0\0\0WEBPVP8 ") == "WEBP"
    err = refused(data_uri(b"<html><body>hi</body></html>", "image/png"))
    assert err.code == "unsupported_image_format"


@pytest.mark.parametrize(
    "data",
    [
        encode(noise(), "TIFF"),
        encode(noise(), "BMP"),  # a format vlmlab decodes, but not one these limits allow
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj <<>> endobj",
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        b"\x00\x00\x00\x0cjP  \r\n\x87\n",  # JPEG 2000
        b"SIMPLE  =                    T",  # FITS
        b"\x00\x00\x01\x00\x01\x00\x10\x10",  # ICO
        b"\x00",
        np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
    ],
    ids=["tiff", "bmp", "pdf", "eps", "svg", "jp2", "fits", "ico", "one-byte", "random"],
)
def test_disallowed_or_unknown_formats_are_refused_without_their_decoder(data, monkeypatch):
    calls = []
    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "_open", lambda self: calls.append(1))
    err = refused(data_uri(data, "image/png"))
    assert err.code == "unsupported_image_format" and not calls


def test_allowed_formats_are_configurable():
    bmp = data_uri(encode(noise(), "BMP"), "image/bmp")
    assert load_image(bmp, Limits(allowed_formats=("PNG", "BMP")), PARAM).size == (64, 48)
    assert refused(data_uri(encode(noise(), "JPEG")), Limits(allowed_formats=("PNG",))).code == (
        "unsupported_image_format"
    )
    with pytest.raises(ConfigError, match="allowed_formats"):
        Limits(allowed_formats=("PNG", "TIFF"))


@pytest.mark.parametrize(
    "url, problem",
    [
        ("data:image/png;base64", "no ','"),
        ("data:image/png,rawbytes", "base64-encoded"),
        ("data:image/png;base64,", "no data"),
        ("data:image/png;base64,iVBORw0KGgo", "not valid base64"),  # bad padding
        ("data:image/png;base64,iVBO@@@@", "not valid base64"),
        ("data:image/png;base64,A", "not valid base64"),
        ("data:image/png;base64,ïïïï", "not valid base64"),
        ("", "not a data: URI"),
        ("iVBORw0KGgoAAAANSUhEUg==", "not a data: URI"),
        ("file:///etc/passwd", "unsupported URL scheme 'file'"),
        ("ftp://example.com/a.png", "unsupported URL scheme 'ftp'"),
        ("gopher://127.0.0.1:70/_x", "unsupported URL scheme 'gopher'"),
        ("javascript:alert(1)", "unsupported URL scheme 'javascript'"),
    ],
)
def test_malformed_or_unsupported_urls(url, problem):
    err = refused(url)
    assert err.code == "invalid_image_url" and problem in err.message


def test_line_wrapped_base64_is_accepted():
    b64 = base64.encodebytes(encode(noise(), "PNG")).decode()  # 76-column lines
    assert "\n" in b64 and load_image("data:image/png;base64," + b64, LIMITS, PARAM).size == (64, 48)


@pytest.mark.parametrize(
    "data",
    [encode(noise(), "PNG")[:-40], encode(noise(), "JPEG")[:200], encode(noise(), "PNG")[:20], b"GIF89a\x01"],
    ids=["png-cut-in-data", "jpeg-cut", "png-cut-in-header", "gif-header-only"],
)
def test_truncated_images_are_invalid_image(data):
    assert refused(data_uri(data)).code == "invalid_image"


def test_a_lying_png_header_is_refused_before_decoding_and_quickly():
    for side in (100_000, 5000):  # over Pillow's own bomb limit, and only over ours
        data = png_header_only(side, side)
        start = time.perf_counter()
        err = refused(data_uri(data))
        assert time.perf_counter() - start < 0.1
        assert err.code == "image_too_large"
    assert "5000 x 5000" in err.message


def test_byte_and_size_limits():
    png = encode(noise(), "PNG")
    assert refused(data_uri(png), Limits(max_image_bytes=len(png) - 1)).code == "image_too_large"
    assert (
        refused(data_uri(png * 10), Limits(max_image_bytes=len(png))).code == "image_too_large"
    )  # pre-decode
    assert load_image(data_uri(png), Limits(max_image_bytes=len(png)), PARAM).size == (64, 48)
    assert refused(data_uri(png), Limits(max_image_pixels=64 * 48 - 1)).code == "image_too_large"
    small = refused(data_uri(encode(Image.new("RGB", (1, 5)), "PNG")), Limits(min_image_side=2))
    assert small.code == "image_too_small" and "1 x 5" in small.message


def test_remote_urls_are_off_by_default():
    for url in ("http://example.com/a.png", "HTTPS://example.com/a.png", "http://169.254.169.254/latest/"):
        err = refused(url)
        assert err.code == "remote_urls_disabled" and "example" not in err.message


# -- whole requests --------------------------------------------------------------------------------------------
def refs(*urls: str) -> list[ImageRef]:
    return [ImageRef(u, f"messages[0].content[{i}].image_url.url") for i, u in enumerate(urls)]


def test_load_images_keeps_order_and_checks_the_count_before_reading():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    urls = [data_uri(encode(Image.new("RGB", (4, 4), c), "PNG")) for c in colours]
    assert [im.getpixel((0, 0)) for im in load_images(refs(*urls), LIMITS)] == colours
    with pytest.raises(APIError) as info:
        load_images(refs(*["not a url"] * 3), Limits(max_images_per_request=2))  # never read
    assert (info.value.code, info.value.param) == ("too_many_images", "messages[0].content[2].image_url.url")


def test_request_pixel_total_is_checked_from_headers_before_decoding():
    limits = Limits(max_request_pixels=3000 * 3000, max_image_pixels=3000 * 3000)
    bombs = [data_uri(png_header_only(2000, 2000))] * 3  # each fits, together they do not; none decodes
    start = time.perf_counter()
    with pytest.raises(APIError) as info:
        load_images(refs(*bombs), limits)
    assert info.value.code == "too_many_pixels" and time.perf_counter() - start < 0.2
    check_request_images([(3000, 3000)], limits)
    with pytest.raises(APIError, match="too_many_images|more than 1 images"):
        check_request_images([Image.new("RGB", (1, 1))] * 2, Limits(max_images_per_request=1))
    assert probe_image(png_header_only(7, 9), LIMITS, PARAM) == (7, 9)


# -- remote URLs -----------------------------------------------------------------------------------------------
PNG = encode(noise(), "PNG")


class Handler(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        Handler.hits.append(self.path)
        if self.path == "/img.png":
            self.reply(200, PNG)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/img.png")
            self.end_headers()
        elif self.path == "/big":
            self.reply(200, PNG * 20)
        elif self.path == "/big-no-length":  # HTTP/1.0: the body runs until the connection closes
            self.send_response(200)
            self.end_headers()
            self.wfile.write(PNG * 20)
            self.close_connection = True
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            try:
                for b in PNG:  # one byte every 50 ms: each read succeeds, the whole never arrives in time
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass
        else:
            self.reply(404, b"no")

    def reply(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


LOCAL = Limits(
    remote_urls=True, allowed_domains=("127.0.0.1",), allow_private_addresses=True, fetch_timeout_s=5
)


def test_fetch_from_an_allowlisted_host(server):
    assert np.array_equal(
        np.asarray(load_image(f"http://{server}/img.png", LOCAL, PARAM)), np.asarray(noise())
    )


def test_redirects_are_not_followed(server):
    Handler.hits.clear()
    err = refused(f"http://{server}/redirect", LOCAL)
    assert err.code == "image_fetch_failed" and "redirect" in err.message and "127.0.0.1" in err.message
    assert Handler.hits == ["/redirect"]


@pytest.mark.parametrize("path", ["/big", "/big-no-length"])
def test_a_body_over_the_byte_cap_is_cut_off(server, path):
    limits = dataclasses.replace(LOCAL, max_image_bytes=len(PNG) * 2)
    assert refused(f"http://{server}{path}", limits).code == "image_too_large"


def test_a_server_trickling_bytes_is_cut_off_at_the_deadline(server):
    limits = dataclasses.replace(LOCAL, fetch_timeout_s=0.5)
    start = time.perf_counter()
    err = refused(f"http://{server}/slow", limits)
    assert err.code == "image_fetch_failed" and "timed out" in err.message
    assert time.perf_counter() - start < 1.5


def test_http_errors_and_refused_connections(server):
    err = refused(f"http://{server}/missing.png?token=secret", LOCAL)
    assert (
        err.code == "image_fetch_failed" and "HTTP status 404" in err.message and "secret" not in err.message
    )
    closed = refused("http://127.0.0.1:1/img.png", LOCAL)  # nothing listens on port 1
    assert closed.code == "image_fetch_failed" and "connection refused" in closed.message


def test_hosts_outside_the_allowlist_are_never_contacted(server):
    Handler.hits.clear()
    limits = Limits(remote_urls=True, allowed_domains=("*.example.com",), allow_private_addresses=True)
    err = refused(f"http://{server}/img.png", limits)
    assert err.code == "image_domain_not_allowed"
    assert refused(f"http://user:pw@{server}/img.png", LOCAL).code == "invalid_image_url"
    wildcard = Limits(remote_urls=True, allowed_domains=("*.example.com",))
    assert refused("http://127.0.0.1\\.example.com/img.png", wildcard).code == "invalid_image_url"
    assert Handler.hits == []


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_verifies_the_certificate(tmp_path):
    """TLS verification is on: a self-signed certificate (trusted by no CA) ends the fetch before any request."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    Handler.hits.clear()
    try:
        err = refused(f"https://127.0.0.1:{httpd.server_address[1]}/img.png", LOCAL)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert err.code == "image_fetch_failed" and "TLS certificate not valid" in err.message
    assert Handler.hits == []


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "2130706433", "0177.0.0.1", "[::1]"])
def test_private_addresses_are_refused_unless_allowed(server, host):
    Handler.hits.clear()
    port = server.rsplit(":", 1)[1]
    allowed = host.strip("[]")
    limits = Limits(remote_urls=True, allowed_domains=(allowed,))
    err = refused(f"http://{host}:{port}/img.png", limits)
    assert err.code == "image_address_not_allowed" and "private or reserved" in err.message
    assert Handler.hits == []


@pytest.mark.parametrize(
    "address, public",
    [
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("fe80::1%eth0", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("2002:7f00:1::", False),  # 6to4 around 127.0.0.1
        ("not an ip", False),
        ("93.184.215.14", True),
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("::ffff:8.8.8.8", True),
    ],
)
def test_is_public_address(address, public):
    assert is_public_address(address) is public


def test_limits_configuration():
    with pytest.raises(ConfigError, match="allowed_domains"):
        Limits(remote_urls=True)
    for bad in ("Example.com", "https://example.com", "example.com:443", "a.*.com", ""):
        with pytest.raises(ConfigError, match="allowed_domains"):
            Limits(allowed_domains=(bad,))
    with pytest.raises(ConfigError, match="max_n"):
        Limits(max_n=0)
    limits = Limits(allowed_domains=("*.example.com", "images.test", "::1"))
    assert limits.host_allowed("a.example.com") and limits.host_allowed("b.a.example.com")
    assert not limits.host_allowed("example.com") and not limits.host_allowed("badexample.com")
    assert limits.host_allowed("IMAGES.test.") and not limits.host_allowed("images.test.evil.com")
    assert limits.host_allowed("::1")
