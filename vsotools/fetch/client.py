"""The Flickr API as the crawler uses it: flickrapi behind a token bucket, with retries.

``FlickrClient.search`` makes one ``flickr.photos.search`` call and returns a ``SearchPage``.
Every call first takes a token from the bucket (``calls_per_hour`` per key). Transient failures
are retried with exponential backoff and jitter, waiting longer when the server's
``Retry-After`` asks (``ratelimit.retry_delay``, the image downloader's policy too): HTTP 429 (Flickr answers it with an HTML body,
which flickrapi turns into ``FlickrError`` with ``code=None`` and the status in its message),
HTTP 5xx, timeouts, connection resets, unreadable bodies, and the API codes 10, 105 and 201.
Code 100 (invalid key) stops the crawl with ``FlickrAuthError``; other API codes with
``FlickrApiError``.

The API key is never printed, logged or put into a message: flickrapi sends it in the OAuth
header, and its own debug log (which shows the key in the ``FlickrAPI`` repr) is held at WARNING.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import flickrapi
import requests

from vsotools.core.errors import VsoError
from vsotools.core.files import UnsafeFile, read_regular_file
from vsotools.core.ratelimit import TokenBucket, parse_retry_after, retry_delay

log = logging.getLogger(__name__)

KEY_VARIABLE = "FLICKR_API_KEY"
SECRET_VARIABLE = "FLICKR_API_SECRET"
TRANSIENT_CODES = frozenset({10, 105, 201})
"""API error codes that mean "try again later"."""
INVALID_KEY = 100

_STATUS_IN_MESSAGE = re.compile(r"Status code (\d+)")


class FlickrApiError(VsoError):
    """The API refused a call for a reason that retrying will not fix."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class FlickrAuthError(FlickrApiError):
    """The API key was refused (code 100) or is missing."""


class FlickrUnavailable(VsoError):
    """The API kept failing after every retry; rerun later to continue."""


@dataclass(frozen=True)
class Credentials:
    """A Flickr API key and secret; their repr never shows them."""

    key: str = field(repr=False)
    secret: str = field(repr=False, default="")


CREDENTIALS_MAX_BYTES = 1 << 16
"""The largest credentials file read: two lines of a key and a secret."""


def load_credentials(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Credentials:
    """The key and secret from ``FLICKR_API_KEY`` / ``FLICKR_API_SECRET``, or from ``path``.

    The file holds ``FLICKR_API_KEY=...`` and ``FLICKR_API_SECRET=...`` lines (``#`` comments and
    blank lines allowed). The secret may be empty for servers that do not check signatures.
    """
    values: dict[str, str] = {}
    if path is not None:
        try:
            lines = read_regular_file(path, CREDENTIALS_MAX_BYTES).decode("utf-8").splitlines()
        except UnsafeFile as exc:
            raise FlickrAuthError(f"the credentials file {exc.detail}") from None
        except OSError as exc:
            raise FlickrAuthError(
                f"{path}: cannot read the credentials file ({exc.strerror})"
            ) from None
        except UnicodeDecodeError as exc:
            raise FlickrAuthError(
                f"{path}: the credentials file is not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
        for lineno, line in enumerate(lines, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, value = line.partition("=")
            if not sep or name.strip() not in (KEY_VARIABLE, SECRET_VARIABLE):
                raise FlickrAuthError(
                    f"{path}:{lineno}: expected {KEY_VARIABLE}=... or {SECRET_VARIABLE}=..."
                )
            values[name.strip()] = value.strip().strip("\"'")
        source = str(path)
    else:
        env = os.environ if environ is None else environ
        values = {k: env[k] for k in (KEY_VARIABLE, SECRET_VARIABLE) if env.get(k)}
        source = "the environment"
    key = values.get(KEY_VARIABLE, "")
    if not key:
        raise FlickrAuthError(
            f"no Flickr API key in {source}: set {KEY_VARIABLE} (and {SECRET_VARIABLE}) or"
            " give a credentials file"
        )
    return Credentials(key=key, secret=values.get(SECRET_VARIABLE, ""))


@dataclass(frozen=True)
class FoundPhoto:
    """One search result, in the field names of a photo record."""

    photo_id: str
    owner: str | None
    owner_name: str | None
    title: str | None
    description: str | None
    tags: str | None
    license: str | None
    date_upload: int | None
    date_taken: str | None
    urls: dict[str, str]
    """``url_z`` -> address, for every size the photo has among those asked."""


@dataclass(frozen=True)
class SearchPage:
    page: int
    pages: int
    total: int
    photos: list[FoundPhoto]


class FlickrClient:
    """Rate-limited, retrying ``flickr.photos.search`` over flickrapi."""

    def __init__(
        self,
        credentials: Credentials,
        *,
        api_url: str = flickrapi.FlickrAPI.REST_URL,
        api_format: Literal["json", "xml"] = "json",
        calls_per_hour: int = 3600,
        burst: int = 10,
        timeout: float = 60.0,
        retries: int = 8,
        backoff_base: float = 0.5,
        backoff_max: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        _quiet_flickrapi_logging()
        self._format = "parsed-json" if api_format == "json" else "etree"
        self._api = flickrapi.FlickrAPI(
            credentials.key,
            credentials.secret,
            format=self._format,
            store_token=False,
            cache=False,
            timeout=timeout,
        )
        # flickrapi reads the endpoint from this attribute on every call (FlickrAPI._flickr_call).
        self._api.REST_URL = api_url
        # flickrapi's HTTP session is shared by every FlickrAPI object (a class attribute) and
        # drops a failed response's headers; our own session lets us read Retry-After.
        self._retry_after: float | None = None
        session = requests.Session()
        session.hooks["response"].append(self._note_retry_after)
        self._api.flickr_oauth.session = session
        self.api_url = api_url
        self._bucket = TokenBucket.per_hour(calls_per_hour, burst)
        self._retries = retries
        self._backoff = (backoff_base, backoff_max)
        self._sleep = sleep
        self.calls = 0
        """API calls made, retries included."""
        self.retried = 0

    def search(self, params: Mapping[str, str]) -> SearchPage:
        """One ``flickr.photos.search`` page for ``params`` (text/tags, page, extras, ...)."""
        response = self._call("flickr.photos.search", params)
        try:
            if self._format == "parsed-json":
                return _page_from_json(response)
            return _page_from_etree(response)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FlickrApiError(
                f"unreadable flickr.photos.search response from {self.api_url}: {exc!r}"
            ) from None

    def _note_retry_after(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self._retry_after = parse_retry_after(response.headers.get("Retry-After"))

    def _call(self, method: str, params: Mapping[str, str]) -> Any:
        for attempt in range(self._retries + 1):
            self._bucket.acquire()
            self.calls += 1
            self._retry_after = None
            try:
                return self._api.do_flickr_call(method, **params)
            except flickrapi.FlickrError as exc:
                reason = _classify(exc, method, self.api_url)
            except (requests.Timeout, requests.ConnectionError) as exc:
                reason = f"{type(exc).__name__} from {self.api_url}"
            except requests.exceptions.ChunkedEncodingError:
                reason = f"response cut short by {self.api_url}"
            except (ValueError, SyntaxError) as exc:  # JSON or XML that does not parse
                reason = f"unreadable response from {self.api_url} ({type(exc).__name__})"
            if attempt == self._retries:
                raise FlickrUnavailable(
                    f"{method} failed {attempt + 1} times, last: {reason}; rerun the same command"
                    " later to continue"
                )
            delay = retry_delay(attempt, *self._backoff, retry_after=self._retry_after)
            log.info("%s: %s; retrying in %.1fs", method, reason, delay)
            self.retried += 1
            self._sleep(delay)
        raise AssertionError("unreachable")


def _classify(exc: flickrapi.FlickrError, method: str, api_url: str) -> str:
    """A transient failure's description; raises for permanent ones."""
    if exc.code is None:
        match = _STATUS_IN_MESSAGE.search(str(exc))
        status = int(match.group(1)) if match else 0
        if status == 429 or status >= 500:
            return f"HTTP {status} from {api_url}"
        raise FlickrApiError(f"{method}: HTTP {status or '?'} from {api_url}")
    if exc.code in TRANSIENT_CODES:
        return f"API error {exc.code} ({_message(exc)})"
    if exc.code == INVALID_KEY:
        raise FlickrAuthError(
            f"Flickr refused the API key (error 100: {_message(exc)}) at {api_url}; check"
            f" {KEY_VARIABLE} or the credentials file",
            exc.code,
        )
    raise FlickrApiError(f"{method}: Flickr API error {exc.code}: {_message(exc)}", exc.code)


def _message(exc: flickrapi.FlickrError) -> str:
    # flickrapi formats API errors as "Error: <code>: <message>".
    return re.sub(r"^Error: \d+: ", "", str(exc))


def _quiet_flickrapi_logging() -> None:
    # flickrapi logs each call at DEBUG with its FlickrAPI repr, and oauthlib / requests_oauthlib
    # log the signed parameters and headers; all of them show the API key. Keep those records
    # from being made, and keep flickrapi's ERROR lines for HTTP errors (the bodies of 429s)
    # from reaching stderr through logging's last-resort handler. Our own log says what happened.
    for name in _LEAKY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)
        if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
            logger.addHandler(logging.NullHandler())


_LEAKY_LOGGERS = ("flickrapi", "oauthlib", "requests_oauthlib")


# --- parsing --------------------------------------------------------------------------------


def _page_from_json(response: Mapping[str, Any]) -> SearchPage:
    photos = response["photos"]
    return SearchPage(
        page=int(photos["page"]),
        pages=int(photos["pages"]),
        total=int(photos["total"]),
        photos=[_photo_from_fields(p, _content(p.get("description"))) for p in photos["photo"]],
    )


def _page_from_etree(response: Any) -> SearchPage:
    photos = response.find("photos")
    found = []
    for element in photos.findall("photo"):
        description = element.find("description")
        text = None if description is None else (description.text or "")
        found.append(_photo_from_fields(element.attrib, text))
    return SearchPage(
        page=int(photos.get("page")),
        pages=int(photos.get("pages")),
        total=int(photos.get("total")),
        photos=found,
    )


def _content(value: Any) -> str | None:
    if isinstance(value, Mapping):
        return str(value.get("_content", ""))
    return None if value is None else str(value)


def _photo_from_fields(fields: Mapping[str, Any], description: str | None) -> FoundPhoto:
    upload = fields.get("dateupload")
    return FoundPhoto(
        photo_id=str(fields["id"]),
        owner=_str_or_none(fields.get("owner")),
        owner_name=_str_or_none(fields.get("ownername")),
        title=_str_or_none(fields.get("title")),
        description=description,
        tags=_str_or_none(fields.get("tags")),
        license=_str_or_none(fields.get("license")),
        date_upload=int(upload) if upload not in (None, "") else None,
        date_taken=_str_or_none(fields.get("datetaken")),
        urls={k: str(v) for k, v in fields.items() if k.startswith("url_") and v},
    )


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)
