"""Edge cases found in review: each once a way to leak a token, strand a job or upload one that
should never have left the machine."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.timeout(60)


def _sync(cli, *args: str) -> tuple[int, dict, str]:
    proc = cli("sync", "--json", *args)
    return proc.returncode, json.loads(proc.stdout or "{}"), proc.stderr


def test_a_token_file_with_two_lines_is_a_config_error_that_never_echoes_the_token(
    cli, fault_server, tmp_path
):
    token_file = tmp_path / "token"
    token_file.write_text("# token for prod\nS3CRET-TOKEN-VALUE\n")
    token_file.chmod(0o600)
    cli.env["JOBSYNCD_SERVER_URL"] = fault_server.url
    cli.env["JOBSYNCD_TOKEN_FILE"] = str(token_file)
    cli("create", "--text", "x", check=True)
    proc = cli("sync")
    assert proc.returncode == 78
    assert "S3CRET" not in proc.stdout + proc.stderr
    assert proc.stderr.startswith("jobsyncd: error:") and proc.stderr.count("\n") == 1


def test_a_job_created_during_an_offline_pass_and_deleted_never_reaches_the_server(
    cli, fault_server
):
    cli.env["JOBSYNCD_SERVER_URL"] = "http://127.0.0.1:9"  # closed: the pass is skipped offline
    cli("create", "--text", "private draft", check=True)
    code, summary, _ = _sync(cli)
    assert code == 75 and summary["skipped"] == "offline"
    local_id = cli.jobs()[0]["local_id"]
    cli("delete", local_id, check=True)
    cli.env["JOBSYNCD_SERVER_URL"] = fault_server.url
    code, summary, stderr = _sync(cli)
    assert code == 0, stderr
    assert summary["deleted_remote"] == 0
    assert fault_server.count("POST") == 0 and fault_server.count("DELETE") == 0
    assert cli.jobs() == []


def test_a_create_the_server_refused_can_be_deleted_without_contacting_it(cli, fault_server):
    cli.env["JOBSYNCD_SERVER_URL"] = fault_server.url
    fault_server.add_fault(method="POST", status=413, times=1)
    local_id = cli("create", "--text", "too big", check=True).stdout.strip()
    code, summary, _ = _sync(cli)
    assert code == 1 and summary["failed"] == 1
    cli("delete", local_id, check=True)
    before = fault_server.count("POST")
    code, summary, stderr = _sync(cli)
    assert code == 0, stderr
    assert fault_server.count("POST") == before
    assert cli.jobs() == [] and fault_server.snapshot() == []


def test_a_404_on_create_fails_the_job_with_the_servers_answer_not_as_gone(cli, fault_server):
    cli.env["JOBSYNCD_SERVER_URL"] = fault_server.url
    fault_server.add_fault(method="POST", path=r"/api/v1/jobs", status=404, times=1)
    cli("create", "--text", "x", check=True)
    code, summary, _ = _sync(cli)
    assert code == 1 and summary["failed"] == 1
    job = cli.jobs()[0]
    assert job["sync_status"] == "failed"
    assert "gone" not in job["last_error"] and "server_url" in job["last_error"]


def test_meta_values_that_overflow_to_infinity_are_a_usage_error(cli):
    # Contract v5 section 2: a number outside the double range is a usage error (it was kept
    # as a string before). tests/system/test_cli_input.py covers the other cases.
    for value in ("n=1e400", "m=[1e999]"):
        proc = cli("create", "--meta", value, "--json")
        assert proc.returncode == 2 and "double range" in proc.stderr
    assert cli.jobs() == []


def test_plain_http_to_a_name_under_localhost_is_refused(cli):
    cli.env["JOBSYNCD_SERVER_URL"] = "http://evil.localhost:8600"
    proc = cli("sync")
    assert proc.returncode == 78 and "allow_insecure_http" in proc.stderr


def test_a_string_where_the_config_file_needs_a_boolean_is_a_config_error(cli, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('verify_tls = "no"\n')
    config.chmod(0o600)
    cli.env["JOBSYNCD_CONFIG"] = str(config)
    proc = cli("status")
    assert proc.returncode == 78 and "verify_tls" in proc.stderr


def test_force_delete_runs_here_even_when_a_daemon_runs(cli, fault_server):
    cli.env["JOBSYNCD_SERVER_URL"] = fault_server.url
    for text in ("a", "b"):
        cli("create", "--text", text, check=True)
    code, _, _ = _sync(cli)
    assert code == 0
    for job in fault_server.snapshot():
        fault_server.server_delete(job["id"])
    daemon = cli.popen(
        "daemon",
        "--interval",
        "60",
        stderr=open(cli.data_dir.parent / "daemon.log", "w"),  # noqa: SIM115 - closed by exit
    )
    try:
        from helpers import poll

        poll((cli.data_dir / "daemon.sock").exists, timeout=15)
        code, summary, stderr = _sync(cli, "--force-delete")
        assert code == 0, stderr
        assert summary["handed_to_daemon"] is None
        assert summary["deleted_locally"] == 2 and summary["deletion_guard"] is False
        assert cli.jobs() == []
    finally:
        daemon.terminate()
        daemon.wait(10)
