"""Refresh the message catalogs after texts changed in the code:

    python -m tools.i18n            # locales/kontext.pot from the code; every locales/*.po updated
    python -m tools.i18n --new nl   # also start locales/nl.po for a new language

What it does is gettext's usual extract-and-merge, by Babel (what `pybabel extract` and
`pybabel update` do, without their flags to remember): every `_("…")`, `N_("…")` and
`_.ngettext("…", "…", n)` in bot.py, cogs/ and services/ goes into the template, and each
catalog gains the new texts (empty, for a translator), keeps its translations, marks those
whose English changed a little as fuzzy (not used until a translator confirms them) and drops
texts the code no longer has. Then translate the empty and fuzzy entries with any .po editor
(Poedit, Weblate, Lokalize) or a text editor; `pytest tests/test_i18n.py` says what is missing.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from babel import Locale
from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_file
from babel.messages.pofile import read_po, write_po

from services.i18n import DOMAIN, LOCALES_DIR

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("bot.py", "cogs", "services")
# The marking functions (services/i18n.py): _ and N_ take one text, ngettext two.
KEYWORDS = {"_": None, "N_": None, "ngettext": (1, 2)}
TEMPLATE = LOCALES_DIR / f"{DOMAIN}.pot"


def source_files() -> list[Path]:
    files: list[Path] = []
    for name in SOURCES:
        path = ROOT / name
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return files


def extract() -> Catalog:
    """Every marked text of the code, with the files it is in (no line numbers: they would
    change the template at every edit)."""
    template = Catalog(
        domain=DOMAIN, project="kontext-bot", version="1", msgid_bugs_address="the project's issue tracker"
    )
    template.header_comment = (
        "# The Kontext bot's texts, extracted from the code by `python -m tools.i18n`: not edited by hand.\n"
        "# Translations are in locales/<language>.po."
    )
    for path in source_files():
        where = path.relative_to(ROOT).as_posix()
        for lineno, message, comments, context in extract_from_file(
            "python", path, keywords=KEYWORDS, comment_tags=("TRANSLATORS:",), strip_comment_tags=True
        ):
            template.add(message, locations=[(where, lineno)], auto_comments=comments, context=context)
    return template


def _write(catalog: Catalog, path: Path) -> bool:
    """Write `catalog` to `path` if that changes it; True if it did."""
    out = io.BytesIO()
    write_po(out, catalog, width=100, include_lineno=False, ignore_obsolete=True, sort_output=True)
    if path.exists() and path.read_bytes() == out.getvalue():
        return False
    path.write_bytes(out.getvalue())
    return True


def _texts_of(catalog: Catalog) -> set[tuple[object, tuple[str, ...]]]:
    return {(message.id, tuple(sorted(where for where, _ in message.locations))) for message in catalog if message.id}


def refresh(new_languages: list[str]) -> list[str]:
    """Write the template and update every catalog; returns the files that changed."""
    template = extract()
    if TEMPLATE.exists():
        with TEMPLATE.open("rb") as file:
            previous = read_po(file)
        if _texts_of(previous) == _texts_of(template):
            template.creation_date = previous.creation_date  # nothing changed: neither does the date
    changed = [TEMPLATE.name] if _write(template, TEMPLATE) else []
    for language in new_languages:
        path = LOCALES_DIR / f"{language}.po"
        if not path.exists():
            catalog = Catalog(locale=Locale.parse(language), domain=DOMAIN, project="kontext-bot")
            catalog.language_team = Locale.parse(language).english_name or language
            _write(catalog, path)
    for path in sorted(LOCALES_DIR.glob("*.po")):
        with path.open("rb") as file:
            catalog = read_po(file, locale=path.stem, domain=DOMAIN)
        catalog.update(template, update_header_comment=False)
        if _write(catalog, path):
            changed.append(path.name)
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--new", action="append", default=[], metavar="LANGUAGE", help="start a catalog (e.g. nl, pt_BR)"
    )
    args = parser.parse_args()
    changed = refresh(args.new)
    print(f"{len(extract())} texts; changed: {', '.join(changed) or 'nothing'}")


if __name__ == "__main__":
    main()
