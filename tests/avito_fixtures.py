"""Raw Avito Context Ad Clicks files in the exact Kaggle layout, quirks included.

`make_avito` draws a seeded data set in plain Python (it is also the oracle the tests count
against); `write_avito` writes it as the Kaggle TSV files: a header row, tab-separated, no quoting,
empty fields for missing values, titles and queries in Russian with quote characters, SearchParams
such as ``{45:'Кровати', 816:'Одинарные'}``, SearchDate such as ``2015-05-10 18:11:01.0``.

Planted on purpose: searches with no contextual ad, regular and highlighted ads with empty
HistCTR/IsClick, contextual ads sharing a Position, a search with no SearchInfo row, a contextual
ad with no AdsInfo row, users with no UserInfo row, ads with an empty Price or LocationID, and one
hand-written search (KNOWN_SEARCH) whose every feature the tests check end to end.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

START = datetime(2015, 4, 25)
DAYS = 28

KNOWN_SEARCH = 77_000_001
KNOWN_USER = 9_000_001
KNOWN_DATE = datetime(2015, 5, 10, 18, 11, 1)
# (AdID, Position, HistCTR, IsClick) of its contextual ads; 7002 and 7001 tie at Position 1.
KNOWN_CONTEXT_ADS = [(7003, 7, "0.012345", 1), (7002, 1, "0.1", 0), (7001, 1, "0.003", 0)]
KNOWN_ORDER = [7001, 7002, 7003]
NO_INFO_SEARCH = 77_000_002  # in the stream with contextual ads and a click, not in SearchInfo
NO_CONTEXT_SEARCH = 77_000_003  # only regular and highlighted ads
MISSING_AD = 7999  # a contextual ad with no AdsInfo row

TITLES = ['Кровать "Аскона" 160x200', "Диван 'Честер' угловой", "iPhone 6 16Gb",
          'Шкаф-купе "Лидер"', "Коляска 2 в 1", 'Велосипед "Stels" 26"', "Платье, р. 44"]
QUERIES = ["кровать", 'диван "угловой"', "iphone 6", "коляска зимняя", "шкаф"]
SEARCH_PARAMS = ["{45:'Кровати', 816:'Одинарные'}", "{83:'Обувь', 175:'Женская одежда', 88:'38'}",
                 "{5:'Запчасти'}"]
AD_PARAMS = ["{817:'Кузов', 5:'Запчасти', 598:'Для автомобилей'}", "{45:'Кровати'}"]

CATEGORIES = {1: (1, None), 2: (1, None), 10: (2, 1), 11: (2, 1), 20: (2, 2), 21: (2, 2)}
LOCATIONS = {100: (1, 100, None), 101: (2, 100, 1011), 102: (2, 100, 1021),
             200: (1, 200, None), 201: (2, 200, 2011)}


@dataclass
class Search:
    date: datetime
    user_id: int
    logged_on: int
    query: str  # "" when empty
    location_id: int | None
    category_id: int | None
    params: str  # "" when empty


@dataclass
class Ad:
    location_id: int | None
    category_id: int | None
    params: str
    price: float | None
    title: str
    is_context: int


@dataclass
class AvitoData:
    """What the files hold. stream rows: (SearchID, AdID, Position, ObjectType, HistCTR, IsClick)
    with HistCTR and IsClick as written ("" when empty)."""

    stream: list[tuple[int, int, int, int, str, str]] = field(default_factory=list)
    searches: dict[int, Search] = field(default_factory=dict)
    ads: dict[int, Ad] = field(default_factory=dict)
    users: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)


def make_avito(searches: int = 300, seed: int = 0) -> AvitoData:
    """About `searches` searches over 28 days; ~6 stream rows per search."""
    rng = random.Random(seed)
    data = AvitoData()
    context_ads = list(range(5000, 5060))
    for ad_id in range(1000, 1200):
        data.ads[ad_id] = _ad(rng, is_context=0)
    for ad_id in context_ads:
        data.ads[ad_id] = _ad(rng, is_context=1)
    data.ads[7001] = Ad(101, 10, AD_PARAMS[1], 15000.0, 'Кровать "Аскона" 160x200', 1)
    data.ads[7002] = Ad(None, 20, "", None, "Диван 'Честер'", 1)
    data.ads[7003] = Ad(201, 21, "", 0.0, "", 1)

    users = list(range(9_000_100, 9_000_100 + max(20, searches // 5)))
    for user_id in users:
        if rng.random() < 0.8:  # the others have no UserInfo row
            data.users[user_id] = (rng.randrange(1, 50), rng.randrange(1, 10),
                                   rng.randrange(1, 30), rng.randrange(1, 8))
    data.users[KNOWN_USER] = (11, 12, 13, 14)

    search_ids = rng.sample(range(10_000_000, 60_000_000), searches)
    locations, categories = [*LOCATIONS, None], [*CATEGORIES, None]
    stream = data.stream
    for search_id in search_ids:
        data.searches[search_id] = Search(
            date=START + timedelta(seconds=int(rng.random() * DAYS * 86400)),
            user_id=rng.choice(users),
            logged_on=int(rng.random() < 0.5),
            query=rng.choice(QUERIES) if rng.random() < 0.4 else "",
            location_id=rng.choice(locations),
            category_id=rng.choice(categories),
            params=rng.choice(SEARCH_PARAMS) if rng.random() < 0.3 else "",
        )
        for position in range(1, 2 + int(rng.random() * 5)):
            stream.append((search_id, 1000 + int(rng.random() * 200), position,
                           1 if rng.random() < 0.67 else 2, "", ""))
        if rng.random() < 0.8:
            positions = [1, 7] if rng.random() < 0.7 else [1, 1, 7]  # ties at Position 1
            for position, ad_id in zip(positions, rng.sample(context_ads, len(positions)),
                                       strict=True):
                data.stream.append((search_id, ad_id, position, 3,
                                    str(round(rng.uniform(0.0005, 0.1), 6)),
                                    "1" if rng.random() < 0.15 else "0"))

    data.searches[KNOWN_SEARCH] = Search(KNOWN_DATE, KNOWN_USER, 1, 'диван "угловой"', 102, 11,
                                         "{45:'Кровати', 816:'Одинарные'}")
    data.stream.append((KNOWN_SEARCH, 1001, 2, 1, "", ""))
    data.stream.append((KNOWN_SEARCH, 1002, 3, 2, "", ""))
    for ad_id, position, ctr, click in KNOWN_CONTEXT_ADS:
        data.stream.append((KNOWN_SEARCH, ad_id, position, 3, ctr, str(click)))
    data.stream += [(NO_INFO_SEARCH, 5001, 1, 3, "0.05", "1"),
                    (NO_INFO_SEARCH, 5002, 7, 3, "0.01", "0")]
    data.searches[NO_CONTEXT_SEARCH] = Search(START + timedelta(days=3), users[0], 0, "", None,
                                              None, "")
    data.stream += [(NO_CONTEXT_SEARCH, 1003, 1, 1, "", ""),
                    (NO_CONTEXT_SEARCH, 1004, 2, 2, "", "")]
    data.stream.append((search_ids[0], MISSING_AD, 8, 3, "0.02", "1"))
    rng.shuffle(data.stream)
    return data


def _ad(rng: random.Random, is_context: int) -> Ad:
    return Ad(
        location_id=rng.choice([*LOCATIONS, None]),
        category_id=rng.choice(list(CATEGORIES)),
        params=rng.choice(AD_PARAMS) if rng.random() < 0.5 else "",
        price=None if rng.random() < 0.2 else float(rng.randrange(100, 100000)),
        title=rng.choice(TITLES),
        is_context=is_context,
    )


def _cell(value) -> str:
    return "" if value is None else str(value)


def write_avito(data: AvitoData, raw_dir: Path, *, optional: bool = True) -> Path:
    """Write the Kaggle files into raw_dir (UserInfo, Category and Location when `optional`)."""
    raw_dir.mkdir(parents=True, exist_ok=True)

    def write(name: str, header: list[str], rows) -> None:
        with (raw_dir / name).open("w", encoding="utf-8", newline="\n") as f:
            f.write("\t".join(header) + "\n")
            f.writelines("\t".join(map(_cell, row)) + "\n" for row in rows)

    with (raw_dir / "trainSearchStream.tsv").open("w", encoding="utf-8", newline="\n") as f:
        f.write("SearchID\tAdID\tPosition\tObjectType\tHistCTR\tIsClick\n")
        f.writelines(f"{s}\t{a}\t{p}\t{o}\t{c}\t{k}\n" for s, a, p, o, c, k in data.stream)
    write("SearchInfo.tsv",
          ["SearchID", "SearchDate", "IPID", "UserID", "IsUserLoggedOn", "SearchQuery",
           "LocationID", "CategoryID", "SearchParams"],
          ((sid, f"{s.date:%Y-%m-%d %H:%M:%S}.0", 1000 + sid % 977, s.user_id, s.logged_on,
            s.query, s.location_id, s.category_id, s.params)
           for sid, s in data.searches.items()))
    write("AdsInfo.tsv",
          ["AdID", "LocationID", "CategoryID", "Params", "Price", "Title", "IsContext"],
          ((aid, a.location_id, a.category_id, a.params, a.price, a.title, a.is_context)
           for aid, a in data.ads.items()))
    if optional:
        write("UserInfo.tsv",
              ["UserID", "UserAgentID", "UserAgentOSID", "UserDeviceID", "UserAgentFamilyID"],
              ((uid, *u) for uid, u in data.users.items()))
        write("Category.tsv", ["CategoryID", "Level", "ParentCategoryID"],
              ((cid, *c) for cid, c in CATEGORIES.items()))
        write("Location.tsv", ["LocationID", "Level", "RegionID", "CityID"],
              ((lid, *loc) for lid, loc in LOCATIONS.items()))
    return raw_dir


@dataclass
class Expected:
    """The requests the converter must write, computed by plain Python over the data."""

    exposures: dict[int, list[tuple[int, int, float, int]]]  # SearchID -> (pos, ad, ctr, click)
    day: dict[int, int]  # SearchID -> day index, for searches with a SearchInfo row
    dropped: set[int]  # SearchIDs with contextual ads but no SearchInfo row


def expected_requests(data: AvitoData) -> Expected:
    exposures: dict[int, list] = {}
    for search_id, ad_id, position, object_type, ctr, click in data.stream:
        if object_type == 3:
            exposures.setdefault(search_id, []).append((position, ad_id, float(ctr), int(click)))
    for rows in exposures.values():
        rows.sort()
    placed = [s for s in exposures if s in data.searches]
    first = min(data.searches[s].date.date() for s in placed)
    day = {s: (data.searches[s].date.date() - first).days for s in placed}
    return Expected(exposures, day, {s for s in exposures if s not in data.searches})
