"""What one request to the server may ask for, checked before the work each limit bounds.

Every limit is checked before it costs memory or time: the body size before JSON decoding, the image count before
any image is decoded, pixel counts from image headers before pixel data is decoded, the byte cap while a remote
image streams in. Breaking one is a 400 (413 for the body) ``APIError`` whose ``code`` names the limit. The
defaults follow RELIABILITY.md ("Defaults to ship", rows S3, S6, S8, S9, S11).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from vlmlab.errors import ConfigError
from vlmlab.processing.image import ALLOWED_FORMATS

MiB = 1024 * 1024
# A host name or IP literal (IPv6 without brackets, as ``urlsplit(url).hostname`` gives it), optionally "*."-prefixed.
_DOMAIN = re.compile(r"(\*\.)?[a-z0-9_.:-]+")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 32 * MiB
    """Request body size (413 ``body_too_large`` above it): room for one ``max_image_bytes`` image in base64
    (4/3 larger) plus the text, or several typical photos."""
    max_images_per_request: int = 8
    """Image parts over all messages (400 ``too_many_images``), counted before any image is decoded."""
    max_image_bytes: int = 20 * MiB
    """Encoded size of one image: the decoded base64 of a ``data:`` URI, or a remote body (cut off as it
    streams in) (400 ``image_too_large``)."""
    max_image_pixels: int = 4096 * 4096
    """Width x height of one image, read from its header before decoding (400 ``image_too_large``). Pillow's own
    decompression-bomb limit (about 89 MP) stays in force, so larger values do not raise it past that."""
    max_request_pixels: int = 4 * 4096 * 4096
    """Pixels of all images in a request together, from their headers, before any is decoded (400
    ``too_many_pixels``): bounds the RGB memory of one request (3 bytes a pixel, about 200 MB here)."""
    min_image_side: int = 1
    """Shortest side an image may have (400 ``image_too_small``). 1: every image with pixels is served, since
    the processor resizes each image to its input size; a 1 x 1 image is valid input (RELIABILITY.md S7)."""
    allowed_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF")
    """Pillow format names, recognised by their magic bytes, never by MIME type or file name (400
    ``unsupported_image_format`` otherwise); a subset of ``vlmlab.processing.image.ALLOWED_FORMATS``."""
    max_n: int = 8
    """Choices per request (``n``) (400 ``too_many_choices``): each costs a full generation."""
    max_stop: int = 4
    """Stop sequences per request, as in the OpenAI API (400 ``too_many_stop_sequences``)."""
    default_max_tokens: int = 256
    """Completion tokens when the request sets neither ``max_tokens`` nor ``max_completion_tokens``."""
    remote_urls: bool = False
    """Fetch ``http(s)://`` image URLs. Off: only ``data:`` URIs (400 ``remote_urls_disabled``); fetching
    URLs on a client's behalf is the SSRF surface of RELIABILITY.md S9."""
    allowed_domains: tuple[str, ...] = ()
    """Hosts remote images may come from: an exact host (``"images.example.com"``) or a wildcard for its
    subdomains (``"*.example.com"``, which does not match ``example.com`` itself). Required when
    ``remote_urls`` is on."""
    fetch_timeout_s: float = 10.0
    """Whole-fetch deadline of one remote image, connecting and reading together (a server that sends 1 byte a
    second is cut off at this time, not kept alive by each byte)."""
    allow_private_addresses: bool = False
    """Fetch from hosts that resolve to loopback, private, link-local or reserved addresses. For tests only: on
    a real server this lets clients reach internal services (cloud metadata at 169.254.169.254, ...)."""

    def __post_init__(self):
        for name in (
            "max_body_bytes",
            "max_images_per_request",
            "max_image_bytes",
            "max_image_pixels",
            "max_request_pixels",
            "min_image_side",
            "max_n",
            "max_stop",
            "default_max_tokens",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Limits.{name} must be a positive integer, got {value!r}")
        if not self.fetch_timeout_s > 0:
            raise ConfigError(f"Limits.fetch_timeout_s must be positive, got {self.fetch_timeout_s!r}")
        unknown = [f for f in self.allowed_formats if f not in ALLOWED_FORMATS]
        if unknown or not self.allowed_formats:
            raise ConfigError(
                f"Limits.allowed_formats must be a non-empty subset of {list(ALLOWED_FORMATS)}, "
                f"got {list(self.allowed_formats)}"
            )
        for domain in self.allowed_domains:
            if not isinstance(domain, str) or not _DOMAIN.fullmatch(domain):
                raise ConfigError(
                    f"Limits.allowed_domains: {domain!r} must be a lowercase host or '*.host', without scheme or port"
                )
            if ":" in domain and not _is_ipv6(domain):
                raise ConfigError(f"Limits.allowed_domains: {domain!r} must be a host without a port")
        if self.remote_urls and not self.allowed_domains:
            raise ConfigError("Limits.remote_urls needs allowed_domains (the hosts images may come from)")

    def host_allowed(self, host: str) -> bool:
        """Whether ``host`` (as in a URL, lowercased) matches ``allowed_domains``."""
        host = host.lower().rstrip(".")
        for domain in self.allowed_domains:
            if domain.startswith("*."):
                if host.endswith(domain[1:]):
                    return True
            elif host == domain:
                return True
        return False


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False
