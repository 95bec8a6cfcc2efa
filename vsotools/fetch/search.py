"""How the photos of one ANP are gathered: pages, the 4,000-result cap, upload-date windows.

``search_anp`` asks for pages through a ``call`` function and yields, page by page, the ids this
ANP's search counts, never more than ``per_anp`` in all. Every call is bounded above by the crawl's
snapshot time (``max_upload_date``), so the results do not shift while a long crawl runs and a
resumed crawl asks the same questions in the same order: the caller can answer repeated calls
from its records instead of the API.

Flickr returns at most 4,000 results of one query. When an ANP has more and the limit asks for
more than that, the upload-date range is halved (newer half first) until each window holds at
most 4,000 results.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

RESULT_CAP = 4000
SORT = "date-posted-desc"


@dataclass(frozen=True)
class PageSummary:
    """What the search algorithm needs of a page: the result count and the photo ids."""

    total: int
    ids: Sequence[str]


@dataclass(frozen=True)
class Query:
    """One ANP's search, as API parameters common to all its calls."""

    anp: str
    params: Mapping[str, str]
    """text or tags (+ tag_mode), extras, license, media; page and dates are added per call."""


def anp_query(
    anp: str,
    adjective: str,
    noun: str,
    *,
    mode: str,
    extras: Sequence[str],
    sizes: Sequence[str] = (),
    licenses: Sequence[int] = (),
) -> Query:
    """The search for an ANP: its two words as free text, or both as tags (``tag_mode=all``).

    The ``url_*`` extras of ``sizes`` are asked for too, if ``extras`` lacks them.
    """
    noun_words = noun.replace("_", " ")
    extras = list(dict.fromkeys([*extras, *sizes]))
    params = {"media": "photos", "sort": SORT, "extras": ",".join(extras)}
    if mode == "tags":
        params.update(tags=f"{adjective},{noun_words}", tag_mode="all")
    else:
        params["text"] = f"{adjective} {noun_words}"
    if licenses:
        params["license"] = ",".join(str(lic) for lic in licenses)
    return Query(anp=anp, params=params)


def search_anp(
    query: Query,
    call: Callable[[dict[str, str]], PageSummary],
    *,
    per_anp: int,
    per_page: int,
    snapshot: int,
    cap: int = RESULT_CAP,
) -> Iterator[list[str]]:
    """Yield, after each call, the ids it added to this ANP's results (at most ``per_anp`` in all).

    ``call(params)`` makes (or replays) one ``flickr.photos.search`` call. Windows are inclusive
    ``[min_upload_date, max_upload_date]`` ranges of Unix seconds.
    """
    found: set[str] = set()
    windows = [(0, snapshot)]  # a stack: the newest window is on top
    while windows and len(found) < per_anp:
        low, high = windows.pop()
        params = {**query.params, "per_page": str(per_page), "max_upload_date": str(high)}
        if low > 0:
            params["min_upload_date"] = str(low)
        page = 1
        summary = call({**params, "page": "1"})
        remaining = per_anp - len(found)
        if summary.total > cap and remaining > cap and low < high:
            middle = (low + high) // 2
            windows += [(low, middle), (middle + 1, high)]
            continue
        if summary.total > cap and remaining > cap:
            log.warning(
                "%s: %d results uploaded in one second; only the first %d can be reached",
                query.anp,
                summary.total,
                cap,
            )
        while True:
            new = [i for i in dict.fromkeys(summary.ids) if i not in found]
            new = new[: per_anp - len(found)]
            found.update(new)
            yield new
            last_page = math.ceil(min(summary.total, cap) / per_page)
            if len(found) >= per_anp or page >= last_page or not summary.ids:
                break
            page += 1
            summary = call({**params, "page": str(page)})
