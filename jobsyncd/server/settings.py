"""The reference server's settings: environment variables, limits and the token file."""

from __future__ import annotations

import math
import os

from jobsyncd.server.errors import ConfigError

DEFAULT_MAX_UPLOAD_BYTES = 64 << 20  # the `audio` part
DEFAULT_USER = "default"  # the collection of a server without tokens or with a single token

ENV_DB = "JOBSYNCD_SERVER_DB"
ENV_AUDIO_DIR = "JOBSYNCD_SERVER_AUDIO_DIR"
ENV_TOKEN_FILE = "JOBSYNCD_SERVER_TOKEN_FILE"
ENV_MAX_UPLOAD = "JOBSYNCD_SERVER_MAX_UPLOAD_BYTES"
ENV_TOMBSTONE_DAYS = "JOBSYNCD_SERVER_TOMBSTONE_DAYS"


def load_tokens(path: str | os.PathLike[str]) -> list[tuple[bytes, str]]:
    """The token file: one line without a space (one token, one user), or lines `NAME TOKEN`.

    Blank lines and `#` comments are allowed; anything else raises ConfigError.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read token file {path}: {e}") from None
    single: list[str] = []
    named: list[tuple[str, str]] = []
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split()
        if len(fields) == 1:
            single.append(fields[0])
        elif len(fields) == 2:
            named.append((fields[0], fields[1]))
        else:
            raise ConfigError(f"token file {path}, line {number}: expected TOKEN or NAME TOKEN")
    if single and (named or len(single) > 1):
        raise ConfigError(
            f"token file {path}: either one line with a single token, or lines NAME TOKEN"
        )
    if single:
        return [(single[0].encode(), DEFAULT_USER)]
    if not named:
        raise ConfigError(f"token file {path}: no token in it")
    names = [name for name, _ in named]
    tokens = [token for _, token in named]
    if len(set(names)) != len(names):
        raise ConfigError(f"token file {path}: a user name appears twice")
    if len(set(tokens)) != len(tokens):
        raise ConfigError(f"token file {path}: a token appears twice")
    return [(token.encode(), name) for name, token in named]


def parse_size(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{what}: not a whole number of bytes: {text!r}") from None
    if value < 1:
        raise ConfigError(f"{what}: must be at least 1 byte")
    return value


def parse_days(text: str, what: str) -> float:
    """How long tombstones are kept: a number of days, 0 or more, fractions allowed."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{what}: not a number of days: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{what}: must be a number of days, 0 or more")
    return value
