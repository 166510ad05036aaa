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
GIB = 1 << 30


class Key:
    """One configuration key, declared once: the loader, the range checks, `config show`,
    `config init` and the README's table all come from these declarations."""

    __slots__ = ("name", "kind", "default", "help", "lo", "hi", "lo_open", "zero_ok", "example")

    def __init__(
        self,
        name: str,
        kind: str,  # "str", "bool", "number" (int or float) or "int"
        default: Any,
        help: str,
        lo: float | None = None,
        hi: float | None = None,
        lo_open: bool = False,
        zero_ok: bool = False,
        example: str | None = None,
    ) -> None:
        self.name, self.kind, self.default, self.help = name, kind, default, help
        self.lo, self.hi, self.lo_open, self.zero_ok = lo, hi, lo_open, zero_ok
        self.example = example  # shown by `config init` for a key without a default

    def range_text(self) -> str:
        if self.lo is None:
            return ""
        lo, hi = _number_text(self.lo), _number_text(self.hi)
        low = f"more than {lo}" if self.lo_open else lo
        text = f"{low}, at most {hi}" if self.lo_open else f"{low} to {hi}"
        return f"0, or {text}" if self.zero_ok else text

    def check(self, value: Any, origin: str) -> None:
        """ConfigError unless `value` (already of the key's type) is in the key's range."""
        if self.lo is None or (self.zero_ok and value == 0):
            return
        too_low = value <= self.lo if self.lo_open else value < self.lo
        if too_low or value > self.hi:
            raise ConfigError(f"{self.name} from {origin} must be {self.range_text()}, not {value}")


def _number_text(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


SCHEMA: tuple[Key, ...] = (
    Key(
        "server_url",
        "str",
        None,
        "base URL of the job server (the agent adds /api/v1)",
        example="https://jobs.example.org",
    ),
    Key(
        "token_file",
        "str",
        None,
        "file holding the bearer token, chmod 600 (JOBSYNCD_TOKEN wins over it)",
        example="~/.config/jobsyncd/token",
    ),
    Key("interval_seconds", "number", 15, "seconds between the daemon's passes", 1, 86400),
    Key("max_retries", "int", 5, "a job goes failed when its retry_count reaches this", 1, 1000),
    Key(
        "backoff_base_seconds",
        "number",
        15,
        "an errored job waits between half and all of base * 2^(retries-1) s; 0: at once",
        0,
        86400,
    ),
    Key(
        "request_timeout_seconds",
        "number",
        10,
        "connect and read timeout; a whole answer must come within 3 times this",
        0,
        3600,
        lo_open=True,
    ),
    Key("verify_tls", "bool", True, "check the server's TLS certificate"),
    Key(
        "ca_bundle",
        "str",
        None,
        "an extra CA file to trust (added to the default CAs)",
        example="/etc/ssl/my-ca.pem",
    ),
    Key(
        "allow_insecure_http",
        "bool",
        False,
        "allow plain http:// to hosts other than loopback (the token crosses in clear)",
    ),
    Key("live", "bool", True, "the daemon keeps a long-poll open on the server's change feed"),
    Key(
        "upload_chunk_bytes",
        "int",
        4194304,
        "audio larger than this goes up resumably in chunks of this size; 0: never",
        65536,
        GIB,
        zero_ok=True,
    ),
    Key(
        "data_dir",
        "str",
        None,
        "the store and audio copies (default: $STATE_DIRECTORY, else the user data dir)",
        example="~/.local/share/jobsyncd",
    ),
)
BY_NAME: dict[str, Key] = {key.name: key for key in SCHEMA}
KEYS: dict[str, str] = {key.name: key.kind for key in SCHEMA}
DEFAULTS: dict[str, Any] = {key.name: key.default for key in SCHEMA}
CONFIG_FILE_MAX_BYTES = 1 << 20  # a config file is a few hundred bytes; /dev/zero is not one
TOKEN_FILE_MAX_BYTES = 1 << 16


class Settings:
    """The effective settings of one run (read-only by convention).

    A plain class rather than a frozen dataclass: `dataclasses` imports `inspect`, which would
    cost every local command ~10 ms of start-up time.
    """

    __slots__ = (*KEYS, "config_path", "warnings", "sources")

    server_url: str | None
    token_file: str | None
    interval_seconds: float
    max_retries: int
    backoff_base_seconds: float
    request_timeout_seconds: float
    verify_tls: bool
    ca_bundle: str | None
    allow_insecure_http: bool
    live: bool
    upload_chunk_bytes: int
    data_dir: str
    config_path: str | None  # the file that was read, if any
    warnings: tuple[str, ...]
    sources: dict[str, tuple[str, str | None]]  # key -> (flag|env|file|default, origin)

    def __init__(
        self,
        config_path: str | None = None,
        warnings: tuple[str, ...] = (),
        sources: dict[str, tuple[str, str | None]] | None = None,
        **values: Any,
    ) -> None:
        for key in KEYS:
            setattr(self, key, values.get(key, DEFAULTS[key]))
        self.config_path = config_path
        self.warnings = warnings
        self.sources = sources or {}

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
            return _usable_text(key, value, origin)
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
            # NaN is the one value unequal to itself (math.isnan would overflow on a huge int).
            if value != value or value in (float("inf"), float("-inf")):  # noqa: PLR0124
                raise ConfigError(f"{key} from {origin} must be a finite number")
            if kind == "int":
                if isinstance(value, float) and not value.is_integer():
                    raise ConfigError(f"{key} from {origin} must be a whole number, not {value}")
                value = int(value)
            # Every source is checked, not only the one that wins: a bad value in the file is
            # a bad file even while the environment overrides it.
            BY_NAME[key].check(value, origin)
            return value
    wanted = {
        "str": "a string",
        "bool": "true or false",
        "number": "a number",
        "int": "a whole number",
    }
    raise ConfigError(f"{key} from {origin} must be {wanted[kind]}, not {value!r}")


def _usable_text(key: str, value: str, origin: str) -> str:
    """A string setting must be text a path or URL can hold: UTF-8 (a non-UTF-8 byte in the
    environment arrives as a lone surrogate) and no NUL (TOML can spell one)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{key} from {origin} is not valid UTF-8") from None
    if "\x00" in value:
        raise ConfigError(f"{key} from {origin} holds a NUL character")
    return value


def _unknown_key_warning(path: str, key: str) -> str:
    import difflib  # only when a key is misspelt

    close = difflib.get_close_matches(key, list(KEYS), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"config file {path}: unknown key {key!r} ignored{hint}"


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
            raw = fh.read(CONFIG_FILE_MAX_BYTES + 1)
        if len(raw) > CONFIG_FILE_MAX_BYTES:
            raise ConfigError(f"config file {path} is larger than 1 MiB; is it the right file?")
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {exc.start}); TOML files are UTF-8"
        ) from None
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
    sources: dict[str, tuple[str, str | None]] = {k: ("default", None) for k in KEYS}
    for key, value in file_values.items():
        if key not in KEYS:
            warnings.append(_unknown_key_warning(path, key))
            continue
        values[key] = _coerce(key, value, f"config file {path}")
        sources[key] = ("file", os.path.abspath(path))
    for key in KEYS:
        env_value = environ.get("JOBSYNCD_" + key.upper())
        if env_value is not None and env_value != "":
            values[key] = _coerce(key, env_value, "JOBSYNCD_" + key.upper(), from_text=True)
            sources[key] = ("env", "JOBSYNCD_" + key.upper())
    for key, value in (overrides or {}).items():
        if value is not None:
            flag = "--" + ("server" if key == "server_url" else key.replace("_", "-"))
            values[key] = _coerce(key, value, flag)
            sources[key] = ("flag", flag)
    if not values["data_dir"]:
        values["data_dir"] = default_data_dir(environ)
        if environ.get("STATE_DIRECTORY"):
            sources["data_dir"] = ("env", "STATE_DIRECTORY")
    values["data_dir"] = os.path.abspath(os.path.expanduser(values["data_dir"]))
    _usable_text("data_dir", values["data_dir"], "the environment (HOME or XDG_DATA_HOME)")
    for key in ("token_file", "ca_bundle"):
        if values[key]:
            values[key] = os.path.expanduser(values[key])
    return Settings(**values, config_path=read_path, warnings=tuple(warnings), sources=sources)


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def toml_value(value: Any) -> str:
    """A value as TOML writes it (the config file's own spelling)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"{value:g}" if isinstance(value, float) else str(value)
    import json  # a JSON string is a valid TOML basic string for the text we write

    return json.dumps(str(value), ensure_ascii=False)


def config_template(server_url: str | None = None) -> str:
    """What `config init` writes: every key as a commented `# key = default` line with its
    help, `server_url` active when given."""
    lines = [
        "# jobsyncd configuration (TOML). Every key may also come from JOBSYNCD_<KEY>;",
        "# a command-line flag beats the environment, which beats this file.",
        "# `jobsyncd config show` prints what is in effect, `jobsyncd config check` tests it.",
        "",
    ]
    for key in SCHEMA:
        help_line = f"# {key.help}"
        if key.range_text():
            help_line += f" ({key.range_text()})"
        lines.append(help_line)
        if key.name == "server_url" and server_url:
            lines.append(f"server_url = {toml_value(server_url)}")
        elif key.default is None:
            lines[-1] += " (no default; for example:)"
            lines.append(f"# {key.name} = {toml_value(key.example or '')}")
        else:
            lines.append(f"# {key.name} = {toml_value(key.default)}")
        lines.append("")
    return "\n".join(lines)


def token_source(
    settings: Settings, environ: Mapping[str, str] = os.environ
) -> tuple[str, str | None]:
    """Where the token would come from: (env|file|default, origin), never the token."""
    if (environ.get("JOBSYNCD_TOKEN") or "").strip():
        return "env", "JOBSYNCD_TOKEN"
    creds = environ.get("CREDENTIALS_DIRECTORY")
    if creds and os.path.exists(os.path.join(creds, "jobsyncd-token")):
        return "file", os.path.join(creds, "jobsyncd-token")
    if settings.token_file:
        return "file", settings.token_file
    return "default", None


def is_loopback_host(host: str) -> bool:
    import ipaddress

    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_server_url(settings: Settings, http_layer: bool = True) -> str:
    """The API base URL (`.../api/v1`), or ConfigError before any connection is made.
    `http_layer` False leaves out the check that urllib3 parses it too (50 ms of imports): for
    a `sync` that may only hand over to a daemon, which checks its own URL."""
    from urllib.parse import urlsplit

    url = settings.server_url
    if not url:
        raise ConfigError(
            "no server URL: set server_url in the config file, JOBSYNCD_SERVER_URL or --server"
        )
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that is not a number in 0-65535
        host = parts.hostname
    except ValueError as exc:
        raise ConfigError(f"server URL {url!r} does not parse: {exc}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigError(f"server URL {url!r} must be http:// or https:// with a host")
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"server URL {url!r} has port {port}, outside 1-65535")
    if any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in url):
        raise ConfigError(f"server URL {url!r} holds spaces or control characters")
    if not _is_ip(host):
        try:
            host.encode("idna")  # what the resolver will do: empty or over-long labels fail
        except UnicodeError:
            raise ConfigError(f"server URL {url!r} has an invalid host name {host!r}") from None
    if parts.username or parts.password:
        raise ConfigError("server URL must not carry credentials; use token_file or JOBSYNCD_TOKEN")
    if parts.scheme == "http" and not settings.allow_insecure_http and not is_loopback_host(host):
        raise ConfigError(
            f"refusing plain http:// to {host}: use https://, or set "
            "allow_insecure_http = true if you really mean it"
        )
    api_base = url.rstrip("/") + "/api/v1"
    if http_layer:
        _check_requests_can_parse(api_base)
    return api_base


def _check_requests_can_parse(api_base: str) -> None:
    """A URL the HTTP layer cannot parse would fail every request of every pass, each
    counted as a job's retry until all are failed: refuse it here instead."""
    from urllib3.exceptions import LocationParseError  # sync and daemon import it anyway
    from urllib3.util import parse_url

    try:
        parse_url(api_base + "/jobs")
    except (LocationParseError, ValueError) as exc:
        raise ConfigError(
            f"server URL {api_base[: -len('/api/v1')]!r} does not parse: {exc}"
        ) from None


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
                token = fh.read(TOKEN_FILE_MAX_BYTES).strip()
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
