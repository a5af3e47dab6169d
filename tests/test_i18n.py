"""The catalogs: every text of the code translated in every language, with the same placeholders
as the English, within Discord's limits where Discord shows it; and the texts in use (language
choice, plurals, numbers)."""

from __future__ import annotations

import copy

import discord
import pytest
from babel.messages.catalog import Catalog
from babel.messages.pofile import read_po
from discord import app_commands

from cogs.translation import KontextTranslator
from services.i18n import N_, Catalogs, LocalizedError, placeholders, texts
from tools.i18n import TEMPLATE, extract

CATALOGS = Catalogs.load()
LANGUAGES = ["de", "es", "fr", "pt_BR"]
CODE = extract()
# Texts that read the same in a language as in English: names, formats, units.
SAME_AS_ENGLISH = {"Format", "Options", "Image", "Seed", "Guidance", "Images", "{seconds} s", "image {number}"}


def english_forms(message) -> list[str]:
    return [message.id] if isinstance(message.id, str) else list(message.id)


def test_the_languages_the_issue_asks_for_are_there():
    assert CATALOGS.languages == LANGUAGES


def test_the_template_is_the_code_s_texts():
    """locales/kontext.pot is what translators start from: `python -m tools.i18n` refreshes it."""
    with TEMPLATE.open("rb") as file:
        template = read_po(file)
    assert {m.id for m in template if m.id} == {m.id for m in CODE if m.id}


def catalog_problems(catalog: Catalog) -> list[str]:
    """What a catalog lacks against the code's texts: a text missing, empty or fuzzy, a
    placeholder left out, renamed or added, a text left in English."""
    problems = []
    for message in CODE:
        if not message.id:
            continue
        entry = catalog.get(message.id)
        forms = english_forms(message)
        if entry is None or entry.fuzzy or not entry.string or not all(entry.string):
            problems.append(f"missing: {forms[0]!r}")
            continue
        translated = [entry.string] if isinstance(entry.string, str) else list(entry.string)
        wanted = placeholders(forms[-1])
        for text in translated:
            found = placeholders(text)
            # A singular may say "one" instead of {count}; nothing else may be left out or added.
            if found - wanted or wanted - found - ({"count"} if len(forms) > 1 else set()):
                problems.append(f"placeholders {sorted(found)} != {sorted(wanted)}: {text!r}")
        if len(forms) == 1 and translated[0] == forms[0] and forms[0] not in SAME_AS_ENGLISH:
            problems.append(f"left in English: {forms[0]!r}")
    return problems


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_text_is_translated_with_the_english_placeholders(language):
    assert catalog_problems(CATALOGS.catalog(language)) == []


def test_a_catalog_missing_a_text_or_a_placeholder_fails_the_check():
    broken = copy.deepcopy(CATALOGS.catalog("de"))
    del broken["✅ Done."]
    broken["Job #{id}"].string = "Auftrag #{nummer}"
    broken["Not saved: {problems}"].flags.add("fuzzy")
    broken["Which image?"].string = "Which image?"
    assert sorted(catalog_problems(broken)) == [
        "left in English: 'Which image?'",
        "missing: 'Not saved: {problems}'",
        "missing: '✅ Done.'",
        "placeholders ['nummer'] != ['id']: 'Auftrag #{nummer}'",
    ]


@pytest.mark.parametrize("language", LANGUAGES)
async def test_command_descriptions_fit_discord_s_limits(language):
    """Descriptions and choice names: 1-100 characters (application-commands.mdx)."""
    from cogs.admin import Admin
    from cogs.history import History
    from cogs.kontext import Kontext

    texts_of_commands = set()
    for cog in (Kontext, Admin, History):
        for command in cog.__cog_app_commands__:
            texts_of_commands.add(command.description)
            for child in getattr(command, "walk_commands", lambda: [])():
                texts_of_commands.add(child.description)
                for parameter in child.parameters:
                    texts_of_commands.add(parameter.description)
                    texts_of_commands.update(choice.name for choice in parameter.choices)
            for parameter in getattr(command, "parameters", []):
                texts_of_commands.add(parameter.description)
    assert len(texts_of_commands) > 30
    catalog = CATALOGS.texts(language)
    # As the translator hands them to Discord: never formatted (a description may show `{prompt}`).
    shown = {text: catalog.translation(text) or text for text in texts_of_commands}
    too_long = {text: translated for text, translated in shown.items() if not 1 <= len(translated) <= 100}
    assert too_long == {}


async def test_the_translator_leaves_names_alone():
    translator = KontextTranslator(CATALOGS)
    from cogs.kontext import Kontext

    command = Kontext.kontext
    description: app_commands.TranslationContextTypes = app_commands.TranslationContext(
        app_commands.TranslationContextLocation.command_description, command
    )
    name: app_commands.TranslationContextTypes = app_commands.TranslationContext(
        app_commands.TranslationContextLocation.command_name, command
    )
    string = app_commands.locale_str("Edit with Kontext")
    assert await translator.translate(string, discord.Locale.german, description) == "Mit Kontext bearbeiten"
    assert await translator.translate(string, discord.Locale.german, name) is None
    assert await translator.translate(string, discord.Locale.japanese, description) is None  # Discord shows English
    assert await translator.translate(string, discord.Locale.spain_spanish, description) == "Editar con Kontext"


def test_a_locale_reads_its_own_catalog_or_its_language_s_or_english():
    assert texts("de")("✅ Done.") == "✅ Fertig."
    assert texts("es-419")("✅ Done.") == texts("es-ES")("✅ Done.") == "✅ Listo."
    assert texts("pt-BR")("✅ Done.") == "✅ Pronto."
    assert texts("ja")("✅ Done.") == texts(None)("✅ Done.") == "✅ Done."


def test_plurals_follow_each_language_s_rule():
    one, many = "{count} image", "{count} images"
    assert texts("en-US").ngettext(one, many, 0) == "0 images"
    assert texts("fr").ngettext(one, many, 0) == "0 image"  # French counts 0 as one
    assert texts("de").ngettext(one, many, 0) == "0 Bilder"
    assert texts("de").ngettext(one, many, 1) == "1 Bild"


def test_numbers_and_money_are_written_as_the_language_writes_them():
    assert texts("en-US").money(2.8) == "$2.80"
    assert texts("de").money(2.8) == "2,80\xa0$"
    assert texts("de").number(1234.5, 1) == "1.234,5"
    assert texts("fr").percent(0.25) == "25\xa0%"


def test_an_error_is_shown_in_the_member_s_language():
    error = LocalizedError(N_("`{name}` is empty."), name="cat.png")
    assert str(error) == "`cat.png` is empty."
    assert texts("fr").error(error) == "`cat.png` est vide."
