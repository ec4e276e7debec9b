"""The `edge` command as users meet it: check, run's errors, the demo, and plain mitmdump."""

import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from edgecli.main import cli
from tests.conftest import REPO, free_port, wait_for_port

BIN = Path(sys.executable).parent


def test_check_accepts_the_example():
    r = CliRunner().invoke(cli, ["check", "-c", str(REPO / "data" / "edge.example.yaml")])
    assert r.exit_code == 0 and "ok (3 pools, 3 origins" in r.output


def test_check_names_file_line_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: 127.0.0.1:8080\npools:\n  eu:\n    origins:\n      - {url: http://127.0.0.1:9001, weigth: 3}\n")
    r = CliRunner().invoke(cli, ["check", "-c", str(bad)])
    assert r.exit_code == 2
    assert r.output.strip() == f"edge: {bad}:5: pools.eu.origins[0].weigth: unknown key (known: backup, url, weight)"


@pytest.mark.parametrize("args, code, message", [
    (["run"], 2, "give --origin URL"),
    (["run", "--origin", "127.0.0.1:9001"], 2, "scheme must be http or https"),
    (["run", "--origin", "http://a:1", "-c", "x.yaml"], 2, "not both"),
    (["run", "--origin", "http://a:1", "--listen", "nowhere"], 2, "expected HOST:PORT"),
    (["run", "-c", "/nonexistent/edge.yaml"], 2, "/nonexistent/edge.yaml: cannot read"),
    (["run", "--origin", "http://127.0.0.1:1", "--cert", "/nonexistent.pem", "--listen", "127.0.0.1:0"], 1,
     "cannot read --cert /nonexistent.pem"),
    (["run", "--origin", "http://127.0.0.1:1", "--listen", "127.0.0.1:0", "--set", "no_such_option=1"], 1,
     "no_such_option"),
    (["run", "--origin", "http://127.0.0.1:1", "--listen", "127.0.0.1:0", "--access-log", "/nonexistent/dir/a.log"], 1,
     "cannot open /nonexistent/dir/a.log: No such file or directory"),
])
def test_run_errors_are_one_clear_line(args, code, message, tmp_path):
    r = CliRunner().invoke(cli, args + (["--confdir", str(tmp_path)] if args[0] == "run" and len(args) > 1 else []))
    assert r.exit_code == code, r.output
    assert message in r.output
    assert "Traceback" not in r.output


def test_port_in_use_and_bad_cert(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = CliRunner().invoke(cli, ["run", "--origin", "http://127.0.0.1:1", "--listen", f"127.0.0.1:{port}",
                                     "--confdir", str(tmp_path)])
    assert r.exit_code == 1 and r.output.strip() == f"edge: cannot listen on 127.0.0.1:{port}: address already in use"
    pem = tmp_path / "cert.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    r = CliRunner().invoke(cli, ["run", "--origin", "http://127.0.0.1:1", "--cert", str(pem), "--confdir", str(tmp_path)])
    assert r.exit_code == 1 and "no PEM certificate" in r.output


def test_demo_starts_origins_and_edge_and_stops_cleanly(tmp_path):
    ports = [free_port() for _ in range(5)]
    text = (REPO / "data" / "edge.example.yaml").read_text()
    for old, new in zip(["8080", "9001", "9002", "9003", "9090"], ports):
        text = text.replace(old, str(new))
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(text)
    proc = subprocess.Popen([BIN / "edge", "demo", "-c", str(cfg), "--confdir", str(tmp_path / "conf")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(ports[0], proc)
        r = httpx.get(f"http://127.0.0.1:{ports[0]}/")
        assert r.text == "hello from eu\n" and r.headers["server"] == "edge" and "x-powered-by" not in r.headers
        r = httpx.get(f"http://127.0.0.1:{ports[0]}/redirect")
        assert r.headers["location"] == f"http://127.0.0.1:{ports[0]}/"
        assert httpx.get(f"http://127.0.0.1:{ports[0]}/echo", headers={"X-Forwarded-For": "223.5.5.5"}).json()["origin"] == "ap"
        status = subprocess.run([BIN / "edge", "status", "--admin", f"http://127.0.0.1:{ports[4]}"],
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0 and "pool ap (weighted_round_robin, fallback eu)" in status.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert f"curl -i http://127.0.0.1:{ports[0]}/redirect" in err
    assert '"status":200' in out                                  # the example config logs to stdout
    for port in ports:                                            # everything was let go
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as servers do: TIME_WAIT is fine
            s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("with_config", [False, True])
def test_plain_mitmdump_loads_the_addons(origin, tmp_path, with_config):
    o = origin("eu")
    port = free_port()
    args = [BIN / "mitmdump", "-q", "--mode", f"reverse:{o.url}@127.0.0.1:{port}",
            "-s", str(REPO / "addons" / "edge.py"), "--set", f"confdir={tmp_path}"]
    if with_config:
        cfg = tmp_path / "edge.yaml"
        cfg.write_text(f"pools: {{eu: {{origins: [{o.url}]}}}}\nscrub: {{server_header: shielded}}\n")
        args += ["--set", f"edge_config={cfg}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, proc)
        r = httpx.get(f"http://127.0.0.1:{port}/redirect", headers={"Host": "shop.example"})
        assert r.headers["location"] == "http://shop.example/"
        assert r.headers["server"] == ("shielded" if with_config else "edge")
        assert "x-powered-by" not in r.headers
        assert o.seen[-1].headers["host"] == "shop.example"
        assert o.seen[-1].headers["x-forwarded-for"] == "127.0.0.1"
        r = httpx.get(f"http://127.0.0.1:{port}/", headers={"Host": "mitm.it"})   # not mitmproxy's onboarding app
        assert r.text == "hello from eu\n" and o.seen[-1].headers["host"] == "mitm.it"
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


def test_mitmdump_rejects_a_bad_config(tmp_path):
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("pools: {eu: {origins: [ftp://x]}}\n")
    r = subprocess.run([BIN / "mitmdump", "-q", "--mode", f"reverse:http://127.0.0.1:1@127.0.0.1:{free_port()}",
                        "-s", str(REPO / "addons" / "edge.py"), "--set", f"confdir={tmp_path}",
                        "--set", f"edge_config={cfg}"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert f"{cfg}:1: pools.eu.origins[0].url: 'ftp://x': scheme must be http or https" in r.stdout + r.stderr
