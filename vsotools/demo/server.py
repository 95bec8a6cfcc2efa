"""A local Flickr-compatible server: the REST API and the image host, over a corpus on disk.

The corpus is a folder with ``photos.jsonl``: one photo per line in Flickr's own field names
(``id``, ``owner``, ``ownername``, ``title``, ``description``, ``tags``, ``license``,
``dateupload``, ``datetaken``), plus ``anps`` (the ANP queries that find the photo) and ``image``
(a path under the folder). Optional ``secret``, ``server`` and ``farm`` are made up when absent.

The server answers ``/services/rest/`` (GET or POST, plain or OAuth-signed as flickrapi sends
it) with ``flickr.photos.search`` and ``flickr.photos.getInfo`` in ``format=json`` (with or
without ``nojsoncallback``) and ``format=rest`` (XML), shaped key for key and type for type like
the real responses recorded in ``shared/data/flickr-api``: errors as ``stat: fail`` with HTTP 200,
the 4,000-result cap, upload-date windows, extras, licence filters. It serves each photo's image
file, unchanged, at the ``url_*`` addresses it hands out, leaving out the sizes a photo of that
size would lack on Flickr.

A photo is found by a text query (``text=adj noun``) or a tag query (``tags=adj,noun``) exactly
when the query, lower-cased with ``_``, ``,`` and runs of spaces read as one space, equals one of
its ``anps``. Results are sorted by upload date (newest first by default), ties by id.

``Faults`` makes it misbehave: a fraction of requests answered with HTTP 500, HTTP 429 (Flickr's
HTML body) or a dropped connection, a fraction of API calls with the transient codes 201/105/10,
a fixed fraction of photos whose image is served truncated or as an HTML page (always the same
photos, chosen by hash), and latency added to every response.

Hostile clients get an answer, never a dropped connection or a stuck thread: a malformed
Content-Length is answered 400, a body over 1 MiB 413, a client that stops sending 408 (after
``client_timeout`` seconds); unreadable dates are ignored, as Flickr ignores them; a
``jsoncallback`` that is not a JavaScript name is left out; and only files inside the corpus folder
are served.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import logging
import math
import random
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypedDict, Unpack
from urllib.parse import parse_qsl, urlsplit

from PIL import Image

from vsotools.core.errors import VsoError
from vsotools.core.files import UnsafeFile, open_regular_file, read_regular_file, whole_number

log = logging.getLogger(__name__)

RESULT_CAP = 4000
"""Flickr returns at most this many results of one search; later pages repeat the last one."""
DEFAULT_PER_PAGE = 100
MAX_PER_PAGE = 500
DEFAULT_INVALID_KEY = "invalid-key"
DEFAULT_CLIENT_TIMEOUT = 60.0
"""Seconds a client may leave a connection silent (mid-request or between requests)."""
MAX_BODY = 1 << 20
"""Most bytes of a request body read; flickrapi's signed POSTs are well under 10 KB."""
MAX_IMAGE_BYTES = 1 << 26
"""Most bytes of an image file served (64 MiB); a larger one is answered 404."""

HTTP_429_BODY = (
    b"<html><body><h1>429 Too Many Requests</h1>\n"
    b"You have sent too many requests in a given amount of time.\n</body></html>\n"
)
HTTP_500_BODY = (
    b"<html><body><h1>500 Internal Server Error</h1>\n"
    b"The server encountered an internal error.\n</body></html>\n"
)
NOT_AN_IMAGE_BODY = b"<html><body><h1>Photo unavailable</h1></body></html>\n"

# (extra suffix, URL suffix, longest side in pixels; 0 for the original). Sizes up to 500 px
# exist for every photo; larger ones only when the photo is at least that large.
SIZES: tuple[tuple[str, str, int], ...] = (
    ("sq", "_s", 75),
    ("q", "_q", 150),
    ("t", "_t", 100),
    ("s", "_m", 240),
    ("n", "_n", 320),
    ("w", "_w", 400),
    ("m", "", 500),
    ("z", "_z", 640),
    ("c", "_c", 800),
    ("l", "_b", 1024),
    ("h", "_h", 1600),
    ("k", "_k", 2048),
    ("o", "_o", 0),
)
_ALWAYS_OFFERED = 500
_SUFFIXES = {suffix: name for name, suffix, _ in SIZES}

_TRANSIENT_API_ERRORS = (
    (201, "Sorry, the Flickr API service is not currently available."),
    (105, "Service currently unavailable"),
    (10, "Sorry, the Flickr search API is not currently available."),
)
_MIME = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
}


class CorpusError(VsoError):
    """A server corpus (``photos.jsonl``) cannot be read."""


@dataclass(frozen=True)
class Faults:
    """How often the server misbehaves; every fraction is in [0, 1]."""

    error_500: float = 0.0
    """Fraction of requests (API and images) answered with HTTP 500."""
    error_429: float = 0.0
    """Fraction of requests answered with HTTP 429 and Flickr's HTML body."""
    drop: float = 0.0
    """Fraction of requests whose connection is closed without an answer."""
    unavailable: float = 0.0
    """Fraction of API calls answered ``stat: fail`` with a transient code (201, 105 or 10)."""
    truncated: float = 0.0
    """Fraction of photos whose image is always served cut to half its bytes."""
    not_image: float = 0.0
    """Fraction of photos whose image URL always serves an HTML page."""
    latency: float = 0.0
    """Seconds added before every response."""
    seed: int = 0
    """Seeds the choice of faulty requests and photos."""

    def __post_init__(self) -> None:
        for name in ("error_500", "error_429", "drop", "unavailable", "truncated", "not_image"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"fault fraction {name} must be in [0, 1], got {value}")
        if self.error_500 + self.error_429 + self.drop + self.unavailable > 1.0:
            raise ValueError("the request fault fractions add up to more than 1")
        if self.latency < 0:
            raise ValueError("latency must not be negative")


# --- the corpus -------------------------------------------------------------------------------


@dataclass
class CorpusPhoto:
    id: str
    owner: str
    ownername: str
    title: str
    description: str
    tags: str
    license: str
    dateupload: int
    datetaken: str
    anps: tuple[str, ...]
    image: Path
    """Absolute, symlinks resolved, inside the corpus folder (``load_corpus`` checks it)."""
    secret: str
    server: str
    farm: int
    width: int | None = None
    height: int | None = None
    mime: str = "application/octet-stream"
    sizes: tuple[str, ...] = field(default_factory=tuple)
    """The size names (``m``, ``z``, ...) this photo is offered in."""


def query_key(text: str) -> str:
    """The form in which a query and an ANP are compared: lower case, words split at ``_``,
    ``,`` and white space, joined by one space."""
    return " ".join(re.split(r"[\s_,]+", text.lower())).strip()


def load_corpus(folder: str | Path) -> list[CorpusPhoto]:
    """Read ``folder/photos.jsonl``; every photo's image size is read from its file's header."""
    folder = Path(folder)
    path = folder / "photos.jsonl"
    try:
        with open_regular_file(path) as fh:
            lines = fh.read().decode("utf-8").splitlines()
    except FileNotFoundError:
        raise CorpusError(f"{path}: no such file (a corpus folder holds photos.jsonl)") from None
    except UnsafeFile as exc:
        raise CorpusError(f"the corpus file {exc.detail}") from None
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    photos: list[CorpusPhoto] = []
    seen: set[str] = set()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}:{lineno}: not JSON: {exc.msg}") from None
        if not isinstance(raw, dict):
            raise CorpusError(f"{path}:{lineno}: expected a JSON object")
        photo = _corpus_photo(folder, path, lineno, raw)
        if photo.id in seen:
            raise CorpusError(f"{path}:{lineno}: photo id {photo.id!r} appears twice")
        seen.add(photo.id)
        photos.append(photo)
    return photos


def _corpus_photo(folder: Path, path: Path, lineno: int, raw: Mapping[str, Any]) -> CorpusPhoto:
    def text(key: str, default: str | None = None) -> str:
        value = raw.get(key, default)
        if value is None:
            raise CorpusError(f"{path}:{lineno}: missing field {key!r}")
        if isinstance(value, list):
            value = " ".join(str(v) for v in value)
        return str(value)

    photo_id = text("id")
    anps = raw.get("anps", [])
    if not isinstance(anps, list) or not all(isinstance(a, str) for a in anps):
        raise CorpusError(f"{path}:{lineno}: 'anps' must be a list of strings")
    try:
        dateupload = int(raw.get("dateupload", 0))
    except (TypeError, ValueError):
        raise CorpusError(f"{path}:{lineno}: 'dateupload' must be Unix seconds") from None
    digest = hashlib.sha1(photo_id.encode()).hexdigest()
    photo = CorpusPhoto(
        id=photo_id,
        owner=text("owner", "0@N00"),
        ownername=text("ownername", ""),
        title=text("title", ""),
        description=text("description", ""),
        tags=text("tags", ""),
        license=text("license", "0"),
        dateupload=dateupload,
        datetaken=text("datetaken", "1970-01-01 00:00:00"),
        anps=tuple(query_key(a) for a in anps),
        image=_image_path(folder, path, lineno, text("image")),
        secret=text("secret", digest[:10]),
        server=text("server", "65535"),
        farm=_farm(path, lineno, raw.get("farm", 66)),
    )
    try:
        with open_regular_file(photo.image) as fh, Image.open(fh) as image:
            photo.width, photo.height = image.size
            photo.mime = _MIME.get(image.format or "", photo.mime)
    except UnsafeFile:
        # A FIFO would hang the server here and a request thread later; a folder is no image.
        kind = "a folder" if photo.image.is_dir() else "not a regular file"
        raise CorpusError(f"{path}:{lineno}: image {text('image')!r} is {kind}") from None
    except (OSError, SyntaxError, ValueError):
        pass  # served as is; the client decides what it is (missing files answer 404)
    longest = max(photo.width or 0, photo.height or 0)
    photo.sizes = tuple(
        name
        for name, _, bound in SIZES
        if bound == 0 or bound <= _ALWAYS_OFFERED or (longest and longest >= bound)
    )
    return photo


def _image_path(folder: Path, path: Path, lineno: int, name: str) -> Path:
    """The image file, symlinks resolved; refused unless it lies inside the corpus folder (the
    server must not hand out /etc/passwd because a corpus line names it)."""
    try:
        resolved = (folder / name).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL in the name
        raise CorpusError(f"{path}:{lineno}: image {name!r} cannot be resolved: {exc}") from None
    if not resolved.is_relative_to(folder.resolve()):
        raise CorpusError(
            f"{path}:{lineno}: image {name!r} is outside the corpus folder {folder}"
            " (symlinks resolved)"
        )
    return resolved


def _farm(path: Path, lineno: int, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CorpusError(f"{path}:{lineno}: 'farm' must be a whole number") from None


class Corpus:
    """The photos of a corpus, indexed by id and by query."""

    def __init__(self, photos: list[CorpusPhoto]) -> None:
        self.by_id = {p.id: p for p in photos}
        self.by_query: dict[str, list[CorpusPhoto]] = {}
        for photo in photos:
            for key in set(photo.anps):
                self.by_query.setdefault(key, []).append(photo)

    def search(self, key: str) -> list[CorpusPhoto]:
        return self.by_query.get(key, [])


# --- responses ------------------------------------------------------------------------------


class ApiFailure(Exception):
    """An API error answered as ``stat: fail`` with HTTP 200."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str
    fault: str | None = None
    drop: bool = False


def _json_text(obj: Any) -> str:
    # Flickr's PHP encoder escapes every "/" (live.staticflickr.com URLs read "https:\/\/...").
    return json.dumps(obj, separators=(",", ":")).replace("/", "\\/")


# A JavaScript name, dotted names allowed (``jQuery.cb``); anything else could run as script in
# the page that loads the answer, and is left out.
_CALLBACK = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*(?:\.[A-Za-z_$][A-Za-z0-9_$]*)*")
_MAX_CALLBACK = 100


def _render(payload: Mapping[str, Any], params: Mapping[str, str], xml_body: str) -> Response:
    if params.get("format") == "json":
        text = _json_text(payload)
        callback = params.get("jsoncallback", "")
        if len(callback) > _MAX_CALLBACK or not _CALLBACK.fullmatch(callback):
            callback = ""
        if params.get("nojsoncallback") in ("1", "true") and not callback:
            return Response(200, text.encode(), "application/json; charset=utf-8")
        return Response(
            200, f"{callback or 'jsonFlickrApi'}({text})".encode(), "text/javascript; charset=utf-8"
        )
    document = f'<?xml version="1.0" encoding="utf-8" ?>\n{xml_body}'
    return Response(200, document.encode("utf-8"), "text/xml; charset=utf-8")


def _failure(params: Mapping[str, str], code: int, message: str) -> Response:
    payload = {"stat": "fail", "code": code, "message": message}
    xml = f'<rsp stat="fail">\n\t<err code="{code}" msg="{_attr(message)}" />\n</rsp>\n'
    return _render(payload, params, xml)


def _attr(value: Any) -> str:
    return html.escape(str(value), quote=True).replace("&#x27;", "&#039;")


def _text(value: str) -> str:
    return html.escape(value, quote=True).replace("&#x27;", "&#039;")


class Api:
    """The REST methods, answering parsed request parameters."""

    def __init__(self, corpus: Corpus, base_url: str, invalid_key: str) -> None:
        self.corpus = corpus
        self.base_url = base_url
        self.invalid_key = invalid_key

    def answer(self, params: Mapping[str, str], api_key: str) -> Response:
        fmt = params.get("format", "rest")
        if fmt not in ("json", "rest"):
            return _failure({}, 111, f'Format "{fmt}" not found')
        if not api_key or api_key == self.invalid_key:
            return _failure(params, 100, "Invalid API Key (Key has invalid format)")
        method = params.get("method", "")
        handler = {
            "flickr.photos.search": self.search,
            "flickr.photos.getInfo": self.get_info,
        }.get(method)
        if handler is None:
            return _failure(params, 112, f'Method "{method}" not found')
        try:
            payload, xml = handler(params)
        except ApiFailure as failure:
            return _failure(params, failure.code, failure.message)
        return _render({**payload, "stat": "ok"}, params, f'<rsp stat="ok">\n{xml}</rsp>\n')

    # flickr.photos.search

    def search(self, params: Mapping[str, str]) -> tuple[dict[str, Any], str]:
        text, tags = params.get("text", "").strip(), params.get("tags", "").strip()
        if not text and not tags:
            raise ApiFailure(
                3,
                "Parameterless searches have been disabled. Please use flickr.photos.getRecent"
                " instead.",
            )
        matches = self.corpus.search(query_key(text or tags))
        matches = _filter_photos(matches, params)
        matches = _sort_photos(matches, params.get("sort", "date-posted-desc"))
        per_page = _int_param(params, "per_page", DEFAULT_PER_PAGE)
        per_page = DEFAULT_PER_PAGE if per_page < 1 else min(per_page, MAX_PER_PAGE)
        page = max(1, _int_param(params, "page", 1))
        total = len(matches)
        pages = math.ceil(total / per_page)
        reachable = min(total, RESULT_CAP)
        served_page = min(page, max(1, math.ceil(reachable / per_page)))
        start = (served_page - 1) * per_page
        shown = matches[start : min(start + per_page, reachable)]
        extras = {e.strip() for e in params.get("extras", "").split(",") if e.strip()}
        photos = [self._photo_fields(p, extras) for p in shown]
        payload = {
            "photos": {
                "page": page,
                "pages": pages,
                "perpage": per_page,
                "total": total,
                "photo": [fields for fields, _ in photos],
            }
        }
        rows = "".join(_xml_photo(fields, description) for fields, description in photos)
        xml = (
            f'<photos page="{page}" pages="{pages}" perpage="{per_page}" total="{total}">\n'
            f"{rows}</photos>\n"
        )
        return payload, xml

    def _photo_fields(self, p: CorpusPhoto, extras: set[str]) -> tuple[dict[str, Any], str | None]:
        """JSON fields of one search result, and its description (None: not asked)."""
        fields: dict[str, Any] = {
            "id": p.id,
            "owner": p.owner,
            "secret": p.secret,
            "server": p.server,
            "farm": p.farm,
            "title": p.title,
            "ispublic": 1,
            "isfriend": 0,
            "isfamily": 0,
        }
        if "license" in extras:
            fields["license"] = p.license
        description = None
        if "description" in extras:
            description = p.description
            fields["description"] = {"_content": p.description}
        if "date_upload" in extras:
            fields["dateupload"] = str(p.dateupload)
        if "date_taken" in extras:
            fields["datetaken"] = p.datetaken
            fields["datetakengranularity"] = 0
            fields["datetakenunknown"] = "0"
        if "owner_name" in extras:
            fields["ownername"] = p.ownername
        if "tags" in extras:
            fields["tags"] = p.tags
        if "o_dims" in extras and p.width and p.height:
            fields["o_width"] = str(p.width)
            fields["o_height"] = str(p.height)
        if "views" in extras:
            fields["views"] = "0"
        if "media" in extras:
            fields["media"] = "photo"
            fields["media_status"] = "ready"
        for name, suffix, _ in SIZES:
            if f"url_{name}" in extras and name in p.sizes:
                fields[f"url_{name}"] = self.image_url(p, suffix)
                if p.width and p.height:
                    fields[f"height_{name}"] = p.height
                    fields[f"width_{name}"] = p.width
        return fields, description

    def image_url(self, p: CorpusPhoto, suffix: str) -> str:
        return f"{self.base_url}photos/{p.server}/{p.id}_{p.secret}{suffix}.jpg"

    # flickr.photos.getInfo

    def get_info(self, params: Mapping[str, str]) -> tuple[dict[str, Any], str]:
        photo_id = params.get("photo_id", "")
        if not photo_id:
            raise ApiFailure(1, "Required parameter missing")
        p = self.corpus.by_id.get(photo_id)
        if p is None:
            raise ApiFailure(1, f'Photo "{photo_id}" not found (invalid ID)')
        page_url = f"https://www.flickr.com/photos/{p.owner}/{p.id}/"
        tags = [
            {
                "id": f"{p.owner}-{p.id}-{i}",
                "author": p.owner,
                "authorname": p.ownername,
                "raw": tag,
                "_content": tag,
                "machine_tag": 0,
            }
            for i, tag in enumerate(p.tags.split())
        ]
        photo = {
            "id": p.id,
            "secret": p.secret,
            "server": p.server,
            "farm": p.farm,
            "dateuploaded": str(p.dateupload),
            "isfavorite": 0,
            "license": p.license,
            "safety_level": "0",
            "rotation": 0,
            "originalsecret": p.secret,
            "originalformat": "jpg",
            "owner": {
                "nsid": p.owner,
                "username": p.ownername,
                "realname": p.ownername,
                "location": "",
                "iconserver": "0",
                "iconfarm": 0,
                "path_alias": None,
            },
            "title": {"_content": p.title},
            "description": {"_content": p.description},
            "visibility": {"ispublic": 1, "isfriend": 0, "isfamily": 0},
            "dates": {
                "posted": str(p.dateupload),
                "taken": p.datetaken,
                "takengranularity": "0",
                "takenunknown": "0",
                "lastupdate": str(p.dateupload),
            },
            "views": "0",
            "editability": {"cancomment": 0, "canaddmeta": 0},
            "publiceditability": {"cancomment": 1, "canaddmeta": 0},
            "usage": {"candownload": 1, "canblog": 0, "canprint": 0, "canshare": 1},
            "comments": {"_content": "0"},
            "notes": {"note": []},
            "people": {"haspeople": 0},
            "tags": {"tag": tags},
            "urls": {"url": [{"type": "photopage", "_content": page_url}]},
            "media": "photo",
        }
        description = (
            f"\t<description>{_text(p.description)}</description>\n"
            if p.description
            else "\t<description />\n"
        )
        tag_rows = "".join(
            f'\t\t<tag id="{_attr(t["id"])}" author="{_attr(t["author"])}"'
            f' authorname="{_attr(t["authorname"])}" raw="{_attr(t["raw"])}"'
            f' machine_tag="0">{_text(t["_content"])}</tag>\n'
            for t in tags
        )
        xml = (
            f'<photo id="{_attr(p.id)}" secret="{p.secret}" server="{p.server}" farm="{p.farm}"'
            f' dateuploaded="{p.dateupload}" isfavorite="0" license="{_attr(p.license)}"'
            f' safety_level="0" rotation="0" originalsecret="{p.secret}" originalformat="jpg"'
            f' views="0" media="photo">\n'
            f'\t<owner nsid="{_attr(p.owner)}" username="{_attr(p.ownername)}"'
            f' realname="{_attr(p.ownername)}" location="" iconserver="0" iconfarm="0"'
            f' path_alias="" />\n'
            f"\t<title>{_text(p.title)}</title>\n"
            f"{description}"
            f'\t<visibility ispublic="1" isfriend="0" isfamily="0" />\n'
            f'\t<dates posted="{p.dateupload}" taken="{_attr(p.datetaken)}" takengranularity="0"'
            f' takenunknown="0" lastupdate="{p.dateupload}" />\n'
            f'\t<editability cancomment="0" canaddmeta="0" />\n'
            f'\t<publiceditability cancomment="1" canaddmeta="0" />\n'
            f'\t<usage candownload="1" canblog="0" canprint="0" canshare="1" />\n'
            f"\t<comments>0</comments>\n"
            f"\t<notes />\n"
            f'\t<people haspeople="0" />\n'
            + (f"\t<tags>\n{tag_rows}\t</tags>\n" if tags else "\t<tags />\n")
            + f'\t<urls>\n\t\t<url type="photopage">{_text(page_url)}</url>\n\t</urls>\n'
            f"</photo>\n"
        )
        return {"photo": photo}, xml


def _xml_photo(fields: Mapping[str, Any], description: str | None) -> str:
    attrs = " ".join(
        f'{key}="{_attr(value)}"' for key, value in fields.items() if key != "description"
    )
    if description is None:
        return f"\t<photo {attrs} />\n"
    inner = f"<description>{_text(description)}</description>" if description else "<description />"
    return f"\t<photo {attrs}>\n\t\t{inner}\n\t</photo>\n"


def _int_param(params: Mapping[str, str], key: str, default: int) -> int:
    """A page or per_page parameter: a whole number of at most 6 digits, else ``default``, as
    Flickr reads one it cannot (so ``page=`` and 39 digits is not echoed back as 10^38)."""
    number = whole_number(params.get(key, ""), max_digits=6)
    return default if number is None else number


def _timestamp(value: str) -> int | None:
    """A Unix timestamp or MySQL datetime parameter, as Unix seconds (None when unreadable)."""
    value = value.strip()
    if not value:
        return None
    if re.fullmatch(r"-?[0-9]{1,18}", value):
        return int(value)
    for pattern in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
        with contextlib.suppress(ValueError):
            return int(datetime.strptime(value, pattern).replace(tzinfo=UTC).timestamp())
    return None


def _filter_photos(photos: list[CorpusPhoto], params: Mapping[str, str]) -> list[CorpusPhoto]:
    low = _timestamp(params.get("min_upload_date", ""))
    high = _timestamp(params.get("max_upload_date", ""))
    licenses = {x.strip() for x in params.get("license", "").split(",") if x.strip()}
    return [
        p
        for p in photos
        if (low is None or p.dateupload >= low)
        and (high is None or p.dateupload <= high)
        and (not licenses or p.license in licenses)
    ]


def _sort_photos(photos: list[CorpusPhoto], sort: str) -> list[CorpusPhoto]:
    def id_key(p: CorpusPhoto) -> tuple[int, str]:
        number = whole_number(p.id)
        return (-1, p.id) if number is None else (number, p.id)

    if sort.startswith("date-taken"):
        ordered = sorted(photos, key=lambda p: (p.datetaken, id_key(p)))
    else:
        ordered = sorted(photos, key=lambda p: (p.dateupload, id_key(p)))
    return ordered if sort.endswith("-asc") else ordered[::-1]


# --- the HTTP layer -------------------------------------------------------------------------

_IMAGE_PATH = re.compile(
    r"^/photos/(?P<server>[^/]+)/(?P<id>[^/_]+)_(?P<secret>[^/_]+)(?P<suffix>_[a-z]+)?\.jpg$"
)
_OAUTH_KEY = re.compile(r'oauth_consumer_key="([^"]*)"')


class ServerOptions(TypedDict, total=False):
    """Options that ``make_server`` and ``serve`` pass on to ``FlickrServer`` (defaults there)."""

    faults: Faults
    invalid_key: str
    request_log: str | Path | None
    client_timeout: float


class FlickrServer(ThreadingHTTPServer):
    """The HTTP server; ``base_url`` is where it listens (``http://host:port/``)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        corpus: Corpus,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        faults: Faults = Faults(),
        invalid_key: str = DEFAULT_INVALID_KEY,
        request_log: str | Path | None = None,
        client_timeout: float = DEFAULT_CLIENT_TIMEOUT,
    ) -> None:
        super().__init__((host, port), _Handler)
        self.client_timeout = client_timeout
        self.base_url = f"http://{host}:{self.server_address[1]}/"
        self.api_url = f"{self.base_url}services/rest/"
        self.corpus = corpus
        self.api = Api(corpus, self.base_url, invalid_key)
        self.faults = faults
        self._rng = random.Random(faults.seed)
        self._lock = threading.Lock()
        self._log = open(request_log, "a", encoding="utf-8") if request_log else None  # noqa: SIM115

    def draw(self) -> float:
        with self._lock:
            return self._rng.random()

    def photo_fault(self, kind: str, photo_id: str) -> bool:
        fraction = getattr(self.faults, kind)
        if fraction <= 0:
            return False
        digest = hashlib.sha256(f"{self.faults.seed}:{kind}:{photo_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < fraction

    def record(self, entry: dict[str, Any]) -> None:
        if self._log is None:
            return
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock:
            self._log.write(line)
            self._log.flush()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that goes away mid-answer (a killed crawler, a closed pool) is routine here.
        log.debug("connection from %s ended early", client_address, exc_info=True)

    def server_close(self) -> None:
        super().server_close()
        if self._log is not None:
            self._log.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle's algorithm the body would wait for
    # the client's delayed ACK of the headers (40 ms on Linux).
    disable_nagle_algorithm = True
    server: FlickrServer

    def setup(self) -> None:
        # A client that goes silent (half a request, a body shorter than it declared, an idle
        # keep-alive connection) gives its thread back after this long.
        self.timeout = self.server.client_timeout
        super().setup()

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _handle(self) -> None:
        entry: dict[str, Any] = {"t": round(time.time(), 6), "verb": self.command}
        entry["path"] = self.path[:200]  # the URL's path once it is read
        body = self._body()
        if isinstance(body, Response):
            # Where this request's body ends is unknown, so the connection cannot carry another.
            self.close_connection = True
            response = body
        else:
            try:
                response = self._answer(body, entry)
            except Exception:  # a bug must still be answered, not end the connection unanswered
                log.exception("answering %s %s", self.command, self.path[:200])
                response = Response(500, HTTP_500_BODY, "text/html; charset=utf-8")
        if self.server.faults.latency:
            time.sleep(self.server.faults.latency)
        entry.update(status=response.status, bytes=len(response.body), fault=response.fault)
        self.server.record(entry)
        if response.drop:
            self.close_connection = True
            return
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(response.body)

    def _body(self) -> bytes | Response:
        """The request's body (empty when there is none), or the answer to one that cannot be
        read."""
        if "Transfer-Encoding" in self.headers:  # flickrapi always sends a Content-Length
            return _http_error(411, "send the body with a Content-Length")
        declared = {value.strip() for value in self.headers.get_all("Content-Length", [])}
        if not declared:
            return b""
        length_text = declared.pop() if len(declared) == 1 else ""  # two lengths: which one?
        if not re.fullmatch(r"[0-9]+", length_text):
            return _http_error(400, "Content-Length must be one whole number of bytes")
        length_text = length_text.lstrip("0") or "0"
        if len(length_text) > len(str(MAX_BODY)) or int(length_text) > MAX_BODY:
            return _http_error(413, f"a request body may hold {MAX_BODY} bytes at most")
        length = int(length_text)
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            return _http_error(408, f"the body did not arrive within {self.timeout} s")
        if len(body) < length:
            return _http_error(400, "the body ended before its Content-Length")
        return body

    def _answer(self, body: bytes, entry: dict[str, Any]) -> Response:
        try:
            url = urlsplit(self.path)
        except ValueError:  # an absolute URL with an unreadable host, e.g. "http://[x/"
            return _http_error(400, "unreadable request target")
        entry["path"] = url.path
        if url.path.rstrip("/") == "/services/rest":
            params = dict(parse_qsl(url.query, keep_blank_values=True))
            if body:
                params.update(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
            entry["method"] = params.get("method", "")
            entry["params"] = {k: v for k, v in params.items() if k not in ("api_key", "method")}
            return self._fault(params) or self.server.api.answer(params, _api_key(self, params))
        if match := _IMAGE_PATH.match(url.path):
            entry["photo_id"] = match["id"]
            return self._fault(None) or self._image(match)
        return Response(404, b"", "text/html; charset=utf-8")

    def _fault(self, api_params: Mapping[str, str] | None) -> Response | None:
        """A faulty answer for this request, or None; ``api_params`` is None for images."""
        faults = self.server.faults
        u = self.server.draw()
        if u < faults.error_500:
            return Response(500, HTTP_500_BODY, "text/html; charset=utf-8", fault="500")
        u -= faults.error_500
        if u < faults.error_429:
            return Response(429, HTTP_429_BODY, "text/html; charset=utf-8", fault="429")
        u -= faults.error_429
        if u < faults.drop:
            return Response(0, b"", "", fault="drop", drop=True)
        u -= faults.drop
        if api_params is not None and u < faults.unavailable:
            code, message = _TRANSIENT_API_ERRORS[int(u / faults.unavailable * 3) % 3]
            response = _failure(api_params, code, message)
            response.fault = f"api_{code}"
            return response
        return None

    def _image(self, match: re.Match[str]) -> Response:
        photo = self.server.corpus.by_id.get(match["id"])
        size = _SUFFIXES.get(match["suffix"] or "")
        if photo is None or match["secret"] != photo.secret or size not in photo.sizes:
            return Response(404, b"", "text/html; charset=utf-8")
        if self.server.photo_fault("not_image", photo.id):
            return Response(200, NOT_AN_IMAGE_BODY, "text/html; charset=utf-8", fault="not_image")
        # The corpus holds each image's resolved path, inside the corpus folder; a path that
        # resolves elsewhere now has had a symlink put in it since the corpus was loaded.
        if photo.image.resolve() != photo.image:
            return Response(404, b"", "text/html; charset=utf-8")
        try:
            # Not read_bytes: a FIFO put in place of the image since the start would hold this
            # thread for ever, and a device such as /dev/zero would never end.
            data = read_regular_file(photo.image, MAX_IMAGE_BYTES)
        except (OSError, UnsafeFile):
            return Response(404, b"", "text/html; charset=utf-8")
        if self.server.photo_fault("truncated", photo.id):
            return Response(200, data[: len(data) // 2], photo.mime, fault="truncated")
        return Response(200, data, photo.mime)


def _http_error(status: int, why: str) -> Response:
    body = f"<html><body><h1>{status} {HTTPStatus(status).phrase}</h1>\n{html.escape(why)}\n"
    return Response(status, f"{body}</body></html>\n".encode(), "text/html; charset=utf-8")


def _api_key(handler: BaseHTTPRequestHandler, params: Mapping[str, str]) -> str:
    """The key of a call: the ``api_key`` parameter, or the OAuth consumer key flickrapi signs with."""
    if params.get("api_key"):
        return params["api_key"]
    if params.get("oauth_consumer_key"):
        return params["oauth_consumer_key"]
    match = _OAUTH_KEY.search(handler.headers.get("Authorization", ""))
    return match.group(1) if match else ""


def make_server(
    corpus_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 0,
    **options: Unpack[ServerOptions],
) -> FlickrServer:
    """A bound server over the corpus in ``corpus_dir``; call ``serve_forever`` to run it."""
    return FlickrServer(Corpus(load_corpus(corpus_dir)), host, port, **options)


@contextlib.contextmanager
def serve(
    corpus_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 0,
    **options: Unpack[ServerOptions],
) -> Iterator[str]:
    """Run the server in a background thread; yields its base URL (``http://127.0.0.1:PORT/``).

    The REST endpoint is ``BASE + "services/rest/"``. With ``request_log``, every request is
    appended to that file as one JSON line (method, path, photo id, status, bytes, fault). A
    client silent for ``client_timeout`` seconds is answered 408 or disconnected.
    """
    server = make_server(corpus_dir, host, port, **options)
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), name="flickr-server", daemon=True
    )
    thread.start()
    try:
        yield server.base_url
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
