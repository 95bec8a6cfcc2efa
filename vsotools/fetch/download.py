"""Image downloads: HTTP with pooled connections, retries, host checks, and validation.

``Downloader.get(url)`` fetches one image and returns an ``Outcome``: the bytes to store and the
facts of the bytes as served (sha256, size, width, height), or the reason it was rejected. It is
called from many threads at once; each thread keeps its own ``requests`` session, whose connection
pool reuses connections to each host. ``check_image`` is the same gate for images read from disk.
Every decode, by any thread, takes its pixels from one budget (``DownloadSettings.decode_pixels``),
so the memory of decoding does not grow with the number of threads.

Failure reasons (the ``error`` of a photo record): ``http_<status>`` (``http_404``, ``http_410``,
``http_429`` or ``http_5xx`` after the retries), ``timeout``, ``connection_error``, ``truncated``
(the body ended early, or the image data is cut), ``bad_url``, ``host_not_allowed``,
``too_many_redirects``, ``missing_file``, and the image rejections of ``vsotools.core.images``
(``not_an_image``, ``too_small``, ``too_large``, ``too_many_pixels``, ``empty``).
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import logging
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from vsotools import __version__
from vsotools.core.config import FetchConfig
from vsotools.core.files import UnsafeFile, contained_path, read_regular_file, whole_number
from vsotools.core.images import (
    NOT_AN_IMAGE,
    TOO_LARGE,
    TRUNCATED,
    ImageLimits,
    ImageRejected,
    PixelBudget,
    fit_jpeg,
    validate_image,
)
from vsotools.core.ratelimit import parse_retry_after, retry_delay

log = logging.getLogger(__name__)

BAD_URL = "bad_url"
HOST_NOT_ALLOWED = "host_not_allowed"
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"
TOO_MANY_REDIRECTS = "too_many_redirects"
MISSING_FILE = "missing_file"

_RETRIED_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5
_CHUNK = 1 << 16
_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp"}
STORED_EXTENSIONS = tuple(sorted(set(_EXTENSIONS.values())))
"""The extensions a kept image is stored with."""
_ACCEPTED_TYPES = ("image/", "application/octet-stream", "binary/octet-stream")
# Characters that parsers read differently: urllib.parse ends the host at a backslash (as
# browsers do) while urllib3 keeps it in the path, so "http://a\\@b/" is host b to one and a to
# the other. Spaces and control characters are dropped by one parser and not another. No image
# URL needs any of them.
_AMBIGUOUS = re.compile(r"[\\\s\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class DownloadSettings:
    """How images are fetched, checked and stored: the recipe's ``[fetch]`` section as the
    downloader reads it (``from_config``), so that no default is restated here."""

    timeout: float
    retries: int
    backoff_base: float
    backoff_max: float
    limits: ImageLimits
    max_side: int
    """Downscale to this longer side (re-encoded as JPEG) before storing; 0: store as served."""
    jpeg_quality: int
    allowed_hosts: tuple[str, ...]
    decode_pixels: int
    """Most pixels decoded at once by all the threads that check images with these settings
    (about 4 bytes each); an image larger than this is decoded alone."""
    user_agent: str = f"vsotools/{__version__}"

    @classmethod
    def from_config(cls, config: FetchConfig, extra_hosts: Iterable[str] = ()) -> DownloadSettings:
        return cls(
            timeout=config.download_timeout,
            retries=config.download_retries,
            backoff_base=config.backoff_base,
            backoff_max=config.backoff_max,
            limits=ImageLimits.from_config(config),
            max_side=config.max_side,
            jpeg_quality=config.jpeg_quality,
            allowed_hosts=(*config.allowed_hosts, *extra_hosts),
            # By default one image of the largest size allowed at a time: the decodes' memory
            # no longer grows with download_concurrency (32 x 40 Mpx would be 5 GB).
            decode_pixels=config.decode_pixels or config.max_pixels,
        )


@dataclass(frozen=True)
class Outcome:
    """What came of fetching one image: stored bytes and served facts, or a failure reason."""

    error: str | None = None
    """None when the image is kept; else the failure reason."""
    detail: str = ""
    data: bytes | None = None
    """The bytes to store (the served bytes, or their downscaled re-encoding)."""
    ext: str | None = None
    """File extension of ``data`` (jpg, png, ...)."""
    sha256: str | None = None
    """Hex sha256 of the bytes as served."""
    image_bytes: int | None = None
    width: int | None = None
    height: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failed(cls, error: str, detail: str = "") -> Outcome:
        return cls(error=error, detail=detail)


def check_image(served: bytes, settings: DownloadSettings) -> Outcome:
    """Validate served bytes and prepare what is stored (downscaled when the settings ask)."""
    budget = _decode_budget(max(1, settings.decode_pixels))
    try:
        info = validate_image(served, settings.limits, budget)
    except ImageRejected as rejected:
        return Outcome.failed(rejected.reason, str(rejected))
    digest = hashlib.sha256(served).hexdigest()
    data, ext = served, _EXTENSIONS.get(info.format, "img")
    if settings.max_side and max(info.width, info.height) > settings.max_side:
        try:
            data = fit_jpeg(
                served,
                settings.max_side,
                quality=settings.jpeg_quality,
                max_pixels=settings.limits.max_pixels,
                budget=budget,
            )
        except ImageRejected as rejected:
            return Outcome.failed(rejected.reason, str(rejected))
        ext = "jpg"
    return Outcome(
        data=data,
        ext=ext,
        sha256=digest,
        image_bytes=len(served),
        width=info.width,
        height=info.height,
    )


@functools.cache
def _decode_budget(pixels: int) -> PixelBudget:
    # One budget per process and size, not per Downloader: memory is the process's, and the
    # threads that read local files (read_local_image) decode beside the downloading ones.
    return PixelBudget(pixels)


def read_local_image(root: Path, name: str, settings: DownloadSettings) -> Outcome:
    """The outcome of the image file ``name`` (relative to ``root``, or absolute inside it),
    checked like a download.

    A name that leads out of ``root`` is refused (``outside_root``); so is anything but a regular
    file (a FIFO, ``/dev/zero``: ``not_a_file``), and a file larger than ``max_bytes``
    (``too_large``) is refused without being read whole.
    """
    try:
        path = contained_path(root, name)
        served = read_regular_file(path, settings.limits.max_bytes)
    except UnsafeFile as exc:
        return Outcome.failed(exc.reason, exc.detail)
    except FileNotFoundError:
        return Outcome.failed(MISSING_FILE, str(Path(root) / name))
    except OSError as exc:
        return Outcome.failed(MISSING_FILE, f"{Path(root) / name}: {exc.strerror}")
    return check_image(served, settings)


def host_allowed(url: str, patterns: Iterable[str]) -> bool:
    """Whether the host a request for ``url`` connects to (``host`` or ``host:port``) matches one
    of the glob patterns; False for a URL that ``Downloader`` refuses as ``bad_url``."""
    try:
        _checked_request(url, patterns)
    except _Refused:
        return False
    return True


def _checked_request(
    url: str, patterns: Iterable[str], session: requests.Session | None = None
) -> requests.PreparedRequest:
    """The request for ``url`` as it is sent, once the host it connects to (``host`` or
    ``host:port``) matches one of the glob patterns; raises ``_Refused`` (``bad_url`` or
    ``host_not_allowed``) otherwise."""
    request = _prepare(url, session)
    host, port = _target(request)
    with_port = f"{host}:{port}" if port else host
    if not any(
        fnmatch.fnmatchcase(host, p.lower()) or fnmatch.fnmatchcase(with_port, p.lower())
        for p in patterns
    ):
        raise _Refused(HOST_NOT_ALLOWED, with_port)
    return request


class _Refused(Exception):
    """A URL that is not contacted; ``reason`` is ``bad_url`` or ``host_not_allowed``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _prepare(url: str, session: requests.Session | None = None) -> requests.PreparedRequest:
    """The GET request for ``url`` as the HTTP client sends it (normalised, percent-encoded)."""
    if _AMBIGUOUS.search(url):
        raise _Refused(BAD_URL, f"backslash, space or control character in {url[:200]!r}")
    request = requests.Request("GET", url)
    try:
        return session.prepare_request(request) if session else request.prepare()
    except (requests.RequestException, ValueError) as exc:  # InvalidURL, MissingSchema, IDNA
        raise _Refused(BAD_URL, f"{url[:200]!r}: {exc}") from None


def _target(request: requests.PreparedRequest) -> tuple[str, int | None]:
    """The host (lower case) and written port that ``request`` connects to.

    The prepared URL is read twice, as urllib3 reads it to connect and as requests' adapter reads
    it (urllib.parse) to pick a connection pool; a URL the two read differently, one that is not
    http(s), has no host or carries a user name (``user@host``, a classic way to disguise the
    host) is refused as ``bad_url``.
    """
    url = request.url or ""
    try:
        sent, pooled = parse_url(url), urlsplit(url)
        pooled_port = pooled.port
    except (LocationParseError, ValueError):  # ValueError: a port out of range
        raise _Refused(BAD_URL, url[:200]) from None
    if sent.scheme not in ("http", "https") or not sent.host:
        raise _Refused(BAD_URL, f"not an http(s) URL with a host: {url[:200]!r}")
    if sent.auth is not None or "@" in pooled.netloc:
        raise _Refused(BAD_URL, f"user name in the host part of {url[:200]!r}")
    host = sent.host.lower().strip("[]")
    if (sent.scheme, host, sent.port) != (pooled.scheme, pooled.hostname, pooled_port):
        raise _Refused(BAD_URL, f"the host of {url[:200]!r} reads differently to each parser")
    return host, sent.port


class _Transient(Exception):
    """A failure worth retrying; ``reason`` is what is recorded if the retries run out."""

    def __init__(self, reason: str, detail: str = "", retry_after: float | None = None) -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


class Downloader:
    """Fetches and validates images; safe to call from many threads."""

    def __init__(
        self, settings: DownloadSettings, *, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.settings = settings
        self._sleep = sleep
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def get(self, url: str) -> Outcome:
        """Fetch ``url`` with retries and check it; never raises for network or image faults."""
        for attempt in range(self.settings.retries + 1):
            try:
                return self._fetch_once(url)
            except _Transient as transient:
                if attempt == self.settings.retries:
                    return Outcome.failed(transient.reason, transient.detail)
                delay = retry_delay(
                    attempt,
                    self.settings.backoff_base,
                    self.settings.backoff_max,
                    retry_after=transient.retry_after,
                )
                log.debug("retrying %s in %.2fs: %s", url, delay, transient)
                self._sleep(delay)
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def __enter__(self) -> Downloader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=8, pool_maxsize=8, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = self.settings.user_agent
            # Looking up proxy settings in the environment costs more CPU per request than
            # validating the image; skip it unless a proxy is configured.
            session.trust_env = bool(urllib.request.getproxies())
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _fetch_once(self, url: str) -> Outcome:
        session = self._session()
        for _ in range(_MAX_REDIRECTS + 1):
            # Each hop is checked as the request that is sent, not as the text of the URL: the
            # host the connection goes to is the one allowed.
            try:
                request = _checked_request(url, self.settings.allowed_hosts, session)
            except _Refused as refused:
                return Outcome.failed(refused.reason, refused.detail)
            environment = session.merge_environment_settings(request.url, {}, True, None, None)
            try:
                with session.send(
                    request, timeout=self.settings.timeout, allow_redirects=False, **environment
                ) as response:
                    if response.status_code in _REDIRECTS and "Location" in response.headers:
                        url = urljoin(request.url or url, response.headers["Location"])
                        continue
                    return self._read(response)
            except requests.Timeout as exc:
                raise _Transient(TIMEOUT, str(exc)) from None
            except requests.exceptions.ChunkedEncodingError as exc:
                raise _Transient(TRUNCATED, str(exc)) from None
            except requests.ConnectionError as exc:
                raise _Transient(CONNECTION_ERROR, str(exc)) from None
        return Outcome.failed(TOO_MANY_REDIRECTS, url[:200])

    def _read(self, response: requests.Response) -> Outcome:
        status = response.status_code
        if status != 200:
            reason = f"http_{status}"
            if status in _RETRIED_STATUSES or status >= 500:
                raise _Transient(
                    reason, f"HTTP {status}", parse_retry_after(response.headers.get("Retry-After"))
                )
            return Outcome.failed(reason, f"HTTP {status}")
        content_type = response.headers.get("Content-Type", "").lower()
        if content_type and not content_type.startswith(_ACCEPTED_TYPES):
            return Outcome.failed(NOT_AN_IMAGE, f"Content-Type {content_type}")
        limit = self.settings.limits.max_bytes
        declared = whole_number(response.headers.get("Content-Length", ""))
        if declared is not None and declared > limit:
            return Outcome.failed(TOO_LARGE, f"{declared} bytes > {limit}")
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_content(_CHUNK):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                return Outcome.failed(TOO_LARGE, f"more than {limit} bytes")
        return check_image(b"".join(chunks), self.settings)
