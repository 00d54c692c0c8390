"""Time expressions in a question -> periods in the city's time zone.

A table of small rules, each a pattern and a function that resolves its match against
"now" (:data:`RULES`, tried in order; a match may not overlap an earlier one). Explicit
dates that the rules do not spell out themselves ("25/11", "Nov. 25th 2025") go
through ``dateparser``. On top of the periods come the filters: parts of the day and
rush hours (an hour-of-day window), and weekdays or weekends.

Conventions (README: what /ask understands): "last week" is the previous Monday-to-
Monday week, "the past week" and "the last 7 days" the 7 days up to now; "this week" and
"all week" run from Monday to now; "since X" runs from the start of X to now; a range
"between 5 and 12 November" includes both end days; "the week before" is the 7 days
before the period it follows. Morning is 06-12, afternoon 12-18, evening 18-24, night
00-06 ("last night" 18-06), the morning rush hour 07-10 and the evening one 16-19.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

DAY = timedelta(days=1)
WEEKDAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
MONTHS = (
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
)
MONTH_ABBR = {m[:3]: i + 1 for i, m in enumerate(MONTHS)} | {"sept": 9}
NUMBER_WORDS = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "fourteen": 14,
    "twenty": 20,
    "thirty": 30,
    "a": 1,
    "an": 1,
    "couple of": 2,
    "few": 3,
    "several": 3,
}
PARTS_OF_DAY = {
    "morning": (6, 12),
    "afternoon": (12, 18),
    "evening": (18, 24),
    "night": (0, 6),
    "rush hour": (7, 10),
    "morning rush hour": (7, 10),
    "evening rush hour": (16, 19),
    "lunchtime": (12, 14),
    "daytime": (6, 18),
    "overnight": (0, 6),
}
DAYS_FILTERS = ("weekdays", "weekends")
_WD = "|".join(WEEKDAY_NAMES)
_MONTH_RE = "|".join(sorted(list(MONTHS) + list(MONTH_ABBR), key=len, reverse=True))
_NUM = r"\d+|" + "|".join(sorted(NUMBER_WORDS, key=len, reverse=True))


@dataclass(frozen=True, slots=True)
class Period:
    """``[start_ms, end_ms)``, optionally only ``days`` (weekdays or weekends) and only
    the local hours ``[hours[0], hours[1])`` of each day."""

    start_ms: int
    end_ms: int
    label: str
    days: str | None = None
    hours: tuple[int, int] | None = None

    def to_dict(self, tz: ZoneInfo) -> dict[str, Any]:
        out: dict[str, Any] = {
            "start": datetime.fromtimestamp(self.start_ms / 1000, tz).isoformat(),
            "end": datetime.fromtimestamp(self.end_ms / 1000, tz).isoformat(),
            "label": self.label,
        }
        if self.days:
            out["days"] = self.days
        if self.hours:
            out["hours"] = list(self.hours)
        return out

    def filter_text(self) -> str:
        parts = [self.days] if self.days else []
        if self.hours:
            parts.append(f"{self.hours[0]:02d}:00-{self.hours[1] % 24:02d}:00 only")
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class Clock:
    now: datetime  # aware, in the city's zone

    @property
    def tz(self) -> ZoneInfo:
        assert isinstance(self.now.tzinfo, ZoneInfo)
        return self.now.tzinfo

    @property
    def today(self) -> date:
        return self.now.date()

    def midnight(self, day: date) -> datetime:
        return datetime(day.year, day.month, day.day, tzinfo=self.tz)

    def at(self, day: date, hour: int) -> datetime:
        """Local ``hour`` of ``day`` (24 = the next midnight), through the zone."""
        if hour >= 24:
            return self.midnight(day + DAY)
        return datetime(day.year, day.month, day.day, hour, tzinfo=self.tz)

    @property
    def monday(self) -> datetime:
        return self.midnight(self.today - timedelta(days=self.today.weekday()))

    def period(self, start: datetime, end: datetime, label: str) -> Period:
        end = min(end, self.now) if start < self.now else end
        return Period(int(start.timestamp() * 1000), int(end.timestamp() * 1000), label)


Span = tuple[datetime, datetime]
Resolver = Callable[[re.Match[str], Clock], Span | None]


def _number(token: str) -> int | None:
    return int(token) if token.isdigit() else NUMBER_WORDS.get(token)


def _month_start(year: int, month: int) -> date:
    return date(year + (month - 1) // 12, (month - 1) % 12 + 1, 1)


def _back_to(clock: Clock, weekday: str, skip_today: bool = False) -> date:
    back = (clock.today.weekday() - WEEKDAY_NAMES.index(weekday)) % 7
    if back == 0 and skip_today:
        back = 7
    return clock.today - timedelta(days=back)


def _whole_day(clock: Clock, day: date) -> Span:
    return clock.midnight(day), clock.midnight(day + DAY)


def _past_day(day: date, clock: Clock, year_given: bool) -> date:
    if not year_given and day > clock.today:
        return day.replace(year=day.year - 1)
    return day


# ------------------------------------------------------------------- dates as words


def day_of(text: str, clock: Clock, month_hint: int | None = None) -> date | None:
    """The calendar day ``text`` names ("25 november", "nov 25th 2025", "2026-11-03",
    "25/11", "monday", "yesterday", "the 5th"), in the past of ``clock``; None if none."""
    text = text.strip().removeprefix("the ").removeprefix("on ").strip()
    if text in ("today", "now"):
        return clock.today
    if text == "yesterday":
        return clock.today - DAY
    m = re.fullmatch(rf"(?:last |this |previous )?({_WD})", text)
    if m:
        return _back_to(clock, m.group(1), text.startswith(("last", "previous")))
    m = re.fullmatch(r"(\d{1,2})(?:st|nd|rd|th)?", text)
    if m and month_hint is not None:
        try:
            return _past_day(date(clock.today.year, month_hint, int(m.group(1))), clock, False)
        except ValueError:
            return None
    if m:
        return _ordinal_day(int(m.group(1)), clock)
    return _parsed_day(text, clock)


def _ordinal_day(number: int, clock: Clock) -> date | None:
    """ "the 10th" with no month: this month's, or last month's when it is still to come."""
    first = clock.today.replace(day=1)
    for month_first in (first, (first - DAY).replace(day=1)):
        try:
            day = month_first.replace(day=number)
        except ValueError:
            continue
        if day <= clock.today:
            return day
    return None


def _parsed_day(text: str, clock: Clock) -> date | None:
    if not re.search(r"\d", text):
        return None
    import dateparser  # imported on first use: its language data takes a moment to load

    settings: Any = {
        "RELATIVE_BASE": clock.now.replace(tzinfo=None),
        "PREFER_DATES_FROM": "past",
        "DATE_ORDER": "DMY",
        "REQUIRE_PARTS": ["day", "month"],
        "RETURN_AS_TIMEZONE_AWARE": False,
    }
    parsed = dateparser.parse(text, languages=["en"], settings=settings)
    if parsed is None:
        return None
    year_given = re.search(r"\b\d{4}\b|/\d{2,4}$", text) is not None
    return _past_day(parsed.date(), clock, year_given)


# ------------------------------------------------------------------------ the rules

_DATE = (
    r"\d{4}-\d{2}-\d{2}|(?<![\w.])\d{1,2}/\d{1,2}(?:/\d{2,4})?(?![\w.])|\d{1,2}\.\d{1,2}\.\d{4}"
    rf"|\d{{1,2}}(?:st|nd|rd|th)?(?: of)? (?:{_MONTH_RE})\.?(?: \d{{4}})?"
    rf"|(?:{_MONTH_RE})\.? \d{{1,2}}(?:st|nd|rd|th)?(?:,? \d{{4}})?"
)
_DAYWORD = rf"{_DATE}|(?:last |this |previous )?(?:{_WD})|yesterday|today"
_ENDPOINT = rf"(?:the )?(?:{_DAYWORD}|\d{{1,2}}(?:st|nd|rd|th)?)"


def _range(first_text: str, last_text: str, clock: Clock) -> Span | None:
    if re.fullmatch(r"\d{1,2}", last_text.strip()):  # "between 7 and 9": hours, not days
        return None
    last = day_of(last_text, clock)
    if last is None:
        return None
    first = day_of(first_text, clock, month_hint=last.month)
    if first is None:
        return None
    if first > last:  # "25 December to 3 January": the first day is in the year before
        first = first.replace(year=first.year - 1)
    return clock.midnight(first), clock.midnight(last + DAY)


def _month_days(m: re.Match[str], clock: Clock) -> Span | None:
    """ "oct 20-22", "november 3 to 5": both days of that month."""
    month = MONTH_ABBR[m.group("mon")[:3]]
    name = MONTHS[month - 1]
    return _range(f"{m.group('d1')} {name}", f"{m.group('d2')} {name}", clock)


def _week_of(m: re.Match[str], clock: Clock) -> Span | None:
    """ "the week starting 2 November": seven days from that day."""
    day = day_of(m.group("d"), clock)
    return None if day is None else (clock.midnight(day), clock.midnight(day + 7 * DAY))


# Holidays on a fixed date (month, day): the last one that has begun.
HOLIDAYS = {
    "new year's day": (1, 1),
    "new year's eve": (12, 31),
    "hogmanay": (12, 31),
    "valentine's day": (2, 14),
    "st patrick's day": (3, 17),
    "halloween": (10, 31),
    "bonfire night": (11, 5),
    "guy fawkes night": (11, 5),
    "guy fawkes day": (11, 5),
    "guy fawkes": (11, 5),
    "christmas eve": (12, 24),
    "christmas day": (12, 25),
    "christmas": (12, 25),
    "boxing day": (12, 26),
}
_HOLIDAY_RE = "|".join(
    re.escape(h).replace("'", "'?") for h in sorted(HOLIDAYS, key=len, reverse=True)
)


def _holiday(m: re.Match[str], clock: Clock) -> Span:
    name = m.group(1).replace("'", "")
    month, day_number = next(v for k, v in HOLIDAYS.items() if k.replace("'", "") == name)
    day = _past_day(date(clock.today.year, month, day_number), clock, False)
    return _whole_day(clock, day)


_NTH = {"first": 0, "second": 1, "third": 2, "fourth": 3, "1st": 0, "2nd": 1, "3rd": 2, "4th": 3}


def _week_of_month(m: re.Match[str], clock: Clock) -> Span:
    """ "the first week of November": days 1-7 (the last week: its last 7 days)."""
    month = MONTHS.index(m.group(2)) + 1
    year = int(m.group(3)) if m.group(3) else clock.today.year
    if not m.group(3) and _month_start(year, month) > clock.today:
        year -= 1
    first, after = _month_start(year, month), _month_start(year, month + 1)
    if m.group(1) == "last":
        return clock.midnight(after - 7 * DAY), clock.midnight(after)
    start = first + _NTH[m.group(1)] * 7 * DAY
    return clock.midnight(start), clock.midnight(start + 7 * DAY)


def _weekend_of(m: re.Match[str], clock: Clock) -> Span | None:
    """ "the weekend of the 7th": the Saturday and Sunday of that day's week (the day
    itself when it is one of them)."""
    day = day_of(m.group("d"), clock)
    if day is None:
        return None
    saturday = day + timedelta(days=5 - day.weekday()) if day.weekday() < 5 else day
    if day.weekday() == 6:
        saturday = day - DAY
    return clock.midnight(saturday), clock.midnight(saturday + 2 * DAY)


def _ordinal(m: re.Match[str], clock: Clock) -> Span | None:
    day = _ordinal_day(int(m.group(1)), clock)
    return None if day is None else _whole_day(clock, day)


def _one_date(m: re.Match[str], clock: Clock) -> Span | None:
    day = day_of(m.group(0), clock)
    return None if day is None else _whole_day(clock, day)


def _whole_month(m: re.Match[str], clock: Clock) -> Span:
    month = MONTHS.index(m.group(1)) + 1
    year = int(m.group(2)) if m.group(2) else clock.today.year
    if not m.group(2) and _month_start(year, month) > clock.today:
        year -= 1
    first = _month_start(year, month)
    return clock.midnight(first), clock.midnight(_month_start(year, month + 1))


_UNITS = {"hour": timedelta(hours=1), "day": DAY, "week": 7 * DAY, "month": 30 * DAY}


def _last_n(m: re.Match[str], clock: Clock) -> Span | None:
    n = _number(m.group(1))
    if n is None or n <= 0:
        return None
    return clock.now - n * _UNITS[m.group(2)], clock.now


def _ago(m: re.Match[str], clock: Clock) -> Span | None:
    n = _number(m.group(1))
    if n is None or n <= 0:
        return None
    if m.group(2) == "week":
        start = clock.monday - n * 7 * DAY
        return start, start + 7 * DAY
    start = clock.midnight(clock.today - n * DAY)
    return start, start + DAY


def _day_part(m: re.Match[str], clock: Clock) -> Span:
    word = m.group(1)
    if word == "yesterday":
        day = clock.today - DAY
    elif word in ("this", "today", "today's"):
        day = clock.today
    else:
        day = _back_to(clock, word.removeprefix("last ").strip(), word.startswith("last"))
    lo, hi = PARTS_OF_DAY[m.group(2)]
    return clock.at(day, lo), clock.at(day, hi)


def _last_night(m: re.Match[str], clock: Clock) -> Span:
    return clock.at(clock.today - DAY, 18), clock.at(clock.today, 6)


def _weekday(m: re.Match[str], clock: Clock) -> Span:
    last = m.group(0).startswith(("last", "previous", "past"))
    day = _back_to(clock, m.group(1), skip_today=last)
    if day == clock.today:  # "on Monday" asked on a Monday: today so far
        return clock.midnight(day), clock.now
    return _whole_day(clock, day)


def _fixed(resolve: Callable[[Clock], Span]) -> Resolver:
    return lambda m, clock: resolve(clock)


def _last_weekend(clock: Clock) -> Span:
    return clock.monday - 2 * DAY, clock.monday


def _this_weekend(clock: Clock) -> Span:
    saturday = clock.monday + 5 * DAY
    if saturday > clock.now:
        saturday -= 7 * DAY
    return saturday, saturday + 2 * DAY


def _last_month(clock: Clock) -> Span:
    first = clock.today.replace(day=1)
    return clock.midnight(_month_start(first.year, first.month - 1)), clock.midnight(first)


def _month_before_last(clock: Clock) -> Span:
    first = clock.today.replace(day=1)
    return (
        clock.midnight(_month_start(first.year, first.month - 2)),
        clock.midnight(_month_start(first.year, first.month - 1)),
    )


def _year(m: re.Match[str], clock: Clock) -> Span:
    year = clock.today.year
    if m.group(0).startswith("this") or m.group(0).startswith("so far"):
        return clock.midnight(date(year, 1, 1)), clock.now
    return clock.midnight(date(year - 1, 1, 1)), clock.midnight(date(year, 1, 1))


def _at_hour(m: re.Match[str], clock: Clock) -> Span | None:
    if m.group("noon"):
        hour: int | None = 12
    else:
        hour = _clock_hour(m.group("h") or m.group("h2"), m.group("ap"))
    if hour is None:
        return None
    day = clock.today if clock.at(clock.today, hour) <= clock.now else clock.today - DAY
    return clock.at(day, hour), clock.at(day, hour + 1)


def _since_hour(m: re.Match[str], clock: Clock) -> Span | None:
    """ "since 8am": from that hour (today's, or yesterday's when it is still to come)."""
    span = _at_hour(m, clock)
    return None if span is None else (span[0], clock.now)


def _clock_hour(hour_text: str, ampm: str | None) -> int | None:
    hour = int(hour_text)
    if ampm in ("pm", "p.m.") and hour < 12:
        hour += 12
    if ampm in ("am", "a.m.") and hour == 12:
        hour = 0
    return hour if 0 <= hour <= 23 else None


def _last_h(m: re.Match[str], clock: Clock) -> Span:
    return clock.now - timedelta(hours=int(m.group(1))), clock.now


def _last_days(n: int) -> Resolver:
    return _fixed(lambda c: (c.now - n * DAY, c.now))


def _last_7() -> Resolver:
    return _last_days(7)


def _days_back(n: int) -> Resolver:
    return _fixed(lambda c: _whole_day(c, c.today - n * DAY))


def _today() -> Resolver:
    return _fixed(lambda c: (c.midnight(c.today), c.now))


def _weeks_back(n: int) -> Resolver:
    return _fixed(lambda c: (c.monday - n * 7 * DAY, c.monday - (n - 1) * 7 * DAY))


def _this_week() -> Resolver:
    return _fixed(lambda c: (c.monday, c.now))


def _this_month() -> Resolver:
    return _fixed(lambda c: (c.midnight(c.today.replace(day=1)), c.now))


def _range_match(m: re.Match[str], clock: Clock) -> Span | None:
    return _range(m.group("a") or m.group("a2"), m.group("b") or m.group("b2"), clock)


def _start_of(unit: str, clock: Clock) -> Span:
    if unit == "week":
        return clock.monday, clock.now
    if unit == "month":
        return clock.midnight(clock.today.replace(day=1)), clock.now
    return clock.midnight(date(clock.today.year, 1, 1)), clock.now


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    pattern: re.Pattern[str]
    resolve: Resolver


def _rule(name: str, pattern: str, resolve: Resolver) -> Rule:
    return Rule(name, re.compile(pattern), resolve)


_AMPM = r"(?P<ap>am|pm|a\.m\.|p\.m\.)"
HOUR_OF_DAY = (
    rf"(?P<h>\d{{1,2}})(?::00)? ?{_AMPM}|(?P<h2>\d{{1,2}}):(?P<mm>\d{{2}})|(?P<noon>noon|midday)"
)
_CONNECT = r"(?:-|–|to|until|till|through|thru)"
RULES: tuple[Rule, ...] = (
    _rule(
        "since_start",
        r"\b(?:since|from) (?:the )?(?:start|beginning) of (?:the |this )?(week|month|year)\b",
        lambda m, c: _start_of(m.group(1), c),
    ),
    _rule(
        "week_of",
        rf"\b(?:the |a )?week (?:starting|beginning|commencing|of|from) (?:on )?"
        rf"(?:(?:{_WD}),? )?(?:the )?(?P<d>{_DATE})",
        _week_of,
    ),
    _rule(
        "week_of_month",
        rf"\b(?:the )?(first|second|third|fourth|1st|2nd|3rd|4th|last) week (?:of|in) "
        rf"({'|'.join(MONTHS)})"
        r"(?: (\d{4}))?\b",
        _week_of_month,
    ),
    _rule(
        "weekend_of",
        rf"\b(?:the )?weekend of (?:the )?(?P<d>{_DATE}|\d{{1,2}}(?:st|nd|rd|th))\b",
        _weekend_of,
    ),
    _rule(
        "month_days",
        rf"\b(?P<mon>{_MONTH_RE})\.? (?P<d1>\d{{1,2}})(?:st|nd|rd|th)? ?{_CONNECT} ?"
        r"(?P<d2>\d{1,2})(?:st|nd|rd|th)?\b(?! ?(?:am|pm|h\b|hours?|:))",
        _month_days,
    ),
    _rule(
        "range",
        rf"\b(?:between|from) (?P<a>{_ENDPOINT}) (?:and|to|until|till|through|thru|-) "
        rf"(?P<b>{_ENDPOINT})\b|\b(?P<a2>{_DATE}|(?:the )?\d{{1,2}}(?:st|nd|rd|th)?) ?{_CONNECT} ?"
        rf"(?P<b2>{_DATE})\b",
        _range_match,
    ),
    _rule("holiday", rf"\b(?:on )?({_HOLIDAY_RE})\b", _holiday),
    _rule("date", rf"\b(?:{_DATE})\b", _one_date),
    _rule("ordinal", r"\b(?:on )?the (\d{1,2})(?:st|nd|rd|th)\b", _ordinal),
    _rule("month", rf"\b(?:in |during |for )?({'|'.join(MONTHS)})(?: (\d{{4}}))?\b", _whole_month),
    _rule(
        "last_n",
        rf"\b(?:in |over |during |for )?(?:the )?(?:last|past|previous) ({_NUM}) "
        r"(hour|day|week|month)s?\b",
        _last_n,
    ),
    _rule("last_h", r"\b(?:the )?(?:last|past) (24|48|72) ?h\b", _last_h),
    _rule(
        "last_hour",
        r"\b(?:in |over |during )?the (?:last|past|previous) hour\b",
        _fixed(lambda c: (c.now - timedelta(hours=1), c.now)),
    ),
    _rule("ago", rf"\b({_NUM}) (day|week)s? ago\b", _ago),
    _rule("past_week", r"\b(?:the )?past (?:7 days|seven days|week)\b|\bweekly\b", _last_7()),
    _rule("fortnight", r"\b(?:the )?(?:last|past) (?:fortnight|two weeks)\b", _last_days(14)),
    _rule(
        "day_part",
        rf"\b(?:on )?(yesterday|this|today'?s?|(?:last )?(?:{_WD})) "
        r"(morning rush hour|evening rush hour|rush hour|morning|afternoon|evening|night|"
        r"lunchtime)\b",
        _day_part,
    ),
    _rule("last_night", r"\b(?:last|yesterday) night\b", _last_night),
    _rule("overnight", r"\bovernight\b", _last_night),  # a filter beside another period
    _rule("day_before", r"\b(?:the )?day before yesterday\b", _days_back(2)),
    _rule(
        "month_so_far", r"\b(?:this month so far|so far this month|month to date)\b", _this_month()
    ),
    _rule("past_month", r"\b(?:the )?past month\b|\bmonthly\b|\blast 30 days\b", _last_days(30)),
    _rule("yesterday", r"\byesterday\b", _days_back(1)),
    _rule("today", r"\btoday\b|\bso far today\b|\ball day\b|\bthis day\b", _today()),
    _rule("last_weekend", r"\b(?:last|past|previous) ?week ?end\b", _fixed(_last_weekend)),
    _rule(
        "this_weekend",
        r"\b(?:this|the|at the|all|all the) ?week ?end\b(?!s)",
        _fixed(_this_weekend),
    ),
    _rule("weekday", rf"\b(?:last |previous |past |on )?({_WD})\b", _weekday),
    _rule("week_before_last", r"\b(?:the )?week before last\b", _weeks_back(2)),
    _rule("last_week", r"\b(?:last|previous) week\b", _weeks_back(1)),
    _rule(
        "this_week",
        r"\b(?:this week(?: so far)?|so far this week|all week|week to date|the whole week"
        r"|this past week)\b",
        _this_week(),
    ),
    _rule("the_week", r"\bthe week\b(?! before)", _last_7()),
    _rule("month_before_last", r"\b(?:the )?month before last\b", _fixed(_month_before_last)),
    _rule("last_month", r"\b(?:last|previous) month\b", _fixed(_last_month)),
    _rule("this_month", r"\b(?:this|all) month\b", _this_month()),
    _rule("year", r"\b(?:last|past|this) year\b|\bso far this year\b", _year),
    _rule("since_hour", rf"\bsince (?:{HOUR_OF_DAY})", _since_hour),
    _rule("at_hour", rf"\b(?:at |around |about |by )(?:{HOUR_OF_DAY})", _at_hour),
    _rule(
        "now",
        r"\b(?:right )?now\b|\bcurrently\b|\bat the moment\b|\blatest\b|\bcurrent\b"
        r"|\bat present\b|\bthis hour\b",
        _fixed(lambda c: (c.now - timedelta(hours=1), c.now)),
    ),
)


# ---------------------------------------------------------------------- finding


@dataclass(frozen=True, slots=True)
class Found:
    """A period found in the text, where, and by which rule."""

    at: int
    end: int
    rule: str
    period: Period
    since: bool = False


def find_periods(text: str, clock: Clock) -> list[Found]:
    """Time expressions in ``text``, in order of mention, resolved against ``clock``."""
    found: list[Found] = []
    taken: list[tuple[int, int]] = []
    for rule in RULES:
        for m in rule.pattern.finditer(text):
            if any(m.start() < b and m.end() > a for a, b in taken):
                continue
            span = rule.resolve(m, clock)
            if span is None:
                continue
            taken.append((m.start(), m.end()))
            found.append(_found(text, m, rule.name, span, clock))
    return sorted(found, key=lambda f: f.at)


def _found(text: str, m: re.Match[str], rule: str, span: Span, clock: Clock) -> Found:
    label = m.group(0).strip()
    since = re.search(
        r"\b(?:since|after) (?:the )?(?:start of |beginning of )?$", text[: m.start()]
    )
    ranges = ("range", "last_n", "past_week", "fortnight", "past_month", "now", "since_hour")
    if since and rule not in ranges:
        # "since Monday", "since 10 November", "since last week": from its start to now
        start = span[0]
        return Found(
            since.start(), m.end(), rule, clock.period(start, clock.now, f"since {label}"), True
        )
    return Found(m.start(), m.end(), rule, clock.period(span[0], span[1], label))


# ---------------------------------------------------------------------- filters

_PART_WORDS = (
    ("morning rush(?: hours?)?|morning commute|am peak", "morning rush hour"),
    ("evening rush(?: hours?)?|evening commute|pm peak|drive ?time", "evening rush hour"),
    ("rush hours?|peak hours?|commute|commuting hours?", "rush hour"),
    ("mornings?", "morning"),
    ("afternoons?", "afternoon"),
    ("evenings?", "evening"),
    ("nights?|night-?time|overnight", "night"),
    ("lunchtimes?|lunch ?time", "lunchtime"),
    ("daytime|during the day", "daytime"),
)


def find_hours(text: str, clock: Clock, taken: list[tuple[int, int]]) -> tuple[int, int] | None:
    """An hour-of-day window the question names outside its periods ("in the
    mornings", "rush hour", "between 7 and 9am"), or None."""

    def free(m: re.Match[str]) -> bool:
        return all(m.end() <= a or m.start() >= b for a, b in taken)

    clock_range = re.compile(
        r"\b(?:between |from )?(\d{1,2})(?::00)? ?(am|pm)? *(?:and|to|-|–|until) ?"
        r"(\d{1,2})(?::00)? ?(am|pm)\b|\b(\d{1,2}):00 ?(?:-|–|to|and) ?(\d{1,2}):00\b"
    )
    # "midnight to 6am", "noon till 2pm": the same clock times, in words (same length)
    text = re.sub(r"\bmidnight\b", "12am    ", text)
    text = re.sub(r"\b(?:noon|midday)\b", lambda m: "12pm".ljust(len(m.group(0))), text)
    for m in clock_range.finditer(text):
        if free(m):
            if m.group(5):
                return int(m.group(5)), int(m.group(6)) or 24
            end_ampm = m.group(4)
            lo = _clock_hour(m.group(1), m.group(2) or end_ampm)
            hi = _clock_hour(m.group(3), end_ampm)
            if lo is not None and hi is not None and lo < (hi or 24):
                return lo, hi or 24
    for words, part in _PART_WORDS:
        for m in re.finditer(rf"\b(?:{words})\b", text):
            if free(m):
                return PARTS_OF_DAY[part]
    return None


_WEEKDAYS_WORDS = (
    r"\b(?:weekdays|week ?days|weekday|working days?|workdays?|business days?|weekday \w+"
    r"|monday to friday|mon-fri|during the week|in the week|midweek)\b"
)
_WEEKENDS_WORDS = (
    r"\b(?:weekends|weekend (?:days|mornings?|afternoons?|evenings?|nights?|traffic)"
    r"|saturdays? and sundays?|at weekends|on weekends)\b"
)
_WEEKEND_ONE = r"\bweekend\b"


def find_days(text: str) -> list[str]:
    """Weekday and weekend filters in order of mention ("weekdays", "weekends")."""
    hits: list[tuple[int, str]] = []
    for m in re.finditer(_WEEKDAYS_WORDS, text):
        hits.append((m.start(), "weekdays"))
    for m in re.finditer(_WEEKENDS_WORDS, text):
        hits.append((m.start(), "weekends"))
    if hits and not any(d == "weekends" for _, d in hits):
        # "weekday or weekend traffic": a lone "weekend" beside a weekday filter is one too
        for m in re.finditer(_WEEKEND_ONE, text):
            hits.append((m.start(), "weekends"))
    ordered: list[str] = []
    for _, days in sorted(hits):
        if days not in ordered:
            ordered.append(days)
    return ordered


def with_filters(
    period: Period, clock: Clock, days: str | None, hours: tuple[int, int] | None
) -> Period:
    """``period`` limited to ``days`` and ``hours``; a single day with an hour window
    becomes that stretch of the day (the same question, and no filter to carry)."""
    start = datetime.fromtimestamp(period.start_ms / 1000, clock.tz)
    end = datetime.fromtimestamp(period.end_ms / 1000, clock.tz)
    if hours and days is None and (end - timedelta(milliseconds=1)).date() == start.date():
        day = start.date()
        lo, hi = clock.at(day, hours[0]), clock.at(day, hours[1])
        lo, hi = max(lo, start), min(hi, end)
        if hi > lo:
            return clock.period(lo, hi, f"{period.label}, {hours[0]:02d}-{hours[1]:02d}")
    return replace(period, days=days, hours=hours)
