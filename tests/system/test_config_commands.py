"""`jobsyncd config show|check|init` (issue 10 item 3; contract sections 2 and 3), run as the
installed command against real servers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from faultserver import FaultServer

from jobsyncd.config import SCHEMA

TOKEN = "s3cr3t-token-value"


def run(cli, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    proc = cli(*args)
    assert proc.returncode == code, (
        f"jobsyncd {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )
    assert "Traceback" not in proc.stderr
    return proc


def one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jobsyncd: error: "), proc.stderr
    return lines[0]


def private(path: Path, text: str) -> Path:
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


# ---- config show -----------------------------------------------------------------------------


def test_config_show_json_names_each_settings_source_and_origin(cli, tmp_path):
    config = private(tmp_path / "c.toml", "max_retries = 9\nverify_tls = false\n")
    cli.env["JOBSYNCD_INTERVAL_SECONDS"] = "30"
    shown = json.loads(
        run(cli, "--config", str(config), "config", "show", "--json", "--server", "https://x.org").stdout
    )
    assert set(shown) == {k.name for k in SCHEMA} | {"token"}
    assert shown["server_url"] == {"value": "https://x.org", "source": "flag", "origin": "--server"}
    assert shown["interval_seconds"] == {"value": 30, "source": "env", "origin": "JOBSYNCD_INTERVAL_SECONDS"}
    assert shown["max_retries"] == {"value": 9, "source": "file", "origin": str(config)}
    assert shown["verify_tls"]["value"] is False
    assert shown["live"] == {"value": True, "source": "default", "origin": None}
    assert shown["upload_chunk_bytes"]["value"] == 4194304
    assert shown["data_dir"] == {"value": str(cli.data_dir), "source": "env", "origin": "JOBSYNCD_DATA_DIR"}
    assert shown["token"] == {"value": "unset", "source": "default", "origin": None}


def test_config_show_tells_where_the_token_comes_from_but_never_the_token(cli, tmp_path):
    token_file = private(tmp_path / "token", TOKEN + "\n")
    config = private(tmp_path / "c.toml", f'token_file = "{token_file}"\n')
    for extra, expected in (
        ({}, {"value": "set", "source": "file", "origin": str(token_file)}),
        ({"JOBSYNCD_TOKEN": TOKEN}, {"value": "set", "source": "env", "origin": "JOBSYNCD_TOKEN"}),
    ):
        cli.env.update(extra)
        proc = run(cli, "--config", str(config), "config", "show", "--json")
        assert json.loads(proc.stdout)["token"] == expected
        people = run(cli, "--config", str(config), "config", "show")
        assert TOKEN not in proc.stdout + proc.stderr + people.stdout + people.stderr
        assert "token" in people.stdout and "set" in people.stdout


def test_config_show_with_an_unreadable_token_file_shows_the_rest_and_exits_78(cli, tmp_path):
    config = private(tmp_path / "c.toml", f'token_file = "{tmp_path / "missing"}"\n')
    proc = run(cli, "--config", str(config), "config", "show", "--json", code=78)
    assert json.loads(proc.stdout)["token"]["value"] == "unset"
    assert "token file" in one_error_line(proc)


def test_config_show_with_an_invalid_config_exits_78(cli, tmp_path):
    config = private(tmp_path / "c.toml", "interval_seconds = 0\n")
    one_error_line(run(cli, "--config", str(config), "config", "show", code=78))


# ---- config check ----------------------------------------------------------------------------


def test_config_check_succeeds_against_the_reference_server(cli, ref_server):
    proc = run(cli, "--server", ref_server.url, "config", "check")
    assert "ok" in proc.stdout and proc.stderr == ""


def test_config_check_asks_the_change_feed_then_the_listing_and_nothing_else(cli):
    with FaultServer() as srv:  # a server without the change feed: 404 on /changes
        run(cli, "--server", srv.url, "config", "check")
        paths = [(m, p.split("?")[0]) for m, p, _ in srv.all_requests]
    assert paths == [("GET", "/api/v1/changes"), ("GET", "/api/v1/jobs")]


def test_config_check_without_a_token_on_a_401_says_where_a_token_goes(cli, tmp_path):
    config = private(tmp_path / "c.toml", "")
    with FaultServer(token=TOKEN) as srv:
        proc = run(cli, "--config", str(config), "--server", srv.url, "config", "check", code=77)
    line = one_error_line(proc)
    assert f"no token configured: set token_file in {config} or JOBSYNCD_TOKEN" in line


def test_config_check_without_a_config_file_names_the_default_path_for_the_token(cli):
    with FaultServer(token=TOKEN) as srv:
        line = one_error_line(run(cli, "--server", srv.url, "config", "check", code=77))
    default = Path(cli.env["XDG_CONFIG_HOME"]) / "jobsyncd" / "config.toml"
    assert f"set token_file in {default} or JOBSYNCD_TOKEN" in line


def test_config_check_with_a_wrong_token_exits_77_naming_where_it_came_from(cli):
    cli.env["JOBSYNCD_TOKEN"] = "wrong-token"
    with FaultServer(token=TOKEN) as srv:
        proc = run(cli, "--server", srv.url, "config", "check", code=77)
    line = one_error_line(proc)
    assert "JOBSYNCD_TOKEN" in line and "wrong-token" not in line


def test_config_check_with_the_right_token_succeeds(cli):
    cli.env["JOBSYNCD_TOKEN"] = TOKEN
    with FaultServer(token=TOKEN) as srv:
        proc = run(cli, "--server", srv.url, "config", "check")
    assert "with the token" in proc.stdout and TOKEN not in proc.stdout


def test_config_check_with_the_server_down_exits_75(cli):
    line = one_error_line(run(cli, "--server", "http://127.0.0.1:9", "config", "check", code=75))
    assert "server_url" in line


def test_config_check_with_a_busy_server_exits_75(cli):
    with FaultServer() as srv:
        srv.add_fault("GET", r"/api/v1/.*", status=503, headers={"Retry-After": "5"})
        one_error_line(run(cli, "--server", srv.url, "config", "check", code=75))


def test_config_check_with_no_server_or_a_bad_url_exits_78(cli):
    assert "no server URL" in one_error_line(run(cli, "config", "check", code=78))
    one_error_line(run(cli, "--server", "http://[::1", "config", "check", code=78))


def test_config_check_against_something_that_is_not_a_job_server_exits_1(cli):
    with FaultServer() as srv:
        srv.add_fault("GET", r"/api/v1/jobs", status=500)
        line = one_error_line(run(cli, "--server", srv.url, "config", "check", code=1))
    assert "server_url" in line


# ---- config init -----------------------------------------------------------------------------


def test_config_init_writes_every_key_commented_with_help_private_and_loadable(cli, tmp_path):
    cli.env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    proc = run(cli, "config", "init", "--server", "https://jobs.example.org")
    path = Path(proc.stdout.strip())
    assert path == tmp_path / "xdg" / "jobsyncd" / "config.toml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "xdg").stat().st_mode) == 0o700
    text = path.read_text()
    lines = text.splitlines()
    for key in SCHEMA:
        if key.name == "server_url":
            assert 'server_url = "https://jobs.example.org"' in lines
            continue
        (line,) = [ln for ln in lines if ln.startswith(f"# {key.name} = ")]
        above = lines[lines.index(line) - 1]
        assert above.startswith("# ") and len(above) > 10, above
        if key.default is not None:
            # uncommented, each line is the key's default as TOML reads it
            assert tomllib.loads(line[2:])[key.name] == key.default
    assert tomllib.loads(text) == {"server_url": "https://jobs.example.org"}
    shown = json.loads(run(cli, "config", "show", "--json").stdout)
    assert shown["server_url"]["source"] == "file"
    assert [k for k, v in shown.items() if v["source"] == "file"] == ["server_url"]


def test_config_init_refuses_to_overwrite_a_file(cli, tmp_path):
    config = private(tmp_path / "c.toml", "max_retries = 3\n")
    line = one_error_line(run(cli, "--config", str(config), "config", "init", code=1))
    assert str(config) in line
    assert config.read_text() == "max_retries = 3\n"


def test_config_init_writes_where_jobsyncd_config_says_without_a_server(cli, tmp_path):
    target = tmp_path / "etc" / "jobsyncd" / "config.toml"
    cli.env["JOBSYNCD_CONFIG"] = str(target)
    run(cli, "config", "init")
    assert tomllib.loads(target.read_text()) == {}
    assert "# server_url = " in target.read_text()


def test_config_init_with_a_bad_server_url_writes_nothing(cli, tmp_path):
    target = tmp_path / "c.toml"
    one_error_line(run(cli, "--config", str(target), "config", "init", "--server", "http://[::1", code=78))
    assert not target.exists()


@pytest.mark.parametrize("args", [("config",), ("config", "nope")])
def test_config_without_a_known_subcommand_is_a_usage_error(cli, args):
    one_error_line(run(cli, *args, code=2))
