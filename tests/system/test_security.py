"""Hostile servers, planted symlinks, leaked tokens and careless permissions (contract sections 3, 4, 7).

The installed `jobsyncd` against a fault server that answers with path-traversal names and ids,
a data dir with symlinks planted in it, a token that must never appear anywhere but the
Authorization header, and the reference server fed oversized and unauthenticated requests.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from faultserver import FaultProxy, FaultServer
from helpers import RefServer, poll

pytestmark = pytest.mark.timeout(60)

JOBS = r"/api/v1/jobs"
TOKEN = "tok-SECRET-4f1c9a7e-do-not-print"


# ---- helpers ----------------------------------------------------------------------------------


def check_stderr(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    for line in stderr.splitlines():
        if line.strip():
            assert line.startswith(("jobsyncd: error:", "jobsyncd: warning:")), (
                f"stray stderr line {line!r} in:\n{stderr}"
            )


def run(cli, *args: str, want: int | None = None, clean_stderr: bool = True):
    proc = cli(*args)
    if clean_stderr:
        check_stderr(proc.stderr)
    if want is not None:
        assert proc.returncode == want, (
            f"jobsyncd {' '.join(args)} -> {proc.returncode}, want {want}\n"
            f"{proc.stdout}\n{proc.stderr}"
        )
    return proc


def tree(root: Path, skip: Path | None = None) -> dict[str, tuple]:
    """Every path under root (not following symlinks) with its type, size and content digest."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if skip is not None and (here == skip or skip in here.parents):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = here / name
            if skip is not None and p == skip:
                continue
            st = os.lstat(p)
            if os.path.islink(p):
                out[str(p)] = ("link", os.readlink(p))
            elif p.is_file():
                out[str(p)] = ("file", st.st_size, p.read_bytes())
            else:
                out[str(p)] = ("dir",)
    return out


def all_bytes_under(root: Path) -> Iterator[tuple[Path, bytes]]:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                yield p, p.read_bytes()


@pytest.fixture
def srv(fault_server: FaultServer) -> FaultServer:
    return fault_server


@pytest.fixture
def agent(cli, srv: FaultServer):
    cli.env["JOBSYNCD_SERVER_URL"] = srv.url
    cli.env["JOBSYNCD_REQUEST_TIMEOUT_SECONDS"] = "2"
    return cli


def server_job(sid: str, local_id, **extra) -> dict:
    job = {
        "id": sid,
        "local_id": local_id,
        "text": "hostile",
        "metadata": {},
        "status": "submitted",
        "audio": None,
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
    }
    job.update(extra)
    return job


# ---- a hostile server cannot make the agent write or delete outside its data dir ---------------


def test_hostile_names_and_ids_in_a_listing_touch_nothing_outside_the_data_dir(
    agent, srv, tmp_path
):
    # Files a traversal would hit, around and inside the data dir.
    agent.data_dir.mkdir(mode=0o700)
    (tmp_path / "etc").mkdir()
    sentinels = {
        tmp_path / "etc" / "passwd": b"root:x:0:0\n",
        tmp_path / "x": b"outside x\n",
        tmp_path / "victim.wav": b"not yours\n",
    }
    for path, content in sentinels.items():
        path.write_bytes(content)
    hostile_audio = [
        {"filename": "../../etc/passwd", "size": 11, "sha256": "0" * 64},
        {"filename": str(tmp_path / "victim.wav"), "size": 10, "sha256": "0" * 64},
        {"filename": "../x", "path": str(tmp_path / "x"), "url": "file:///etc/passwd"},
        {"filename": "/etc/passwd"},
    ]
    jobs = [
        server_job("../../x", "../x", audio=hostile_audio[0]),
        server_job("a/b/../../../x", str(uuid.uuid4()), audio=hostile_audio[1]),
        server_job("..", "..", audio=hostile_audio[2]),
        server_job("/etc/passwd", "/etc/passwd", audio=hostile_audio[3]),
        server_job("%2e%2e%2fx", "%2e%2e%2fx"),
        server_job(str(uuid.uuid4()), "../" + str(uuid.uuid4())),
        server_job("ok-1", str(uuid.uuid4()), audio=hostile_audio[0]),
    ]
    listing = json.dumps({"jobs": jobs, "next_cursor": None}).encode()
    srv.add_fault("GET", JOBS, times=None, garbage=True, body=listing, headers={"ETag": '"h1"'})
    outside_before = tree(tmp_path, skip=agent.data_dir)

    proc = run(agent, "sync", "--json", want=0)
    summary = json.loads(proc.stdout)
    assert summary["pulled"] == len(jobs)
    local = agent.jobs()
    assert len(local) == len(jobs)
    for job in local:
        assert job["audio_file"] is None, job
        uuid.UUID(job["local_id"])  # a hostile local_id is replaced by a UUID of ours
        assert "/" not in job["local_id"] and ".." not in job["local_id"]
    assert tree(tmp_path, skip=agent.data_dir) == outside_before
    audio_dir = agent.data_dir / "audio"
    assert not audio_dir.exists() or list(audio_dir.iterdir()) == []

    # The server then drops every hostile job: confirming GETs (404) remove the records, and
    # still nothing outside the data dir is touched.
    srv.clear_faults()
    run(agent, "sync", "--json", "--force-delete", want=0)
    assert agent.jobs() == []
    assert tree(tmp_path, skip=agent.data_dir) == outside_before
    for path, content in sentinels.items():
        assert path.read_bytes() == content


def test_a_job_answer_naming_a_path_outside_never_becomes_the_jobs_audio(agent, srv, tmp_path):
    """A create answered with a hostile `audio` object keeps the agent's own copy."""
    src = tmp_path / "mine.wav"
    src.write_bytes(b"RIFF my audio")
    lid = run(agent, "create", "--audio", str(src), want=0).stdout.strip()
    before = agent.json("show", lid)["audio_file"]
    assert before and before.startswith(str(agent.data_dir / "audio") + os.sep)
    outside = tmp_path / "outside.wav"
    outside.write_bytes(b"keep me")
    evil = server_job(
        str(uuid.uuid4()),
        lid,
        audio={"filename": str(outside), "path": str(outside), "sha256": "0" * 64},
    )
    srv.add_fault("POST", JOBS, garbage=True, status=201, body=json.dumps(evil).encode())
    run(agent, "sync", "--json")
    assert agent.json("show", lid)["audio_file"] == before
    agent("delete", lid, check=True)
    srv.clear_faults()
    run(agent, "sync", "--json", "--force-delete")
    assert outside.read_bytes() == b"keep me"
    assert src.read_bytes() == b"RIFF my audio"


# ---- planted symlinks -----------------------------------------------------------------------------


def test_deleting_a_job_whose_audio_copy_was_replaced_by_a_symlink_removes_the_link_not_the_target(
    agent, srv, tmp_path
):
    src = tmp_path / "take.wav"
    src.write_bytes(b"RIFF take")
    lid = run(agent, "create", "--audio", str(src), want=0).stdout.strip()
    run(agent, "sync", "--json", want=0)
    copy = Path(agent.json("show", lid)["audio_file"])
    target = tmp_path / "precious.txt"
    target.write_bytes(b"precious")
    copy.unlink()
    copy.symlink_to(target)
    run(agent, "delete", lid, want=0)
    run(agent, "sync", "--json", want=0)
    assert agent.jobs() == []
    assert not os.path.lexists(copy)
    assert target.read_bytes() == b"precious"
    assert src.read_bytes() == b"RIFF take"


def test_a_job_deleted_on_the_server_with_a_symlinked_audio_copy_removes_the_link_only(
    agent, srv, tmp_path
):
    src = tmp_path / "take.wav"
    src.write_bytes(b"RIFF take")
    lids = [run(agent, "create", "--audio", str(src), want=0).stdout.strip() for _ in range(2)]
    run(agent, "sync", "--json", want=0)
    copy = Path(agent.json("show", lids[0])["audio_file"])
    target = tmp_path / "precious.txt"
    target.write_bytes(b"precious")
    copy.unlink()
    copy.symlink_to(target)
    srv.server_delete(agent.json("show", lids[0])["server_id"])
    run(agent, "sync", "--json", want=0)
    assert [j["local_id"] for j in agent.jobs()] == [lids[1]]
    assert not os.path.lexists(copy)
    assert target.read_bytes() == b"precious"


def test_create_refuses_an_audio_folder_that_is_a_symlink_and_names_it(cli, tmp_path):
    cli("list", check=True)  # makes the data dir
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (cli.data_dir / "audio").symlink_to(elsewhere)
    src = tmp_path / "a.wav"
    src.write_bytes(b"RIFF")
    proc = run(cli, "create", "--audio", str(src), want=1)
    assert "jobsyncd: error:" in proc.stderr
    assert str(cli.data_dir / "audio") in proc.stderr
    assert list(elsewhere.iterdir()) == []
    assert cli.jobs() == []


@pytest.mark.parametrize("name", ["jobs.jsonl", "jobs.lock"])
def test_create_refuses_to_write_through_a_symlink_planted_at_the_store(cli, tmp_path, name):
    cli("list", check=True)
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    planted = cli.data_dir / name
    if planted.exists():
        planted.unlink()
    planted.symlink_to(victim)
    proc = run(cli, "create", "--text", "x", want=1)
    assert str(planted) in proc.stderr
    assert victim.read_bytes() == b"untouched"


def test_a_sync_never_writes_through_symlinks_planted_at_its_state_files(agent, srv, tmp_path):
    agent("list", check=True)
    victims = {}
    for name in ("last_pass.json", "pull_state.json", "backoff.json", "sync.lock"):
        victim = tmp_path / f"victim-{name}"
        victim.write_bytes(b"untouched")
        (agent.data_dir / name).symlink_to(victim)
        victims[name] = victim
    run(agent, "create", "--text", "x", want=0)
    srv.add_fault("GET", JOBS, status=503, headers={"Retry-After": "1"})
    proc = agent("sync", "--json")
    check_stderr(proc.stderr)
    assert proc.returncode in (0, 1, 75), proc.stderr
    for victim in victims.values():
        assert victim.read_bytes() == b"untouched"


# ---- the token never leaks ------------------------------------------------------------------------


def assert_no_token(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text, text


def assert_no_token_in_files(root: Path) -> None:
    for path, data in all_bytes_under(root):
        assert TOKEN.encode() not in data, f"the token is stored in {path}"


@pytest.mark.parametrize("source", ["env", "token_file"])
def test_the_token_never_shows_in_output_logs_or_the_data_dir(cli, tmp_path, source):
    if source == "env":
        cli.env["JOBSYNCD_TOKEN"] = TOKEN
    else:
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        cli.env["JOBSYNCD_TOKEN_FILE"] = str(token_file)
    cli.env["JOBSYNCD_REQUEST_TIMEOUT_SECONDS"] = "2"
    outputs: list[str] = []

    def go(*args: str) -> subprocess.CompletedProcess:
        proc = cli(*args)
        outputs.extend([proc.stdout, proc.stderr])
        if "-vv" not in args:
            check_stderr(proc.stderr)
        return proc

    with FaultServer(token=TOKEN) as good:
        cli.env["JOBSYNCD_SERVER_URL"] = good.url
        lid = go("create", "--text", "t", "--json").stdout
        lid = json.loads(lid)["local_id"]
        assert go("-vv", "sync", "--json").returncode == 0
        assert good.requests[0][2].get("Authorization") == f"Bearer {TOKEN}"
        go("update", lid, "--text", "u")
        good.add_fault("PATCH", r"/api/v1/jobs/.+", status=500)
        go("-vv", "sync", "--json")
        go("sync", "--json")
        go("list", "--json")
        go("show", lid, "--json")
        go("status")
        go("status", "--json")
    with FaultServer(token="another-token") as wrong:
        cli.env["JOBSYNCD_SERVER_URL"] = wrong.url
        assert go("sync", "--json").returncode == 77
        assert go("-vv", "sync", "--json").returncode == 77
        assert go("-v", "sync").returncode == 77
    with FaultServer(token=TOKEN) as srv, FaultProxy("127.0.0.1", srv.port) as proxy:
        cli.env["JOBSYNCD_SERVER_URL"] = proxy.url
        proxy.closed = True
        assert go("-vv", "sync", "--json").returncode == 75
        proxy.reopen()
        proxy.reset_after = 10
        go("update", lid, "--text", "v")
        assert go("-vv", "sync", "--json").returncode == 1
    go("-vv", "status", "--json")
    assert_no_token(*outputs)
    assert_no_token_in_files(cli.data_dir)


def test_the_token_is_not_on_a_running_daemons_command_line(cli, srv, tmp_path):
    srv.token = TOKEN
    cli.env["JOBSYNCD_TOKEN"] = TOKEN
    cli.env["JOBSYNCD_SERVER_URL"] = srv.url
    proc = cli.popen(
        "-v", "daemon", "--interval", "30", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        poll(lambda: srv.count("GET") >= 1 or proc.poll() is not None, timeout=15)
        assert proc.poll() is None, "the daemon exited"
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert TOKEN.encode() not in cmdline
        for task in Path(f"/proc/{proc.pid}/task").iterdir():
            comm = (task / "comm").read_bytes()
            assert TOKEN.encode() not in comm
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=5)
    assert_no_token(out, err)
    assert_no_token_in_files(cli.data_dir)


# ---- careless permissions -------------------------------------------------------------------------


def test_a_config_file_readable_by_others_gets_a_warning(cli, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('server_url = "http://127.0.0.1:9"\n')
    config.chmod(0o644)
    cli.env["JOBSYNCD_CONFIG"] = str(config)
    proc = run(cli, "list", want=0)
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("jobsyncd: warning:")]
    assert any(str(config) in ln for ln in warnings), proc.stderr
    config.chmod(0o600)
    assert run(cli, "list", want=0).stderr == ""


def test_a_token_file_readable_by_others_gets_a_warning(cli, srv, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o640)
    srv.token = TOKEN
    cli.env.update({"JOBSYNCD_TOKEN_FILE": str(token_file), "JOBSYNCD_SERVER_URL": srv.url})
    proc = run(cli, "sync", "--json", want=0)
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("jobsyncd: warning:")]
    assert any(str(token_file) in ln for ln in warnings), proc.stderr
    assert_no_token(proc.stdout, proc.stderr)
    token_file.chmod(0o600)
    assert run(cli, "sync", "--json", want=0).stderr == ""


def test_a_data_dir_owned_by_another_user_is_refused(cli):
    if os.geteuid() != 0:
        pytest.skip("needs root to chown the data dir")
    cli.data_dir.mkdir(mode=0o700)
    os.chown(cli.data_dir, 65534, 65534)
    for args in (("list",), ("create", "--text", "x"), ("status", "--json")):
        proc = run(cli, *args)
        assert proc.returncode != 0, args
        assert "jobsyncd: error:" in proc.stderr and str(cli.data_dir) in proc.stderr
    assert list(cli.data_dir.iterdir()) == []


# ---- ~/.netrc never replaces the token ------------------------------------------------------------


@pytest.fixture
def netrc_home(cli) -> Path:
    home = Path(cli.env["HOME"])
    netrc = home / ".netrc"
    netrc.write_text(
        "machine 127.0.0.1 login netrc-user password netrc-pass\n"
        "default login dflt password dflt-pass\n"
    )
    netrc.chmod(0o600)
    return home


def test_a_netrc_for_the_server_host_does_not_replace_the_token(cli, netrc_home):
    with FaultServer(token="sekrit") as srv:
        cli.env.update({"JOBSYNCD_TOKEN": "sekrit", "JOBSYNCD_SERVER_URL": srv.url})
        run(cli, "create", "--text", "x", want=0)
        run(cli, "sync", "--json", want=0)
        seen = {h.get("Authorization") for _, _, h in srv.requests}
        assert seen == {"Bearer sekrit"}


def test_without_a_token_no_authorization_header_is_sent_even_with_a_netrc(cli, netrc_home):
    with FaultServer(token=None) as srv:
        cli.env["JOBSYNCD_SERVER_URL"] = srv.url
        run(cli, "create", "--text", "x", want=0)
        run(cli, "sync", "--json", want=0)
        assert srv.requests
        assert all("Authorization" not in h for _, _, h in srv.requests), srv.requests


# ---- plain http:// to a non-loopback host ---------------------------------------------------------


def non_loopback_ipv4() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent for a UDP connect
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


def test_plain_http_to_a_non_loopback_host_is_refused_with_exit_78_before_any_connection(cli):
    ip = non_loopback_ipv4()
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))
    listener.listen(4)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        urls = [f"http://jobs.example.org:{port}", f"http://10.255.255.1:{port}/"]
        if ip:
            urls.append(f"http://{ip}:{port}")
        run(cli, "create", "--text", "x", want=0)
        for url in urls:
            cli.env["JOBSYNCD_SERVER_URL"] = url
            for args in (("sync", "--json"), ("sync",)):
                proc = run(cli, *args, want=78)
                assert "jobsyncd: error:" in proc.stderr
            proc = cli.popen("daemon", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                _, err = proc.communicate(timeout=15)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate(timeout=5)
            assert proc.returncode == 78, err
            # The daemon's log lines may follow a timestamp (section 2).
            assert "Traceback" not in err
            assert re.search(r"^(\S+ )?jobsyncd: error: .*http://", err, re.M), err
        with pytest.raises(socket.timeout):
            listener.accept()  # nobody connected
        (job,) = cli.jobs()
        assert job["sync_status"] == "pending" and job["retry_count"] == 0
    finally:
        listener.close()


# ---- the reference server refuses what it must ----------------------------------------------------


@pytest.fixture
def ref_with_token(server_bin: str, tmp_path: Path) -> Iterator[RefServer]:
    workdir = tmp_path / "ref"
    workdir.mkdir()
    token_file = workdir / "tokens"
    token_file.write_text("# users\nalice " + TOKEN + "\nbob other-token-bob\n")
    token_file.chmod(0o600)
    srv = RefServer(server_bin, workdir, token_file, extra=("--max-upload-bytes", "4096")).start()
    try:
        yield srv
    finally:
        srv.stop()


def assert_clean_error(resp: requests.Response, status: int) -> None:
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    assert "Traceback" not in resp.text and 'File "' not in resp.text, resp.text[:2000]
    assert "json" in resp.headers.get("Content-Type", ""), resp.headers
    body = resp.json()
    assert isinstance(body.get("error"), str) and body["error"]
    assert TOKEN not in resp.text


def test_the_reference_server_refuses_missing_and_wrong_tokens_with_401(ref_with_token):
    base = ref_with_token.url + "/api/v1/jobs"
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer "},
        {"Authorization": f"bearer  {TOKEN} extra"},
        {"Authorization": "Bearer " + "A" * 20000},
    ):
        for method, url, kw in (
            ("GET", base, {}),
            ("POST", base, {"json": {"local_id": str(uuid.uuid4())}}),
            ("GET", base + "/1", {}),
            ("DELETE", base + "/1", {}),
        ):
            resp = requests.request(method, url, headers=headers, timeout=10, **kw)
            assert resp.status_code in (400, 401, 431), (method, headers.keys(), resp.status_code)
            assert "Traceback" not in resp.text
            assert TOKEN not in resp.text
    # Nothing was stored by any refused request.
    ok = requests.get(base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert ok.status_code == 200 and ok.json()["jobs"] == []


def test_the_reference_server_refuses_oversized_bodies_with_413_and_stores_nothing(ref_with_token):
    base = ref_with_token.url + "/api/v1/jobs"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    big_json = json.dumps(
        {"local_id": str(uuid.uuid4()), "text": "x" * (1 << 20), "metadata": {}}
    ).encode()
    resp = requests.post(
        base, data=big_json, headers={**auth, "Content-Type": "application/json"}, timeout=20
    )
    assert_clean_error(resp, 413)
    resp = requests.post(
        base,
        headers=auth,
        data={"local_id": str(uuid.uuid4()), "text": "t", "metadata": "{}"},
        files={"audio": ("big.wav", b"\0" * 5000, "application/octet-stream")},
        timeout=20,
    )
    assert_clean_error(resp, 413)
    # A far larger audio part than the limit: the answer still comes, and nothing is stored.
    resp = requests.post(
        base,
        headers=auth,
        data={"local_id": str(uuid.uuid4()), "text": "t", "metadata": "{}"},
        files={"audio": ("huge.wav", b"\0" * (1 << 20), "application/octet-stream")},
        timeout=20,
    )
    assert resp.status_code == 413
    assert "Traceback" not in resp.text
    assert ref_with_token.jobs(TOKEN) == []
    stored = list((ref_with_token.workdir / "server-audio").rglob("*"))
    assert [p for p in stored if p.is_file()] == []


@pytest.mark.parametrize(
    "method,path,kwargs,status",
    [
        ("POST", "/api/v1/jobs", {"data": b"{not json", "ctype": "application/json"}, 400),
        ("POST", "/api/v1/jobs", {"data": b"[]", "ctype": "application/json"}, 400),
        (
            "POST",
            "/api/v1/jobs",
            {"data": b'{"local_id": "../x"}', "ctype": "application/json"},
            422,
        ),
        ("POST", "/api/v1/jobs", {"data": b"\xff\xfe", "ctype": "application/json"}, 400),
        ("POST", "/api/v1/jobs", {"data": b"x", "ctype": "text/plain"}, 415),
        (
            "POST",
            "/api/v1/jobs",
            {"data": b"--x\r\n", "ctype": "multipart/form-data; boundary=x"},
            400,
        ),
        ("GET", "/api/v1/jobs/..%2F..%2Fetc%2Fpasswd", {}, 404),
        ("GET", "/api/v1/jobs/%00", {}, 404),
        ("GET", "/api/v1/jobs?limit=-1", {}, 400),
        ("GET", "/api/v1/jobs?cursor=%27%3B--", {}, 400),
        ("PUT", "/api/v1/jobs", {}, 405),
    ],
)
def test_the_reference_server_answers_hostile_requests_with_a_json_error_never_a_traceback(
    ref_with_token, method, path, kwargs, status
):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if "ctype" in kwargs:
        headers["Content-Type"] = kwargs["ctype"]
    resp = requests.request(
        method, ref_with_token.url + path, data=kwargs.get("data"), headers=headers, timeout=10
    )
    assert_clean_error(resp, status)


# ---- hostile content in answers: the pass survives it, the store stays valid JSON ------------------


def strict_json(line: str):
    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


def _listing_with(**fields) -> bytes:
    job = server_job("h-1", str(uuid.uuid4()), **fields)
    return json.dumps({"jobs": [job], "next_cursor": None}).encode()


HOSTILE_LISTINGS = {
    "lone-surrogate-text": _listing_with(text="bad \ud800 text"),
    "lone-surrogate-metadata-key": _listing_with(metadata={"\udcff": 1}),
    "nan-metadata": b'{"jobs": [{"id": "h-1", "text": "t", "metadata": {"x": NaN}}], "next_cursor": null}',
    "infinity-metadata": b'{"jobs": [{"id": "h-1", "text": "t", "metadata": {"x": -Infinity}}], "next_cursor": null}',
    "deeply-nested": b'{"jobs": [' + b"[" * 100_000 + b"]" * 100_000 + b'], "next_cursor": null}',
    "deeply-nested-metadata": b'{"jobs": [{"id": "h-1", "metadata": {"k": '
    + b"[" * 100_000
    + b"]" * 100_000
    + b'}}], "next_cursor": null}',
    "nul-in-id": _listing_with(id="a\u0000b"),
    "control-chars-in-text": _listing_with(text="\x1b[31mred\x1b[0m\r\n\x00"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_LISTINGS))
def test_hostile_content_in_a_listing_never_crashes_the_pass_nor_the_store(agent, srv, name):
    lid = run(agent, "create", "--text", "mine", want=0).stdout.strip()
    srv.add_fault("GET", JOBS, times=None, garbage=True, body=HOSTILE_LISTINGS[name])
    for _ in range(2):  # the hostile job stays on the server: every pass meets it
        proc = run(agent, "sync", "--json")
        assert proc.returncode in (0, 1), proc.stderr
        assert "unexpected" not in proc.stderr, proc.stderr
        strict_json(proc.stdout)
    listed = run(agent, "list", "--json", want=0).stdout.splitlines()
    jobs = [strict_json(line) for line in listed]
    assert lid in {j["local_id"] for j in jobs}
    assert agent.json("show", lid)["sync_status"] == "synced"
    for line in (agent.data_dir / "jobs.jsonl").read_text(errors="strict").splitlines():
        strict_json(line)
    srv.clear_faults()
    run(agent, "sync", "--json", "--force-delete", want=0)


@pytest.mark.parametrize("name", ["lone-surrogate", "deeply-nested"])
def test_a_hostile_answer_to_a_create_makes_the_job_error_and_the_next_pass_syncs_it(
    agent, srv, name
):
    lid = run(agent, "create", "--text", "mine", want=0).stdout.strip()
    if name == "lone-surrogate":
        body = json.dumps(server_job(str(uuid.uuid4()), lid, text="mine \udc80")).encode()
    else:
        body = b'{"id": "x", "metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    srv.add_fault("POST", JOBS, garbage=True, status=201, body=body)
    proc = run(agent, "sync", "--json", want=1)
    assert "unexpected" not in proc.stderr, proc.stderr
    assert agent.json("show", lid)["sync_status"] == "error"
    run(agent, "sync", "--json", want=0)
    assert agent.json("show", lid)["sync_status"] == "synced"


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_meta_values_that_are_not_json_are_taken_as_strings_and_json_output_stays_strict(
    cli, value
):
    """`--meta KEY=VALUE` parses VALUE as JSON when it parses: NaN and Infinity are not JSON
    (RFC 8259), so they are strings, and `--json` output stays parseable by any JSON reader."""
    proc = run(cli, "create", "--meta", f"x={value}", "--json", want=0)
    job = strict_json(proc.stdout)
    assert job["metadata"] == {"x": value}
    for line in run(cli, "list", "--json", want=0).stdout.splitlines():
        strict_json(line)
