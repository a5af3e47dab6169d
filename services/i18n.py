"""The bot's texts in the member's language: gettext catalogs (`locales/*.po`), read at start-up
with Babel, English in the code as the message ids.

How a text is written (and how to add one):

- Translate now: `_ = texts(locale)`, then `_("You can start more {when}.", when=...)`. A count
  that changes the words: `_.ngettext("{count} image", "{count} images", n)` (`count` is set).
- Mark now, translate later (a constant, a table): `N_("...")` keeps the English; `_(constant)`
  translates it where the locale is known.
- An error a member reads: raise a `LocalizedError` subclass with `N_("...")` and its values;
  `Texts.error` shows it in the member's language.
- Then run `python -m tools.i18n`: it refreshes `locales/kontext.pot` and adds the new texts
  (empty) to every `locales/<language>.po`, for a translator to fill in (any .po editor). The
  tests fail while a catalog misses a text or its `{placeholders}` differ from the English.

Placeholders are `str.format` fields. Discord's own markup (`<t:…:R>`, `<@…>`, `**bold**`)
stays as it is in every language: the client renders times in the reader's own locale.
"""

from __future__ import annotations

import decimal
import functools
import gettext
import string
from collections.abc import Callable, Iterable
from datetime import date
from pathlib import Path
from typing import Any

from babel import Locale
from babel.dates import format_date, format_skeleton
from babel.messages.catalog import Catalog
from babel.messages.pofile import read_po
from babel.numbers import format_currency, format_decimal, format_percent

LOCALES_DIR = Path(__file__).resolve().parents[1] / "locales"
DOMAIN = "kontext"
# The language of the message ids, and of every member whose language has no catalog.
SOURCE_LOCALE = "en-US"


def N_(message: str) -> str:
    """Marks `message` for the catalogs and returns it unchanged (see the module docstring)."""
    return message


def placeholders(message: str) -> frozenset[str]:
    """The `{name}` fields of a text: every translation must have the same."""
    return frozenset(field for _, field, _, _ in string.Formatter().parse(message) if field)


class LocalizedError(Exception):
    """An error whose message a member reads: an English template (marked with `N_`) and its
    values, shown in the member's language by `Texts.error` (and in English by `str()`)."""

    def __init__(self, template: str, /, **params: Any) -> None:
        super().__init__(template.format(**params))
        self.template = template
        self.params = params


@functools.lru_cache(maxsize=4096)
def _decimal(value: decimal.Decimal, digits: int, locale: Locale) -> str:
    return format_decimal(value, format="#,##0" + ("." + "0" * digits if digits else ""), locale=locale)


class Texts:
    """The bot's texts in one language, with its number and date formats."""

    def __init__(self, catalog: Catalog | None, locale: Locale) -> None:
        self._catalog = catalog
        self.locale = locale

    @property
    def language(self) -> str:
        """The catalog's language (e.g. `de`, `pt_BR`), `en` without one."""
        return str(self._catalog.locale) if self._catalog is not None else "en"

    def translation(self, message: str) -> str | None:
        """The catalog's translation of `message`, or None when it has none."""
        if self._catalog is None:
            return None
        entry = self._catalog.get(message)
        if entry is None or entry.fuzzy:
            return None
        text = entry.string[0] if isinstance(entry.string, (tuple, list)) else entry.string
        return text or None

    def __call__(self, message: str, /, **params: Any) -> str:
        return (self.translation(message) or message).format(**params)

    def ngettext(self, singular: str, plural: str, count: int, /, **params: Any) -> str:
        """The form for `count` (the language's own plural rule), with `{count}` filled in."""
        text = singular if count == 1 else plural
        catalog = self._catalog
        entry = catalog.get(singular) if catalog is not None else None
        if catalog is not None and entry is not None and not entry.fuzzy and isinstance(entry.string, (tuple, list)):
            forms = entry.string
            if all(forms):
                text = forms[min(_plural_rule(catalog.plural_expr)(count), len(forms) - 1)]
        return text.format(count=self.number(count), **params)

    def error(self, error: LocalizedError) -> str:
        return self(error.template, **error.params)

    def number(self, value: float, digits: int = 0) -> str:
        """`value` with the language's separators (1,234.5 / 1.234,5 / 1 234,5)."""
        # Rounded as Babel rounds (the float's shortest decimal, half to even), so each value
        # shown is formatted once per language: Babel takes longer than the rest of a card.
        rounded = decimal.Decimal(str(value)).quantize(decimal.Decimal(1).scaleb(-digits))
        return _decimal(rounded, digits, self.locale)

    def percent(self, share: float) -> str:
        """A share as the language writes it (25% / 25 % / 25 %)."""
        return format_percent(share, locale=self.locale)

    def money(self, usd: float) -> str:
        """US dollars as the language writes them ($2.80 / 2,80 $ / US$ 2,80)."""
        return format_currency(usd, "USD", locale=self.locale)

    def day(self, day: date) -> str:
        """A day and month in the language's short form ("Aug 7", "7. Aug.", "7 août")."""
        return format_skeleton("MMMd", day, locale=self.locale)

    def long_day(self, day: date) -> str:
        """A whole date as the language writes it ("August 7, 2026", "7. August 2026")."""
        return format_date(day, "long", locale=self.locale)


class Catalogs:
    """Every catalog in `locales/`, read once; `texts(locale)` picks one for a Discord locale."""

    def __init__(self, catalogs: Iterable[Catalog]) -> None:
        self._by_language = {str(catalog.locale): catalog for catalog in catalogs}

    @classmethod
    def load(cls, directory: Path = LOCALES_DIR) -> Catalogs:
        catalogs = []
        for path in sorted(directory.glob("*.po")):
            with path.open("rb") as file:
                catalogs.append(read_po(file, locale=path.stem, domain=DOMAIN))
        return cls(catalogs)

    @property
    def languages(self) -> list[str]:
        return sorted(self._by_language)

    def catalog(self, language: str) -> Catalog:
        return self._by_language[language]

    def texts(self, locale: str | None) -> Texts:
        """The texts for a Discord locale (`de`, `pt-BR`, `es-419`): its own catalog, else its
        language's (`es-419` reads `es`), else English."""
        return _texts(self, locale or SOURCE_LOCALE)


@functools.cache
def _plural_rule(expression: str) -> Callable[[int], int]:
    """A catalog's Plural-Forms rule (a C expression of `n`), compiled safely by gettext."""
    return gettext.c2py(expression)


@functools.lru_cache(maxsize=64)
def _texts(catalogs: Catalogs, locale: str) -> Texts:
    code = locale.replace("-", "_")
    language = code.split("_", 1)[0]
    catalog = catalogs._by_language.get(code) or catalogs._by_language.get(language)
    try:
        babel_locale = Locale.parse(code)
    except (ValueError, LookupError):
        babel_locale = Locale.parse(SOURCE_LOCALE.replace("-", "_"))
    return Texts(catalog, babel_locale)


@functools.cache
def catalogs() -> Catalogs:
    """The catalogs shipped with the bot (read at the first call: bot.py calls it at start-up)."""
    return Catalogs.load()


def texts(locale: str | None) -> Texts:
    """The bot's texts for a Discord locale (see `Catalogs.texts`)."""
    return catalogs().texts(locale)


def english() -> Texts:
    return texts(SOURCE_LOCALE)
