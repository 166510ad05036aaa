"""Settings from flag, environment, TOML file and defaults (contract section 3), and the token.

Precedence: command-line flag > `JOBSYNCD_<KEY>` > config file > default. Every problem raises
ConfigError (exit 78) with one line that names the key or the file.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError

APP = "jobsyncd"

# key -> type: "str", "bool", "number" (int or float), "int"
KEYS: dict[str, str] = {
    "server_url": "str",
    "token_file": "str",
    "interval_seconds": "number",
    "max_retries": "int",
    "backoff_base_seconds": "number",
    "request_timeout_seconds": "number",
    "verify_tls": "bool",
    "ca_bundle": "str",
    "allow_insecure_http": "bool",
    "data_dir": "str",
}

DEFAULTS: dict[str, Any] = {
    "server_url": None,
    "token_file": None,
    "interval_seconds": 15,
    "max_retries": 5,
    "backoff_base_seconds": 15,
    "request_timeout_seconds": 10,
    "verify_tls": True,
    "ca_bundle": None,
    "allow_insecure_http": False,
    "data_dir": None,
}


class Settings:
    """The effective settings of one run (read-only by convention).

    A plain class rather than a frozen dataclass: `dataclasses` imports `inspect`, which would
    cost every local command ~10 ms of start-up time.
    """

    __slots__ = (*KEYS, "config_path", "warnings")

    server_url: str | None
    token_file: str | None
    interval_seconds: float
    max_retries: int
    backoff_base_seconds: float
    request_timeout_seconds: float
    verify_tls: bool
    ca_bundle: str | None
    allow_insecure_http: bool
    data_dir: str
    config_path: str | None  # the file that was read, if any
    warnings: tuple[str, ...]

    def __init__(
        self, config_path: str | None = None, warnings: tuple[str, ...] = (), **values: Any
    ) -> None:
        for key in KEYS:
            setattr(self, key, values.get(key, DEFAULTS[key]))
        self.config_path = config_path
        self.warnings = warnings

    def __repr__(self) -> str:
        return "Settings(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in KEYS) + ")"


def _user_dir(kind: str, environ: Mapping[str, str]) -> str:
    """platformdirs' user config/data dir for jobsyncd.

    On Linux this is the XDG rule that platformdirs applies, computed here because importing
    platformdirs costs ~9 ms, a quarter of a `jobsyncd create` (tests check both agree).
    """
    if sys.platform.startswith("linux"):
        var, fallback = {
            "config": ("XDG_CONFIG_HOME", "~/.config"),
            "data": ("XDG_DATA_HOME", "~/.local/share"),
        }[kind]
        base = environ.get(var, "").strip() or os.path.expanduser(fallback)
        return os.path.join(base, APP)
    import platformdirs  # costs start-up time; only off Linux

    return (
        platformdirs.user_config_dir(APP) if kind == "config" else platformdirs.user_data_dir(APP)
    )


def default_config_path(environ: Mapping[str, str] = os.environ) -> str:
    return os.path.join(_user_dir("config", environ), "config.toml")


def default_data_dir(environ: Mapping[str, str] = os.environ) -> str:
    state = environ.get("STATE_DIRECTORY", "")
    if state:
        # systemd passes a colon-separated list when several StateDirectory= are given.
        return state.split(":")[0]
    return _user_dir("data", environ)


def _coerce(key: str, value: Any, origin: str, from_text: bool = False) -> Any:
    """`value` as the key's type. Only environment values (`from_text`) are read from strings:
    in the TOML file, `verify_tls = "no"` is a string where a boolean belongs, an error."""
    kind = KEYS[key]
    if kind == "str":
        if isinstance(value, str):
            return value
    elif kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and from_text:
            low = value.strip().lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
    elif kind in ("number", "int"):
        if isinstance(value, str) and from_text:
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"{key} from {origin} must be a finite number")
            if kind == "int":
                if isinstance(value, float) and not value.is_integer():
                    raise ConfigError(f"{key} from {origin} must be a whole number, not {value}")
                return int(value)
            return value
    wanted = {
        "str": "a string",
        "bool": "true or false",
        "number": "a number",
        "int": "a whole number",
    }
    raise ConfigError(f"{key} from {origin} must be {wanted[kind]}, not {value!r}")


def _check_ranges(values: dict[str, Any]) -> None:
    if values["interval_seconds"] <= 0:
        raise ConfigError("interval_seconds must be greater than 0")
    if values["max_retries"] < 1:
        raise ConfigError("max_retries must be at least 1")
    if values["backoff_base_seconds"] < 0:
        raise ConfigError("backoff_base_seconds must be 0 or more")
    if values["request_timeout_seconds"] <= 0:
        raise ConfigError("request_timeout_seconds must be greater than 0")


def group_or_other_can_read(path: str) -> bool:
    try:
        return bool(os.stat(path).st_mode & (stat.S_IRGRP | stat.S_IROTH))
    except OSError:
        return False


def _read_toml(path: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None


def load_settings(
    config_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Settings:
    """Settings for this run. `config_file` is the `--config` flag; `overrides` other flags."""
    warnings: list[str] = []
    explicit = config_file or environ.get("JOBSYNCD_CONFIG") or None
    path = explicit or default_config_path(environ)
    file_values: dict[str, Any] = {}
    read_path: str | None = None
    if explicit or os.path.exists(path):
        if not os.path.exists(path):
            raise ConfigError(f"config file {path} does not exist")
        file_values = _read_toml(path)
        read_path = os.path.abspath(path)
        if group_or_other_can_read(path):
            warnings.append(f"config file {path} can be read by group or others (chmod 600 it)")
    values = dict(DEFAULTS)
    for key, value in file_values.items():
        if key not in KEYS:
            warnings.append(f"config file {path}: unknown key {key!r} ignored")
            continue
        values[key] = _coerce(key, value, f"config file {path}")
    for key in KEYS:
        env_value = environ.get("JOBSYNCD_" + key.upper())
        if env_value is not None and env_value != "":
            values[key] = _coerce(key, env_value, "JOBSYNCD_" + key.upper(), from_text=True)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, value, "--" + key.replace("_", "-"))
    _check_ranges(values)
    if not values["data_dir"]:
        values["data_dir"] = default_data_dir(environ)
    values["data_dir"] = os.path.abspath(os.path.expanduser(values["data_dir"]))
    for key in ("token_file", "ca_bundle"):
        if values[key]:
            values[key] = os.path.expanduser(values[key])
    return Settings(**values, config_path=read_path, warnings=tuple(warnings))


def is_loopback_host(host: str) -> bool:
    import ipaddress

    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_server_url(settings: Settings) -> str:
    """The API base URL (`.../api/v1`), or ConfigError before any connection is made."""
    from urllib.parse import urlsplit

    url = settings.server_url
    if not url:
        raise ConfigError(
            "no server URL: set server_url in the config file, JOBSYNCD_SERVER_URL or --server"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"server URL {url!r} must be http:// or https:// with a host")
    if parts.username or parts.password:
        raise ConfigError("server URL must not carry credentials; use token_file or JOBSYNCD_TOKEN")
    if parts.scheme == "http" and not settings.allow_insecure_http:
        if not is_loopback_host(parts.hostname):
            raise ConfigError(
                f"refusing plain http:// to {parts.hostname}: use https://, or set "
                "allow_insecure_http = true if you really mean it"
            )
    return url.rstrip("/") + "/api/v1"


def read_token(
    settings: Settings, environ: Mapping[str, str] = os.environ
) -> tuple[str | None, list[str]]:
    """The bearer token and any warnings. Never logged or printed by any caller."""
    warnings: list[str] = []
    token = (environ.get("JOBSYNCD_TOKEN") or "").strip()
    if token:
        return _usable_token(token, "JOBSYNCD_TOKEN"), warnings
    candidates = []
    creds = environ.get("CREDENTIALS_DIRECTORY")
    from_systemd = bool(creds and os.path.exists(os.path.join(creds, "jobsyncd-token")))
    if from_systemd:
        candidates.append(os.path.join(creds or "", "jobsyncd-token"))
    elif settings.token_file:
        candidates.append(settings.token_file)
    for path in candidates:
        try:
            with open(path, encoding="utf-8") as fh:
                token = fh.read().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read token file {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"token file {path} is not UTF-8 text") from None
        if group_or_other_can_read(path) and not from_systemd:
            warnings.append(f"token file {path} can be read by group or others (chmod 600 it)")
        if not token:
            raise ConfigError(f"token file {path} is empty")
        return _usable_token(token, f"token file {path}"), warnings
    return None, warnings


def _usable_token(token: str, origin: str) -> str:
    """A bearer token is one run of visible ASCII characters; say so without echoing it."""
    if not all("!" <= c <= "~" for c in token):
        raise ConfigError(
            f"the token from {origin} holds spaces, line breaks or characters a bearer token "
            "cannot have (a token file holds the token alone)"
        )
    return token
