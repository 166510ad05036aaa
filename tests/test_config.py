"""Settings (contract section 3): precedence, typing, defaults, server URL checks, the token."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs
import pytest

from jobsyncd.config import (
    DEFAULTS,
    Settings,
    check_server_url,
    default_config_path,
    default_data_dir,
    load_settings,
    read_token,
)
from jobsyncd.errors import ConfigError


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def env(home: Path) -> dict[str, str]:
    """A clean environment: no JOBSYNCD_* variables, XDG dirs under a private home."""
    return {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
    }


def write_config(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)
    return path


def settings(**values) -> Settings:
    base = {k: v for k, v in DEFAULTS.items()}
    base.update(data_dir="/nonexistent", config_path=None)
    base.update(values)
    return Settings(**base)


# ---- precedence ------------------------------------------------------------------------------


def test_defaults_apply_when_nothing_is_configured(env):
    s = load_settings(None, {}, env)
    assert s.server_url is None
    assert s.token_file is None
    assert s.interval_seconds == 15
    assert s.max_retries == 5
    assert s.backoff_base_seconds == 15
    assert s.request_timeout_seconds == 10
    assert s.verify_tls is True
    assert s.ca_bundle is None
    assert s.allow_insecure_http is False
    assert s.config_path is None


def test_flag_beats_env_beats_file_beats_default(tmp_path, env):
    cfg = write_config(
        tmp_path / "c.toml",
        'server_url = "https://file.example"\ndata_dir = "/from/file"\ninterval_seconds = 30\n',
    )
    s = load_settings(str(cfg), {}, env)
    assert (s.server_url, s.data_dir, s.interval_seconds) == ("https://file.example", "/from/file", 30)
    assert s.max_retries == 5  # default, not in the file

    env2 = dict(env, JOBSYNCD_SERVER_URL="https://env.example", JOBSYNCD_DATA_DIR="/from/env")
    s = load_settings(str(cfg), {}, env2)
    assert (s.server_url, s.data_dir, s.interval_seconds) == ("https://env.example", "/from/env", 30)

    s = load_settings(str(cfg), {"server_url": "https://flag.example", "data_dir": "/from/flag"}, env2)
    assert (s.server_url, s.data_dir) == ("https://flag.example", "/from/flag")


def test_a_flag_left_unset_does_not_hide_the_env(env):
    s = load_settings(None, {"server_url": None, "data_dir": None}, dict(env, JOBSYNCD_SERVER_URL="https://e"))
    assert s.server_url == "https://e"


def test_jobsyncd_config_env_names_the_file_and_the_flag_beats_it(tmp_path, env):
    a = write_config(tmp_path / "a.toml", "interval_seconds = 1\n")
    b = write_config(tmp_path / "b.toml", "interval_seconds = 2\n")
    assert load_settings(None, {}, dict(env, JOBSYNCD_CONFIG=str(a))).interval_seconds == 1
    assert load_settings(str(b), {}, dict(env, JOBSYNCD_CONFIG=str(a))).interval_seconds == 2


def test_the_default_config_path_is_read_when_it_exists(env, home):
    write_config(home / ".config" / "jobsyncd" / "config.toml", "max_retries = 9\n")
    s = load_settings(None, {}, env)
    assert s.max_retries == 9
    assert s.config_path == str(home / ".config" / "jobsyncd" / "config.toml")


def test_an_empty_env_variable_counts_as_unset(tmp_path, env):
    cfg = write_config(tmp_path / "c.toml", 'server_url = "https://file"\n')
    s = load_settings(str(cfg), {}, dict(env, JOBSYNCD_SERVER_URL="", JOBSYNCD_MAX_RETRIES=""))
    assert s.server_url == "https://file"
    assert s.max_retries == 5


# ---- typing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "value"),
    [("true", True), ("false", False), ("1", True), ("0", False), ("yes", True), ("no", False),
     ("TRUE", True), ("No", False)],
)
def test_boolean_env_values_are_read_by_the_key_type(env, raw, value):
    s = load_settings(None, {}, dict(env, JOBSYNCD_VERIFY_TLS=raw, JOBSYNCD_ALLOW_INSECURE_HTTP=raw))
    assert s.verify_tls is value
    assert s.allow_insecure_http is value


@pytest.mark.parametrize("raw", ["maybe", "2", "on?", "tru"])
def test_a_boolean_env_value_that_is_not_a_boolean_is_a_config_error(env, raw):
    with pytest.raises(ConfigError) as err:
        load_settings(None, {}, dict(env, JOBSYNCD_VERIFY_TLS=raw))
    assert err.value.exit_code == 78
    assert "verify_tls" in str(err.value)


def test_number_env_values_are_numbers(env):
    s = load_settings(
        None,
        {},
        dict(env, JOBSYNCD_INTERVAL_SECONDS="2.5", JOBSYNCD_MAX_RETRIES="7",
             JOBSYNCD_BACKOFF_BASE_SECONDS="0", JOBSYNCD_REQUEST_TIMEOUT_SECONDS="3"),
    )
    assert s.interval_seconds == 2.5
    assert s.max_retries == 7 and isinstance(s.max_retries, int)
    assert s.backoff_base_seconds == 0
    assert s.request_timeout_seconds == 3


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("JOBSYNCD_INTERVAL_SECONDS", "fast"),
        ("JOBSYNCD_INTERVAL_SECONDS", "true"),
        ("JOBSYNCD_MAX_RETRIES", "many"),
        ("JOBSYNCD_MAX_RETRIES", "2.5"),
        ("JOBSYNCD_BACKOFF_BASE_SECONDS", "nan"),
        ("JOBSYNCD_REQUEST_TIMEOUT_SECONDS", "inf"),
    ],
)
def test_a_number_env_value_that_is_not_a_number_is_a_config_error(env, var, raw):
    with pytest.raises(ConfigError) as err:
        load_settings(None, {}, dict(env, **{var: raw}))
    assert err.value.exit_code == 78


@pytest.mark.parametrize(
    "var", ["JOBSYNCD_INTERVAL_SECONDS", "JOBSYNCD_REQUEST_TIMEOUT_SECONDS"]
)
def test_a_zero_interval_or_timeout_is_a_config_error(env, var):
    with pytest.raises(ConfigError):
        load_settings(None, {}, dict(env, **{var: "0"}))


def test_a_toml_syntax_error_is_a_config_error_naming_the_file(tmp_path, env):
    cfg = write_config(tmp_path / "bad.toml", 'server_url = "https://x\ninterval_seconds = \n')
    with pytest.raises(ConfigError) as err:
        load_settings(str(cfg), {}, env)
    assert str(cfg) in str(err.value)


@pytest.mark.parametrize(
    "text",
    [
        'interval_seconds = "soon"\n',
        "verify_tls = 3\n",
        "allow_insecure_http = 1.5\n",
        "server_url = 5\n",
        "max_retries = 2.5\n",
        "max_retries = true\n",
        "data_dir = [\"/a\"]\n",
        "token_file = {}\n",
    ],
)
def test_a_wrong_type_in_the_config_file_is_a_config_error(tmp_path, env, text):
    cfg = write_config(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError) as err:
        load_settings(str(cfg), {}, env)
    assert err.value.exit_code == 78


def test_a_missing_config_file_named_by_the_flag_is_a_config_error(tmp_path, env):
    with pytest.raises(ConfigError) as err:
        load_settings(str(tmp_path / "nope.toml"), {}, env)
    assert "nope.toml" in str(err.value)


def test_a_missing_config_file_named_by_jobsyncd_config_is_a_config_error(tmp_path, env):
    with pytest.raises(ConfigError):
        load_settings(None, {}, dict(env, JOBSYNCD_CONFIG=str(tmp_path / "nope.toml")))


def test_a_config_file_that_is_a_directory_is_a_config_error(tmp_path, env):
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError):
        load_settings(str(tmp_path / "dir.toml"), {}, env)


def test_a_missing_default_config_file_is_fine(env, home):
    assert not (home / ".config" / "jobsyncd" / "config.toml").exists()
    assert load_settings(None, {}, env).config_path is None


def test_a_group_readable_config_file_gives_a_warning(tmp_path, env):
    cfg = write_config(tmp_path / "c.toml", "max_retries = 3\n", mode=0o640)
    s = load_settings(str(cfg), {}, env)
    assert any("c.toml" in w and "group" in w for w in s.warnings)
    os.chmod(cfg, 0o600)
    assert load_settings(str(cfg), {}, env).warnings == ()


# ---- data dir and platformdirs ---------------------------------------------------------------


def test_state_directory_first_path_is_the_data_dir(env):
    s = load_settings(None, {}, dict(env, STATE_DIRECTORY="/var/lib/jobsyncd:/var/lib/other"))
    assert s.data_dir == "/var/lib/jobsyncd"
    assert default_data_dir({"STATE_DIRECTORY": "/var/lib/one"}) == "/var/lib/one"


def test_data_dir_from_env_or_file_beats_state_directory(tmp_path, env):
    e = dict(env, STATE_DIRECTORY="/var/lib/jobsyncd", JOBSYNCD_DATA_DIR="/explicit")
    assert load_settings(None, {}, e).data_dir == "/explicit"


def test_data_dir_is_made_absolute_and_expands_the_home(env, home, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert load_settings(None, {"data_dir": "rel"}, env).data_dir == str(tmp_path / "rel")
    assert load_settings(None, {"data_dir": "~/d"}, env).data_dir == str(home / "d")


@pytest.mark.parametrize("xdg", [True, False])
def test_default_dirs_equal_platformdirs(monkeypatch, home, xdg):
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    if xdg:
        monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "cfg"))
        monkeypatch.setenv("XDG_DATA_HOME", str(home / "dat"))
    else:
        monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
        monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert default_config_path(os.environ) == os.path.join(platformdirs.user_config_dir("jobsyncd"), "config.toml")
    assert default_data_dir(os.environ) == platformdirs.user_data_dir("jobsyncd")
    for var in [v for v in os.environ if v.startswith("JOBSYNCD_")]:
        monkeypatch.delenv(var)
    assert load_settings(None, {}, os.environ).data_dir == platformdirs.user_data_dir("jobsyncd")


def test_blank_xdg_variables_fall_back_like_platformdirs(monkeypatch, home):
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", "  ")
    monkeypatch.setenv("XDG_DATA_HOME", "")
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    assert default_config_path(os.environ) == os.path.join(platformdirs.user_config_dir("jobsyncd"), "config.toml")
    assert default_data_dir(os.environ) == platformdirs.user_data_dir("jobsyncd")


# ---- server URL ------------------------------------------------------------------------------


def test_no_server_url_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        check_server_url(settings(server_url=None))
    assert err.value.exit_code == 78


@pytest.mark.parametrize("url", ["http://jobs.example.org", "http://10.0.0.5:8600", "http://localhost.evil.example"])
def test_plain_http_to_a_non_loopback_host_is_refused(url):
    with pytest.raises(ConfigError):
        check_server_url(settings(server_url=url))


def test_plain_http_to_a_non_loopback_host_is_allowed_with_allow_insecure_http():
    assert check_server_url(settings(server_url="http://jobs.example.org", allow_insecure_http=True)) == "http://jobs.example.org/api/v1"


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8600", "http://127.3.2.1", "http://localhost:1", "http://LOCALHOST", "http://[::1]:8600"],
)
def test_plain_http_to_loopback_is_allowed(url):
    assert check_server_url(settings(server_url=url)) == url.rstrip("/") + "/api/v1"


@pytest.mark.parametrize("url", ["https://jobs.example.org/", "https://jobs.example.org"])
def test_a_trailing_slash_on_the_server_url_is_fine(url):
    assert check_server_url(settings(server_url=url)) == "https://jobs.example.org/api/v1"


@pytest.mark.parametrize("url", ["ftp://jobs.example.org", "jobs.example.org", "https://"])
def test_a_server_url_that_is_not_http_or_https_with_a_host_is_refused(url):
    with pytest.raises(ConfigError):
        check_server_url(settings(server_url=url))


# ---- token -----------------------------------------------------------------------------------


def make_token(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_the_token_env_variable_comes_first(tmp_path):
    creds = tmp_path / "creds"
    make_token(creds / "jobsyncd-token", "from-creds\n")
    tf = make_token(tmp_path / "tok", "from-file\n")
    s = settings(token_file=str(tf))
    assert read_token(s, {"JOBSYNCD_TOKEN": " from-env \n", "CREDENTIALS_DIRECTORY": str(creds)})[0] == "from-env"
    assert read_token(s, {"CREDENTIALS_DIRECTORY": str(creds)})[0] == "from-creds"
    assert read_token(s, {})[0] == "from-file"


def test_an_empty_token_env_variable_means_unset(tmp_path):
    tf = make_token(tmp_path / "tok", "from-file")
    assert read_token(settings(token_file=str(tf)), {"JOBSYNCD_TOKEN": ""})[0] == "from-file"


def test_a_credentials_directory_without_our_token_falls_back_to_the_token_file(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    tf = make_token(tmp_path / "tok", "from-file")
    assert read_token(settings(token_file=str(tf)), {"CREDENTIALS_DIRECTORY": str(creds)})[0] == "from-file"


def test_token_file_whitespace_is_stripped(tmp_path):
    tf = make_token(tmp_path / "tok", "\n  secret-token \t\n\n")
    assert read_token(settings(token_file=str(tf)), {}) == ("secret-token", [])


def test_no_token_anywhere_is_none():
    assert read_token(settings(), {}) == (None, [])


def test_an_unreadable_token_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        read_token(settings(token_file=str(tmp_path / "missing")), {})


def test_an_empty_token_file_is_a_config_error(tmp_path):
    tf = make_token(tmp_path / "tok", "  \n")
    with pytest.raises(ConfigError):
        read_token(settings(token_file=str(tf)), {})


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_token_file_group_or_others_can_read_gives_a_warning(tmp_path, mode):
    tf = make_token(tmp_path / "tok", "secret-token", mode=mode)
    token, warnings = read_token(settings(token_file=str(tf)), {})
    assert token == "secret-token"
    assert len(warnings) == 1 and str(tf) in warnings[0]
    assert "secret-token" not in warnings[0]


def test_a_private_token_file_gives_no_warning(tmp_path):
    tf = make_token(tmp_path / "tok", "secret-token", mode=0o600)
    assert read_token(settings(token_file=str(tf)), {})[1] == []


def test_token_file_path_expands_the_home(tmp_path, env, home, monkeypatch):
    monkeypatch.setenv("HOME", str(home))
    make_token(home / "tok", "t")
    s = load_settings(None, {}, dict(env, JOBSYNCD_TOKEN_FILE="~/tok"))
    assert s.token_file == str(home / "tok")
    assert read_token(s, {})[0] == "t"
