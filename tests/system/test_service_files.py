"""The shipped service files: systemd units checked by systemd-analyze, launchd plists parsed.

systemd-analyze verify fails on an ExecStart= binary that does not exist, and
/usr/local/bin/jobsyncd rarely does on a test machine, so the units are verified as copies in
a temporary directory with only the ExecStart= executable replaced by an existing one.
"""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "systemd"
LAUNCHD = REPO / "launchd"

SYSTEM_UNITS = ["jobsyncd.service", "jobsyncd-sync.service", "jobsyncd-sync.timer"]
SYSTEM_SERVICES = [unit for unit in SYSTEM_UNITS if unit.endswith(".service")]
USER_SERVICE = "user/jobsyncd.service"

# The system services keep only what talking to the server needs (AF_INET/AF_INET6, no
# PrivateNetwork=, no IPAddressAllow=), the notify socket's AF_UNIX, no chroot, and the
# rtc read access ProtectClock= itself adds: 1.1 with systemd 252. Dropping any one
# hardening option costs 0.1 to 0.5, so 1.5 catches a regression while leaving room for
# newer systemd versions that weigh things differently.
SYSTEM_EXPOSURE_MAX = 1.5
# The offline analysis scores a user unit as if it ran as root with every capability (it
# runs as the login user with none) and the user unit avoids namespace options on purpose
# (systemd/README.md): 6.1 with systemd 252. The bound catches a lost seccomp filter.
USER_EXPOSURE_MAX = 6.5

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed"
)


def unit_entries(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as section -> [(key, value)], keeping repeated keys in order."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path}: {raw!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: {raw!r} is not key=value"
        current.append((key.strip(), value.strip()))
    return sections


def values(path: Path, key: str, section: str = "Service") -> list[str]:
    return [v for k, v in unit_entries(path).get(section, []) if k == key]


def value(path: Path, key: str, section: str = "Service") -> str:
    found = values(path, key, section)
    assert len(found) == 1, f"{path.name}: expected one {key}=, found {found}"
    return found[0]


def analyze(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # --user needs a runtime dir; CI may have none. A short path of its own under /tmp: socket
    # paths built in it (gpg-agent's units) must fit in 108 bytes, which pytest-xdist's longer
    # tmp_path does not leave room for.
    runtime_dir = Path(tempfile.mkdtemp(prefix="jsd-rt-", dir="/tmp"))
    env = {
        **os.environ,
        "SYSTEMD_COLORS": "0",
        "SYSTEMD_PAGER": "cat",
        "SYSTEMD_LOG_COLOR": "0",
        "XDG_RUNTIME_DIR": str(runtime_dir),
    }
    assert SYSTEMD_ANALYZE is not None
    try:
        return subprocess.run(
            [SYSTEMD_ANALYZE, *args],
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=env,
            timeout=60,
        )
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """Copies of systemd/ (the timer needs its service next to it) with a runnable ExecStart."""
    executable = shutil.which("true") or "/bin/true"
    copies = tmp_path / "units"
    shutil.copytree(SYSTEMD, copies, ignore=shutil.ignore_patterns("*.md"))
    for unit in copies.rglob("*.service"):
        text = unit.read_text(encoding="utf-8")
        rewritten, count = re.subn(
            r"^ExecStart=\S+", f"ExecStart={executable}", text, flags=re.MULTILINE
        )
        assert count == 1, f"{unit.name}: expected one ExecStart="
        unit.write_text(rewritten, encoding="utf-8")
    return copies


def exposure(output: str) -> float:
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, f"no overall exposure in:\n{output}"
    return float(match.group(1))


def kept_exposures(output: str) -> list[str]:
    return [line.split()[1] for line in output.splitlines() if line.startswith("✗ ")]


# systemd-analyze verify and security


@needs_systemd_analyze
@pytest.mark.parametrize("unit", SYSTEM_UNITS)
def test_system_unit_passes_systemd_analyze_verify_without_a_warning(
    unit: str, unit_dir: Path, tmp_path: Path
) -> None:
    result = analyze("verify", "--man=no", str(unit_dir / unit), tmp_path=tmp_path)
    assert (result.returncode, result.stderr) == (0, "")


@needs_systemd_analyze
def test_user_unit_passes_systemd_analyze_verify_without_a_warning(
    unit_dir: Path, tmp_path: Path
) -> None:
    result = analyze(
        "verify", "--man=no", "--user", str(unit_dir / USER_SERVICE), tmp_path=tmp_path
    )
    assert (result.returncode, result.stderr) == (0, "")


@needs_systemd_analyze
def test_verify_would_report_an_unknown_key(unit_dir: Path, tmp_path: Path) -> None:
    # verify exits 0 on an unknown key and only warns: the stderr check above is what counts.
    unit = unit_dir / "jobsyncd.service"
    unit.write_text(
        unit.read_text(encoding="utf-8").replace("Type=notify", "Typo=notify"), encoding="utf-8"
    )
    result = analyze("verify", "--man=no", str(unit), tmp_path=tmp_path)
    assert "Typo" in result.stderr


@needs_systemd_analyze
@pytest.mark.parametrize("unit", SYSTEM_SERVICES)
def test_system_service_security_exposure_is_low(unit: str, unit_dir: Path, tmp_path: Path) -> None:
    result = analyze("security", "--offline=yes", str(unit_dir / unit), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert exposure(result.stdout) <= SYSTEM_EXPOSURE_MAX, result.stdout


@needs_systemd_analyze
@pytest.mark.parametrize("unit", SYSTEM_SERVICES)
def test_every_exposure_a_system_service_keeps_is_explained_in_the_readme(
    unit: str, unit_dir: Path, tmp_path: Path
) -> None:
    result = analyze("security", "--offline=yes", str(unit_dir / unit), tmp_path=tmp_path)
    # Inside a Markdown table cell a "|" is escaped with a backslash.
    readme = (SYSTEMD / "README.md").read_text(encoding="utf-8").replace("\\|", "|")
    kept = kept_exposures(result.stdout)
    assert kept, "expected the network exposures at least"
    assert [name for name in kept if f"`{name}`" not in readme] == []


@needs_systemd_analyze
def test_user_service_security_exposure_stays_bounded(unit_dir: Path, tmp_path: Path) -> None:
    result = analyze(
        "security", "--offline=yes", "--user", str(unit_dir / USER_SERVICE), tmp_path=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert exposure(result.stdout) <= USER_EXPOSURE_MAX, result.stdout


# What the units say, read without systemd


def test_daemon_unit_is_a_notify_service_reloaded_by_sighup() -> None:
    unit = SYSTEMD / "jobsyncd.service"
    assert value(unit, "Type") == "notify"
    assert value(unit, "NotifyAccess") == "main"
    assert value(unit, "ExecStart").split()[1:] == ["daemon"]
    assert value(unit, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert value(unit, "WatchdogSec") == "60"


def test_daemon_unit_restarts_on_failure_but_not_on_config_error_or_second_daemon() -> None:
    unit = SYSTEMD / "jobsyncd.service"
    assert value(unit, "Restart") == "on-failure"
    assert set(value(unit, "RestartPreventExitStatus").split()) == {"75", "78"}


def test_daemon_unit_gives_the_daemon_more_than_its_5_second_stop() -> None:
    assert int(value(SYSTEMD / "jobsyncd.service", "TimeoutStopSec")) > 5


@pytest.mark.parametrize("unit", SYSTEM_SERVICES)
def test_system_services_get_state_config_and_token_from_systemd(unit: str) -> None:
    path = SYSTEMD / unit
    assert value(path, "StateDirectory") == "jobsyncd"
    assert value(path, "ConfigurationDirectory") == "jobsyncd"
    assert "JOBSYNCD_CONFIG=/etc/jobsyncd/config.toml" in values(path, "Environment")
    assert value(path, "LoadCredential") == "jobsyncd-token:/etc/jobsyncd/token"
    assert value(path, "UMask") == "0077"


def test_daemon_and_oneshot_share_user_store_and_sandbox() -> None:
    daemon = unit_entries(SYSTEMD / "jobsyncd.service")["Service"]
    oneshot = unit_entries(SYSTEMD / "jobsyncd-sync.service")["Service"]
    only_daemon = {"Type", "NotifyAccess", "ExecStart", "ExecReload", "WatchdogSec", "Restart"}
    only_daemon |= {"RestartSec", "RestartPreventExitStatus"}
    only_oneshot = {"Type", "ExecStart", "SuccessExitStatus", "TimeoutStartSec"}
    assert [e for e in daemon if e[0] not in only_daemon] == [
        e for e in oneshot if e[0] not in only_oneshot
    ]


def test_oneshot_unit_runs_sync_and_takes_try_again_later_as_success() -> None:
    unit = SYSTEMD / "jobsyncd-sync.service"
    assert value(unit, "Type") == "oneshot"
    assert value(unit, "ExecStart").split()[1:] == ["sync"]
    assert value(unit, "SuccessExitStatus").split() == ["75"]
    assert values(unit, "Restart") == []


def test_timer_runs_every_five_minutes_and_uses_persistent_only_with_oncalendar() -> None:
    timer = SYSTEMD / "jobsyncd-sync.timer"
    assert value(timer, "OnUnitActiveSec", "Timer") == "5min"
    assert value(timer, "OnBootSec", "Timer")
    if values(timer, "Persistent", "Timer"):
        assert values(timer, "OnCalendar", "Timer")
    assert (SYSTEMD / "jobsyncd-sync.service").exists()


def test_user_unit_shares_the_login_users_store_with_the_cli() -> None:
    unit = SYSTEMD / USER_SERVICE
    assert value(unit, "Type") == "notify"
    assert value(unit, "ExecStart").split()[1:] == ["daemon"]
    assert value(unit, "ExecReload") == "/bin/kill -HUP $MAINPID"
    # A StateDirectory= would set $STATE_DIRECTORY and move the daemon's data dir away
    # from the one the user's `jobsyncd create` writes to.
    for key in ("StateDirectory", "User", "DynamicUser", "Environment"):
        assert values(unit, key) == [], key
    assert value(unit, "WantedBy", "Install") == "default.target"


# launchd


def load_plist(name: str) -> dict[str, object]:
    with (LAUNCHD / name).open("rb") as f:
        plist = plistlib.load(f)
    assert isinstance(plist, dict)
    return plist


@pytest.mark.parametrize(
    ("name", "command"),
    [("org.jobsyncd.daemon.plist", "daemon"), ("org.jobsyncd.sync.plist", "sync")],
)
def test_plist_parses_and_runs_the_right_command(name: str, command: str) -> None:
    plist = load_plist(name)
    assert plist["Label"] == name.removesuffix(".plist")
    arguments = plist["ProgramArguments"]
    assert isinstance(arguments, list)
    assert arguments[-1] == command
    assert Path(arguments[0]).name == "jobsyncd" and arguments[0].startswith("/")
    assert plist["RunAtLoad"] is True
    assert plist["Umask"] == 0o077
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert str(plist[key]).startswith("/"), key  # launchd expands no ~
    environment = plist["EnvironmentVariables"]
    assert isinstance(environment, dict)
    assert all(isinstance(v, str) for v in environment.values())


def test_daemon_plist_is_kept_alive_after_a_crash() -> None:
    plist = load_plist("org.jobsyncd.daemon.plist")
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert "StartInterval" not in plist


def test_sync_plist_is_a_one_shot_every_five_minutes() -> None:
    plist = load_plist("org.jobsyncd.sync.plist")
    assert plist["StartInterval"] == 300
    assert "KeepAlive" not in plist


def test_the_readme_shows_a_crontab_line_for_the_one_shot() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    block = readme.split("```crontab", 1)[1].split("```", 1)[0]
    lines = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 1
    fields = lines[0].split(None, 5)
    assert len(fields) == 6 and fields[5].split()[0] == "jobsyncd" and "sync" in fields[5].split()
