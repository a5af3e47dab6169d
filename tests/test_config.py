import subprocess
import sys
from pathlib import Path

import pytest

from services.config import SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[1]
SECRETS = {"DISCORD_TOKEN": "discord-secret", "FAL_KEY": "fal-secret"}


def test_defaults_apply_when_only_secrets_are_set():
    settings = load_settings(SECRETS)
    assert settings.discord_api_base == "https://discord.com/api/v10"
    assert settings.fal_queue_url == "https://queue.fal.run"
    assert settings.data_dir == Path("./data")
    assert settings.use_status_stream is True


def test_secrets_never_appear_in_repr():
    text = repr(load_settings(SECRETS))
    assert "discord-secret" not in text and "fal-secret" not in text


@pytest.mark.parametrize("missing", ["DISCORD_TOKEN", "FAL_KEY"])
def test_missing_secret_names_the_variable(missing):
    env = {k: v for k, v in SECRETS.items() if k != missing}
    with pytest.raises(SettingsError, match=missing):
        load_settings(env)


@pytest.mark.parametrize(
    "name,value",
    [
        ("MAX_CONCURRENT_JOBS", "0"),
        ("EDIT_INTERVAL", "soon"),
        ("FAL_STATUS_STREAM", "maybe"),
        ("RESULT_MEMORY_BYTES", "-1"),
    ],
)
def test_malformed_values_are_refused_by_name(name, value):
    with pytest.raises(SettingsError, match=name):
        load_settings({**SECRETS, name: value})


def test_zero_result_memory_means_always_through_files():
    assert load_settings({**SECRETS, "RESULT_MEMORY_BYTES": "0"}).result_memory_bytes == 0


def test_overrides_and_trailing_slashes():
    settings = load_settings(
        {**SECRETS, "DISCORD_API_BASE": "http://proxy:8080/api/v10/", "FAL_STATUS_STREAM": "off", "DEV_GUILD_ID": "42"}
    )
    assert settings.discord_api_base == "http://proxy:8080/api/v10"
    assert settings.use_status_stream is False
    assert settings.dev_guild_id == 42


@pytest.mark.parametrize("missing", ["DISCORD_TOKEN", "FAL_KEY"])
def test_bot_exits_at_once_with_one_line_when_a_secret_is_missing(tmp_path, missing):
    env = {"PATH": "/usr/bin:/bin", **{k: v for k, v in SECRETS.items() if k != missing}}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bot.py")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=20
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and missing in lines[0], done.stderr
    assert "Traceback" not in done.stderr
