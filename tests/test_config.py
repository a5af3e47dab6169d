import socket
import subprocess
import sys
from pathlib import Path

import pytest

from services.config import SettingsError, load_settings
from services.input_images import hosted_on

ROOT = Path(__file__).resolve().parents[1]
SECRETS = {"DISCORD_TOKEN": "discord-secret", "FAL_KEY": "fal-secret"}


def test_defaults_apply_when_only_secrets_are_set():
    settings = load_settings(SECRETS)
    assert settings.discord_api_base == "https://discord.com/api/v10"
    assert settings.fal_queue_url == "https://queue.fal.run"
    assert settings.data_dir == Path("./data")
    assert settings.use_status_stream is True


def test_the_default_discord_hosts_serve_every_image_a_message_shows():
    """Attachments come from Discord's CDN (or its media proxy); the image or thumbnail of a
    link's embed (a tweet, a YouTube video, a pasted image address) comes through Discord's
    external-media proxy, `images-ext-1` or `images-ext-2.discordapp.net`, as real messages'
    `proxy_url` shows: "Edit with Kontext" on a link must find its picture."""
    hosts = load_settings(SECRETS).discord_cdn_hosts
    for url in (
        "https://cdn.discordapp.com/attachments/1/2/cat.png?ex=69000000&is=68ff0000&hm=ab&",
        "https://media.discordapp.net/attachments/1/2/cat.png?ex=69000000&is=68ff0000&hm=ab&",
        "https://images-ext-1.discordapp.net/external/gk1nrmD5dvvSyYrFm1tMGNOm6f80Ps1hyX8zf9bYImw/https/i.ytimg.com/vi/5dqixBi8TPU/maxresdefault.jpg",
        "https://images-ext-2.discordapp.net/external/cIug7WIdKZEuKDYvrigQl93hRoZCqzYbE01cipoWXH0/https/pbs.twimg.com/media/GmjNdbcakAAukds.jpg",
    ):
        assert hosted_on(url, hosts), url


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
        {
            **SECRETS,
            "DISCORD_API_BASE": "http://proxy:8080/api/v10/",
            "ALLOW_PLAIN_HTTP": "1",
            "FAL_STATUS_STREAM": "off",
            "DEV_GUILD_ID": "42",
        }
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


@pytest.mark.parametrize(
    "name,value",
    [
        ("JOB_TIMEOUT", "nan"),  # asyncio.timeout_at(now + nan) fires at once: every job would fail
        ("EDIT_INTERVAL", "nan"),  # asyncio.sleep(nan) never returns: no progress edit ever
        ("RETRY_BASE_DELAY", "inf"),
        ("POLL_INTERVAL", "-1"),
        ("PRICE_PER_IMAGE_USD", "-1"),  # would make every job's policy check raise
        ("MONTHLY_BUDGET_USD", "0"),
        ("ALLOWED_GUILD_IDS", "abc"),
        ("LOG_LEVEL", "chatty"),
        pytest.param("MAX_INPUT_BYTES", "9" * 400, id="MAX_INPUT_BYTES-beyond-any-float"),
        pytest.param("HTTP_PORT", "9" * 400, id="HTTP_PORT-beyond-any-float"),
    ],
)
def test_values_that_would_break_the_bot_are_refused(name, value):
    with pytest.raises(SettingsError, match=name):
        load_settings({**SECRETS, name: value})


def test_plain_http_only_for_loopback_or_when_allowed():
    with pytest.raises(SettingsError, match="FAL_QUEUE_URL"):
        load_settings({**SECRETS, "FAL_QUEUE_URL": "http://fal.example"})
    assert load_settings({**SECRETS, "FAL_QUEUE_URL": "http://127.0.0.1:8080"}).fal_queue_url == "http://127.0.0.1:8080"
    allowed = load_settings({**SECRETS, "FAL_QUEUE_URL": "http://fal.example", "ALLOW_PLAIN_HTTP": "1"})
    assert allowed.fal_queue_url == "http://fal.example"


@pytest.mark.parametrize("name", ["DISCORD_API_BASE", "FAL_QUEUE_URL", "FAL_REST_URL"])
@pytest.mark.parametrize("credentials", ["user:hunter2@", "hunter2@"])
def test_credentials_in_urls_are_refused_without_being_shown(name, credentials):
    """aiohttp refuses a URL's credentials next to the Authorization header every call sends:
    each call would fail."""
    with pytest.raises(SettingsError, match=f"{name} .*user:password@") as refused:
        load_settings({**SECRETS, name: f"https://{credentials}proxy.internal/api/v10"})
    assert "hunter2" not in str(refused.value) and len(str(refused.value).splitlines()) == 1


def test_operator_limits_are_read():
    settings = load_settings({**SECRETS, "ALLOWED_GUILD_IDS": "12, 34", "MONTHLY_BUDGET_USD": "150"})
    assert settings.allowed_guild_ids == frozenset({12, 34}) and settings.monthly_budget_usd == 150.0


@pytest.mark.parametrize(
    "name,value",
    [
        # Read as the one server 111…222: the bot would have left both servers it was meant for.
        ("ALLOWED_GUILD_IDS", "111111111111111111 222222222222222222"),
        # Read as shard 10: shards 0 and 1 would have had no process, without a word.
        ("SHARD_IDS", "1 0"),
        # Read as one host no attachment is on: every member's image would have been refused.
        ("DISCORD_CDN_HOSTS", "cdn.discordapp.com media.discordapp.net"),
        ("DISCORD_CDN_HOSTS", "cdn.discordapp.com;media.discordapp.net"),
    ],
)
def test_lists_separated_by_anything_but_commas_are_refused(name, value):
    env = {**SECRETS, "SHARD_COUNT": "12", "DATABASE_URL": "postgresql://db/kontext", name: value}
    with pytest.raises(SettingsError, match=f"{name} .*separated by commas"):
        load_settings(env)


def test_only_the_env_file_of_the_start_folder_is_read(tmp_path):
    """A bot started from the wrong folder must not pick up another project's .env."""
    (tmp_path / ".env").write_text("DISCORD_TOKEN=parent-token\nFAL_KEY=parent-key\n")
    child = tmp_path / "elsewhere"
    child.mkdir()
    done = subprocess.run(
        [sys.executable, str(ROOT / "bot.py")],
        cwd=child,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 2 and "DISCORD_TOKEN is not set" in done.stderr


def start_without_discord(tmp_path: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    """`python bot.py` with Discord out of reach: a start-up that gets past the database fails at
    the login instead (exit 3)."""
    env = {"PATH": "/usr/bin:/bin", **SECRETS, "DATA_DIR": str(data_dir)}
    env["DISCORD_API_BASE"] = "http://127.0.0.1:9/api/v10"
    return subprocess.run(
        [sys.executable, str(ROOT / "bot.py")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=20
    )


def test_a_damaged_database_file_stops_the_bot_with_one_line(tmp_path):
    """A kontext.sqlite3 that is not a database (a disk fault, another file copied over it) used
    to be logged and then keep the process alive for ever, deaf to SIGTERM (the database's
    thread still ran): no restart policy or `docker stop` saw the bot end."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "kontext.sqlite3").write_bytes(b"not a database at all " * 400)
    done = start_without_discord(tmp_path, data_dir)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2, done.stderr
    assert f"{data_dir / 'kontext.sqlite3'}" in last and "file is not a database" in last, last


def test_a_data_dir_the_bot_cannot_use_stops_it_with_one_line_naming_it(tmp_path):
    """README, exit codes: a database that cannot be used is exit 2 with its cause, not exit 3
    with a bare OSError (a volume the bot's user cannot write is the usual case)."""
    (tmp_path / "volume").write_text("a file, not a folder")
    data_dir = tmp_path / "volume" / "data"
    done = start_without_discord(tmp_path, data_dir)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2, done.stderr
    assert f"cannot use DATA_DIR {data_dir}" in last and "Not a directory" in last, last


def test_a_start_warns_of_nothing_when_nothing_is_wrong(tmp_path):
    """discord.py warned at every start that voice needs PyNaCl and davey: two WARNING lines a
    log collector alerts on, about a feature the bot never uses."""
    done = start_without_discord(tmp_path, tmp_path / "data")
    assert done.returncode == 3, done.stderr  # it got as far as the login
    assert [line for line in done.stderr.splitlines() if "WARNING" in line] == []


def test_one_process_on_sqlite_unless_a_database_is_shared():
    settings = load_settings(SECRETS)
    assert settings.database_url is None and settings.shard_count is None and settings.shard_ids is None
    assert settings.instance_id == f"{socket.gethostname()}:{Path('./data').resolve()}"


def test_a_cluster_process_reads_its_shards_and_database():
    settings = load_settings(
        {
            **SECRETS,
            "DATABASE_URL": "postgresql://kontext:s3cret@db/kontext",
            "SHARD_COUNT": "16",
            "SHARD_IDS": "0-3, 8,12-13",
            "INSTANCE_ID": "bot-0",
            "DISCORD_GATEWAY_URL": "wss://gateway-proxy.internal",
            "LEASE_SECONDS": "30",
            "HEARTBEAT_SECONDS": "10",
        }
    )
    assert settings.shard_ids == (0, 1, 2, 3, 8, 12, 13) and settings.shard_count == 16
    assert settings.instance_id == "bot-0" and settings.discord_gateway_url == "wss://gateway-proxy.internal"
    assert "s3cret" not in repr(settings)
    assert "database_url='postgresql://***@db/kontext'" in repr(settings)
    hidden = load_settings({**SECRETS, "DATABASE_URL": "postgresql:///kontext?host=/run/pg&password=hush"})
    assert "hush" not in repr(hidden) and "password=***" in repr(hidden)


@pytest.mark.parametrize(
    "value",
    [
        "postgresq://kontext:s3cret@db/kontext",  # a typo in the scheme
        "host=db user=kontext password=s3cret",  # libpq's keyword form, which asyncpg does not take
    ],
)
def test_a_malformed_database_url_is_refused_without_showing_its_password(value):
    with pytest.raises(SettingsError, match="DATABASE_URL") as refused:
        load_settings({**SECRETS, "DATABASE_URL": value})
    assert "s3cret" not in str(refused.value)


def test_a_multi_host_database_url_is_taken_and_its_password_kept_out_of_the_logged_settings():
    dsn = "postgresql://kontext:s3cret@db1:5432,db2:5432/kontext?target_session_attrs=read-write"
    settings = load_settings({**SECRETS, "DATABASE_URL": dsn})
    assert settings.database_url == dsn
    assert "s3cret" not in repr(settings)
    assert "database_url='postgresql://***@db1:5432,db2:5432/kontext?target_session_attrs=read-write'" in repr(settings)


@pytest.mark.parametrize(
    "changes,named",
    [
        ({"SHARD_IDS": "0"}, "SHARD_IDS needs SHARD_COUNT"),
        ({"SHARD_COUNT": "2", "SHARD_IDS": "2"}, "beyond SHARD_COUNT"),
        ({"SHARD_COUNT": "2", "SHARD_IDS": "1-0"}, "SHARD_IDS"),
        ({"SHARD_COUNT": "2", "SHARD_IDS": "1", "DATABASE_URL": ""}, "SHARD_IDS needs DATABASE_URL"),
        ({"DATABASE_URL": "mysql://db/kontext"}, "DATABASE_URL"),
        ({"LEASE_SECONDS": "20", "HEARTBEAT_SECONDS": "10"}, "HEARTBEAT_SECONDS"),
        ({"DISCORD_GATEWAY_URL": "ws://gateway.example"}, "DISCORD_GATEWAY_URL"),
        ({"DISCORD_GATEWAY_URL": "https://gateway.example"}, "DISCORD_GATEWAY_URL"),
    ],
)
def test_cluster_settings_that_cannot_work_are_refused(changes, named):
    env = {**SECRETS, "DATABASE_URL": "postgresql://db/kontext", **changes}
    with pytest.raises(SettingsError, match=named):
        load_settings({name: value for name, value in env.items() if value})
