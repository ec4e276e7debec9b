"""The `edge` command as users meet it: check, run's errors, the demo, and plain mitmdump."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
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


def demo_config(tmp_path) -> tuple[list[int], Path]:
    """The shipped example on free ports: the edge, the origins eu, us, ap, the admin endpoint."""
    ports = [free_port() for _ in range(5)]
    text = (REPO / "data" / "edge.example.yaml").read_text()
    by_old = dict(zip(["8080", "9001", "9002", "9003", "9090"], map(str, ports)))
    # in one pass on whole numbers: replacing one after the other could rewrite a new port again
    text = re.sub(r"\b(8080|9001|9002|9003|9090)\b", lambda m: by_old[m[1]], text)
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(text)
    return ports, cfg


def test_demo_starts_origins_and_edge_and_stops_cleanly(tmp_path):
    ports, cfg = demo_config(tmp_path)
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


def test_version_names_edge_and_mitmproxy():
    from importlib import metadata
    r = subprocess.run([BIN / "edge", "--version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith(f"edge {metadata.version('edge')} (mitmproxy {metadata.version('mitmproxy')}, Python 3.")


SIX_MISTAKES = """\
listen: nowhere
pools:
  eu:
    origins:
      - {url: http://127.0.0.1:9001, weigth: 3}
    fallback: us
  us:
    origins: [ftp://127.0.0.1:9002]
routing:
  default_pool: eu
  geo: {countries: {US: us}, nearest: maybe}
shield:
  rate_limit: {burst: 3}
admin: 127.0.0.1:99999
"""


def test_check_lists_every_mistake_and_exits_2(tmp_path):
    bad = tmp_path / "six.yaml"
    bad.write_text(SIX_MISTAKES)
    r = subprocess.run([BIN / "edge", "check", "-c", str(bad)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"edge: {bad}:1: listen: 'nowhere': expected HOST:PORT",
        f"edge: {bad}:5: pools.eu.origins[0].weigth: unknown key (known: backup, url, weight)",
        f"edge: {bad}:8: pools.us.origins[0].url: 'ftp://127.0.0.1:9002': scheme must be http or https",
        f"edge: {bad}:11: routing.geo.nearest: expected true or false",
        f"edge: {bad}:13: shield.rate_limit: rate_limit needs a rate like 20/s",
        f"edge: {bad}:14: admin: '127.0.0.1:99999': port must be a number from 0 to 65535",
    ]
    run = CliRunner().invoke(cli, ["run", "-c", str(bad), "--confdir", str(tmp_path)])      # run refuses it alike
    assert run.exit_code == 2 and run.output.splitlines() == r.stderr.splitlines()
    good = subprocess.run([BIN / "edge", "check", "-c", str(REPO / "data" / "edge.example.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0 and "ok (3 pools, 3 origins" in good.stdout


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by its parent, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _until(condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout} s")


class Lines:
    """A child's stream, read in a thread so that the test can wait for a line while it runs."""

    def __init__(self, stream) -> None:
        self.text = ""
        self.lock = threading.Lock()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            with self.lock:
                self.text += line

    def wait_for(self, pattern: str) -> str:
        return _until(lambda: re.search(pattern, self.text) and self.text, what=repr(pattern))


def start_demo(tmp_path) -> tuple[subprocess.Popen, Lines, list[int], dict[str, int]]:
    """`edge demo` on free ports, once it answers; the origins' PIDs as its try-list gives them."""
    ports, cfg = demo_config(tmp_path)
    proc = subprocess.Popen([BIN / "edge", "demo", "-c", str(cfg), "--confdir", str(tmp_path / "conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = Lines(proc.stderr)
    listing = err.wait_for("Ctrl-C stops everything")
    pids = {name: int(pid) for name, pid in re.findall(r"(\w+)=http://\S+ \(pid (\d+)\)", listing)}
    wait_for_port(ports[0], proc)
    return proc, err, ports, pids


def test_demo_origins_are_processes_and_killing_one_shows_failover(tmp_path):
    proc, err, ports, pids = start_demo(tmp_path)
    base = f"http://127.0.0.1:{ports[0]}"
    try:
        assert set(pids) == {"eu", "us", "ap"} and len(set(pids.values())) == 3 and proc.pid not in pids.values()
        assert all(_alive(pid) and _parent(pid) == proc.pid for pid in pids.values())
        assert re.search(rf"kill {pids['eu']} +# origin eu dies", err.text)
        assert f"curl -i {base}/            # pool us answers (eu's fallback)" in err.text
        assert httpx.get(f"{base}/").text == "hello from eu\n"
        os.kill(pids["eu"], signal.SIGTERM)                   # as the try-list says
        _until(lambda: not _alive(pids["eu"]), what="origin eu gone")
        for i in range(5):                                    # every request answered, by the fallback pool
            r = httpx.get(f"{base}/?{i}")
            assert r.status_code == 200 and r.text == "hello from us\n"
        assert httpx.get(f"{base}/echo", headers={"X-Forwarded-For": "223.5.5.5"}).json()["origin"] == "ap"
        admin = ["edge", "status", "--admin", f"http://127.0.0.1:{ports[4]}"]
        assert f"  {' '.join(admin)} # origin eu http://127.0.0.1:{ports[1]}: down" in err.text

        def eu_down():
            out = subprocess.run([BIN / admin[0], *admin[1:]], capture_output=True, text=True, timeout=30).stdout
            return re.search(rf"http://127\.0\.0\.1:{ports[1]} weight 1, 0 in flight: (down|ejected)", out)
        _until(eu_down, what="origin eu down in edge status")
        assert all(_alive(pids[name]) for name in ("us", "ap"))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(15)
    assert proc.returncode == 0, err.text
    assert not any(_alive(pid) for pid in pids.values())     # the demo stopped (and reaped) every origin


def test_a_killed_demo_leaves_no_origin_behind(tmp_path):
    proc, err, ports, pids = start_demo(tmp_path)
    proc.kill()                                               # no chance to clean up
    proc.wait(15)
    _until(lambda: not any(_alive(pid) for pid in pids.values()), what="origins gone with the demo")


def test_demo_says_which_origin_cannot_listen(tmp_path):
    ports, cfg = demo_config(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[2]))                       # us's port is taken
        s.listen()
        r = subprocess.run([BIN / "edge", "demo", "-c", str(cfg), "--confdir", str(tmp_path / "conf")],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip() == f"edge: demo origin us cannot listen on 127.0.0.1:{ports[2]}: address already in use"
    assert _connect_refused(ports[1]) and _connect_refused(ports[3])     # eu and ap were stopped


def _connect_refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


@pytest.mark.parametrize("section, problem", [
    ("routing:\n  geo: {database: bad.mmdb}\n", "routing.geo.database: {dir}/bad.mmdb: not a MaxMind DB file"),
    pytest.param("shield:\n  waf: {exclusions: excl.conf}\n", "shield.waf: the rules did not load",
                 marks=pytest.mark.skipif(not os.path.isdir("/usr/share/modsecurity-crs/rules"),
                                          reason="Debian's modsecurity-crs is not installed (make test installs it)")),
])
def test_run_says_what_its_engines_refuse_as_check_does(tmp_path, section, problem):
    """run leaves the geo database and the WAF's rules to the edge it starts (loaded once); a
    file they refuse is still one clear line and exit 2, the same as check's."""
    (tmp_path / "bad.mmdb").write_text("not a database")
    (tmp_path / "excl.conf").write_text("SecRule garbage here\n")
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"pools: {{a: {{origins: [http://127.0.0.1:1]}}}}\nlisten: 127.0.0.1:{free_port()}\n"
                   + section.replace("bad.mmdb", str(tmp_path / "bad.mmdb")).replace("excl.conf", str(tmp_path / "excl.conf")))
    said = []
    for command in (["check", "-c", str(cfg)], ["run", "-c", str(cfg), "--confdir", str(tmp_path / "conf")]):
        r = subprocess.run([BIN / "edge", *command], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
        said.append(r.stderr)
    assert said[0] == said[1] and said[0].startswith(f"edge: {cfg}: {problem.format(dir=tmp_path)}")


LOADED = """\
import sys
from edgecli.main import cli
try:
    cli.main(sys.argv[1:], prog_name="edge", standalone_mode=False)
except Exception:
    pass
print("loaded:", " ".join(sorted({m.split(".")[0] + ("." + m.split(".")[1] if m.startswith("addons.") else "")
                       for m in sys.modules if m.startswith(("mitmproxy", "addons.", "libmodsecurity")) })))
"""


@pytest.mark.parametrize("args, loaded", [
    (["--help"], ""),
    (["--version"], ""),
    (["status", "--admin", "http://127.0.0.1:1"], "addons.admin addons.config"),
    (["check", "-c", "{dir}/edge.yaml"], "addons.config addons.tls"),      # tls: the certificates' reader
])
def test_a_command_loads_only_what_it_needs(tmp_path, args, loaded):
    """The light commands start at once because they import neither mitmproxy nor the addons
    (bench/startup.py has the times)."""
    (tmp_path / "edge.yaml").write_text("pools: {a: {origins: [http://127.0.0.1:1]}}\n")
    r = subprocess.run([sys.executable, "-c", LOADED, *(a.format(dir=tmp_path) for a in args)],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.splitlines()[-1] == f"loaded: {loaded}", r.stderr
