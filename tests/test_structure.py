"""What the layout promises, checked: services never import discord.py, and the settings the
README and `.env.example` document are exactly those the code reads."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from services.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
BOT_SOURCES = [ROOT / "bot.py", *sorted((ROOT / "cogs").glob("*.py")), *sorted((ROOT / "services").glob("*.py"))]


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_services_never_import_discord_or_the_cogs():
    offenders = {
        path.name: sorted(name for name in imported_modules(path) if name.split(".")[0] in ("discord", "cogs", "bot"))
        for path in sorted((ROOT / "services").glob("*.py"))
    }
    assert {name: mods for name, mods in offenders.items() if mods} == {}


class RecordingEnvironment(dict[str, str]):
    """An environment that remembers every variable asked for."""

    def __init__(self, values: dict[str, str]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)


def settings_the_code_reads() -> set[str]:
    env = RecordingEnvironment({"DISCORD_TOKEN": "x", "FAL_KEY": "y"})
    load_settings(env)
    return env.read


def test_only_the_settings_module_reads_the_environment():
    readers = [
        path.relative_to(ROOT).as_posix()
        for path in BOT_SOURCES
        if re.search(r"\bos\.environ\b|\bgetenv\(", path.read_text()) and path.name != "config.py"
    ]
    assert readers == []


def readme_settings_defaults() -> dict[str, str]:
    """The README's settings table: each variable and its Default column."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Settings", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \| ([^|]+) \|", section, flags=re.MULTILINE)
    return {name: default.strip() for name, default in rows}


def env_example_values() -> dict[str, str]:
    text = (ROOT / ".env.example").read_text()
    return dict(re.findall(r"^#?([A-Z][A-Z0-9_]+)=(.*)$", text, flags=re.MULTILINE))


def test_readme_settings_table_lists_exactly_what_the_code_reads():
    assert set(readme_settings_defaults()) == settings_the_code_reads()


def test_env_example_lists_exactly_what_the_code_reads():
    assert set(env_example_values()) == settings_the_code_reads()


def test_the_defaults_the_readme_and_env_example_show_are_the_codes():
    """Setting a variable to the default the README gives changes nothing, and `.env.example`
    shows the same default: an operator who copies either gets what the bot does unset."""
    secrets = {"DISCORD_TOKEN": "x", "FAL_KEY": "y"}
    unset = load_settings(secrets)
    example = env_example_values()
    defaults = {
        name: shown[1]
        for name, text in readme_settings_defaults().items()
        if (shown := re.fullmatch(r"`([^`]+)`", text))
    }
    assert len(defaults) > 20  # the table's form still matches
    differ = {name: value for name, value in defaults.items() if load_settings({**secrets, name: value}) != unset}
    assert differ == {}, "the README's default is not the code's"
    assert {name: example[name] for name in defaults} == defaults, ".env.example shows another default"
