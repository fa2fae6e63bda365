"""Configuration and the command line: precedence, bad input, check, reload/status/stop."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from daemon import APPS, ROOT, free_port, run_cli, wait_for
from fcgidaemon.config import Address, ConfigError, options_markdown, resolve
from test_lifecycle import app_copy, get, set_version


def processes_mentioning(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if marker.encode() in fh.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


# ---------------------------------------------------------------- precedence (pure)


def test_precedence_cli_over_file_over_env_over_default(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text('workers = 7\nbackground = 1\n'.replace("background = 1\n", "backlog = 50\n"))
    env = {"FCGIDAEMON_WORKERS": "3", "FCGI_LISTEN_QUEUE": "20", "FCGI_SOCKET_PATH": "/run/x.sock",
           "FCGIDAEMON_GRACEFUL_TIMEOUT": "5"}
    c = resolve(["app", "--config", str(conf), "--workers", "9"], env)
    assert c.workers == 9  # command line beats file and environment
    assert c.backlog == 50  # file beats environment
    assert c.bind == Address(path="/run/x.sock")  # environment beats default
    assert c.graceful_timeout == 5.0
    assert resolve(["app"], {}).workers == 4  # default
    assert resolve(["app"], {}).app == "app:application"


def test_bind_forms():
    assert resolve(["a", "--bind", ":9005"], {}).bind == Address(host=None, port=9005)
    assert resolve(["a", "--bind", "[::1]:9005"], {}).bind == Address(host="::1", port=9005)
    assert resolve(["a", "--bind", "localhost:80"], {}).bind == Address(host="localhost", port=80)
    assert resolve(["a", "--bind", "unix:/run/a.sock"], {}).bind == Address(path="/run/a.sock")
    assert resolve(["a", "--preload", "x,y", "--preload", "z"], {}).preload == ["x", "y", "z"]


def test_readme_option_table_is_generated_from_the_code():
    readme = (ROOT / "README.md").read_text()
    assert options_markdown() in readme, "README option table is stale: paste options_markdown()"


# ---------------------------------------------------------------- bad input: one line, exit 2


BAD = {
    "workers-zero": ["--workers", "0"],
    "workers-text": ["--workers", "many"],
    "bad-address": ["--bind", "nowhere"],
    "bad-port": ["--bind", "127.0.0.1:99999"],
    "bad-ipv6": ["--bind", "[::zz]:80"],
    "unknown-flag": ["--frobnicate"],
    "bad-log-level": ["--log-level", "loud"],
    "bad-umask": ["--umask", "999"],
    "unknown-preload": ["--preload", "no_such_module_xyz"],
    "missing-config": ["--config", "/nonexistent/fcgi.toml"],
    "unknown-user": ["--user", "no-such-user-xyz"],
    "unknown-group": ["--group", "no-such-group-xyz"],
    "missing-chdir": ["--chdir", "/nonexistent/dir"],
    # not finite, or too large for the C int they end up in (a traceback, a spinning manager
    # or failing requests, not one line)
    "max-body-inf": ["--max-body", "inf"],
    "max-params-1e400": ["--max-params", "1e400"],
    "max-body-nan": ["--max-body", "nanM"],
    "ready-timeout-nan": ["--ready-timeout", "nan"],
    "graceful-timeout-inf": ["--graceful-timeout", "inf"],
    "read-timeout-inf": ["--read-timeout", "inf"],
    "read-timeout-over-poll": ["--read-timeout", "3e6"],
    "backlog-over-c-int": ["--backlog", "2147483648"],
    # less than a byte rounded down to 0, which means no limit; params of 0 dropped every request
    "max-body-half-a-byte": ["--max-body", "0.5"],
    "max-params-0": ["--max-params", "0"],
    "max-params-under-1k": ["--max-params", "100"],
    # more than the scoreboard holds in two generations: the reload that follows stuck for good
    "workers-over-cap": ["--workers", "257"],
    "max-workers-over-cap": ["--max-workers", "257"],
    # accepted: one made a file named "@name" in the working directory, one was never used
    "abstract-socket": ["--bind", "unix:@name"],
    "socket-owner-with-tcp": ["--socket-owner", "nobody"],
    # 0 means "off" for --timeout and --slow-log, not for these waits: every start failed
    # (exit 1, restarted by systemd without end), or any body that paused was dropped
    "ready-timeout-0": ["--ready-timeout", "0"],
    "read-timeout-0": ["--read-timeout", "0"],
    "keep-conn-idle-0": ["--keep-conn-idle", "0"],
}


@pytest.mark.parametrize("args", BAD.values(), ids=BAD.keys())
def test_bad_option_exit_2_one_line_nothing_left(tmp_path, args):
    marker = f"marker-{os.getpid()}-{abs(hash(tuple(args)))}"
    # a free port, so a case that gets as far as binding does not depend on 9005 being free
    out = run_cli(["testapp", "--pythonpath", f"{APPS},/{marker}", "--bind",
                   f"127.0.0.1:{free_port()}", "--workers", "1", *args], tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcgidaemon: "), out.stderr
    assert out.stdout == ""
    assert processes_mentioning(marker) == []


def test_a_unix_socket_path_too_long_says_why(tmp_path):
    """The kernel takes at most 107 bytes: the error has no errno, and the line said
    "--bind unix:/tmp/aaa...sock: None"."""
    path = "/tmp/" + "a" * 120 + ".sock"
    out = run_cli(["testapp", "--pythonpath", str(APPS), "--bind", path], tmp_path)
    assert (out.returncode, out.stderr) == (2, f"fcgidaemon: --bind unix:{path}: AF_UNIX path too long\n")


def test_a_listening_socket_passed_as_stdin_is_served(tmp_path):
    """FCGI_LISTENSOCK_FILENO: a spawner (mod_fcgid, spawn-fcgi, `cgi-fcgi -start`) passes the
    listening socket as the application's stdin. It was ignored: the daemon bound --bind, and
    the spawner's address took connections nobody served (cgi-fcgi timed out). Now that socket
    is served (checked with cgi-fcgi, the reference client) and --bind is not bound."""
    unused = free_port()
    log_path = tmp_path / "daemon.log"
    with socket.create_server(("127.0.0.1", 0)) as listener, open(log_path, "wb") as log:
        port = listener.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "fcgidaemon", "testapp", "--pythonpath", str(APPS),
                                 "--workers", "1", "--bind", f"127.0.0.1:{unused}"],
                                stdin=listener.fileno(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=tmp_path)
    try:
        wait_for(lambda: "generation 1 serving" in log_path.read_text(), 15, "the daemon serving")
        env = {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": "/hello", "REQUEST_URI": "/hello",
               "SERVER_NAME": "localhost", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
               "PATH": os.environ.get("PATH", "")}
        out = subprocess.run(["cgi-fcgi", "-bind", "-connect", f"127.0.0.1:{port}"], env=env,
                             capture_output=True, timeout=10)
        with socket.socket() as probe:
            refused = probe.connect_ex(("127.0.0.1", unused)) != 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    print(f"\ncgi-fcgi: exit {out.returncode}, {out.stdout[:60]!r}; --bind port refused: {refused}")
    assert out.returncode == 0 and out.stdout.startswith(b"Status: 200 OK\r\n"), out
    assert b"\r\n\r\nhello v1 " in out.stdout
    assert refused
    assert "listening socket passed as stdin (FCGI_LISTENSOCK_FILENO)" in log_path.read_text()


def test_an_option_given_twice_in_the_config_file_is_refused(tmp_path):
    """The file may spell a key with - or _, and `graceful-timeout = 5` with `graceful_timeout
    = 50` silently gave 50: TOML itself refuses a repeated key, and so must we."""
    conf = tmp_path / "c.toml"
    conf.write_text("graceful-timeout = 5\ngraceful_timeout = 50\n")
    out = run_cli(["testapp", "--pythonpath", str(APPS), "--config", str(conf)], tmp_path)
    assert (out.returncode, out.stderr) == (2, f"fcgidaemon: config file {conf}: 'graceful_timeout' is "
                                               f"given twice (as 'graceful-timeout' and as "
                                               f"'graceful_timeout')\n")


def test_non_finite_numbers_from_environment_and_file_are_one_line(tmp_path):
    """TOML gives inf and nan as floats, not text; the environment gives text like a flag."""
    conf = tmp_path / "c.toml"
    for where, env, toml, option in [
        ("environment", {"FCGIDAEMON_MAX_BODY": "inf"}, "", "--max-body"),
        ("config file", {}, "max-params = inf\n", "--max-params"),
        ("config file", {}, "ready-timeout = nan\n", "--ready-timeout"),
        ("config file", {}, "idle-timeout = -inf\n", "--idle-timeout"),
    ]:
        conf.write_text(toml)
        args = ["testapp", "--pythonpath", str(APPS), "--config", str(conf)]
        # `check` first: before the fix it says OK (or a traceback) at once instead of the
        # serving daemon running into run_cli's timeout
        for cmd in (["check", *args], [*args, "--bind", f"127.0.0.1:{free_port()}", "--workers", "1"]):
            out = run_cli(cmd, tmp_path, env=env)
            assert out.returncode == 2, (cmd, env, out.stdout, out.stderr)
            lines = out.stderr.strip().splitlines()
            command = "fcgidaemon check" if cmd[0] == "check" else "fcgidaemon"
            assert len(lines) == 1 and lines[0].startswith(f"{command}: {option} ({where}"), lines
            assert "finite" in lines[0], lines


def test_an_access_log_that_cannot_be_opened_is_a_startup_error(tmp_path):
    """It was opened by each worker only: every worker crashed with a traceback and was
    respawned every 10 s, forever, with no exit status for systemd or the operator."""
    log = tmp_path / "no-such-dir" / "access.log"
    out = run_cli(["testapp", "--pythonpath", str(APPS), "--bind", f"127.0.0.1:{free_port()}",
                   "--workers", "1", "--access-log", str(log)], tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr == f"fcgidaemon: --access-log {log}: No such file or directory\n"


def test_a_preload_that_raises_exits_1_not_2(tmp_path):
    """Exit 2 is a configuration error, which the systemd unit does not restart (the same
    error every time); a preloaded module that is found but raises (a database down at import)
    exited 2 too, so it was never retried. Now 1, with the traceback in the log."""
    (tmp_path / "badpre.py").write_text("raise RuntimeError('database down')\n")
    out = run_cli(["testapp", "--pythonpath", f"{APPS},{tmp_path}", "--preload", "badpre",
                   "--bind", f"127.0.0.1:{free_port()}", "--workers", "1"], tmp_path)
    assert out.returncode == 1, out.stderr
    assert "RuntimeError: database down" in out.stderr and "preload failed" in out.stderr


def test_error_after_binding_is_the_only_line(start_daemon, tmp_path):
    """An error writing the pidfile (or switching user) comes after binding: it is the one line
    on stderr, with no 'listening on' logged before it for an address that is closed again."""
    port = free_port()
    pidfile = tmp_path / "missing-dir" / "d.pid"
    out = run_cli(["testapp", "--pythonpath", str(APPS), "--bind", f"127.0.0.1:{port}",
                   "--workers", "1", "--pidfile", str(pidfile)], tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    # said of the option and its path, not our temporary name nor a bare errno
    assert lines == [f"fcgidaemon: --pidfile {pidfile}: No such file or directory"], out.stderr
    # when startup succeeds the line is still there
    d = start_daemon("testapp", "--pidfile", str(tmp_path / "d.pid"), workers=1, bind=f"127.0.0.1:{port}")
    d.wait_log(rf"listening on 127\.0\.0\.1:{port}")
    assert (tmp_path / "d.pid").read_text().strip() == str(d.pid)


def test_a_pidfile_naming_a_running_manager_is_not_taken(start_daemon, tmp_path):
    """A second daemon given the first one's --pidfile (on another port) overwrote the file,
    and removed it when it exited: the first served on, out of reach of `stop --pidfile`. Now
    the second refuses to start: one line, exit 2, and the pidfile still names the first."""
    pidfile = tmp_path / "d.pid"
    first = start_daemon("testapp", "--pidfile", str(pidfile), workers=1)
    first.wait_workers(1)
    out = run_cli(["testapp", "--pythonpath", str(APPS), "--bind", f"127.0.0.1:{free_port()}",
                   "--workers", "1", "--pidfile", str(pidfile)], tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == f"fcgidaemon: --pidfile {pidfile} names manager {first.pid}, which is running"
    assert pidfile.read_text().strip() == str(first.pid)
    assert run_cli(["status", "--pidfile", str(pidfile)], tmp_path).returncode == 0


def test_unknown_app_module(tmp_path):
    out = run_cli(["no_such_app_xyz:application", "--bind", f"127.0.0.1:{free_port()}"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == "fcgidaemon: application module not found: no_such_app_xyz"


def test_unknown_dotted_module_is_found_without_importing_the_package(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise SystemExit('the manager must not import the app package')\n")
    out = run_cli(["pkg.nope", "--pythonpath", str(tmp_path), "--bind", f"127.0.0.1:{free_port()}"],
                  tmp_path)
    assert out.returncode == 2 and "application module not found: pkg.nope" in out.stderr


def test_port_in_use(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        out = run_cli(["testapp", "--pythonpath", str(APPS), "--bind", f"127.0.0.1:{port}"], tmp_path)
    finally:
        taken.close()
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == \
        f"fcgidaemon: --bind 127.0.0.1:{port}: address already in use"


def test_unix_socket_in_use_is_refused(start_daemon, tmp_path):
    path = tmp_path / "busy.sock"
    start_daemon(bind=str(path), workers=1)
    out = run_cli(["testapp", "--pythonpath", str(APPS), "--bind", str(path)], tmp_path)
    assert out.returncode == 2 and "address already in use" in out.stderr
    assert get(str(path), "/hello").status == 200  # the live socket was not removed


def test_unix_socket_with_a_full_queue_is_in_use_not_a_hang(tmp_path):
    """A live listener whose queue is full (nobody accepting): the check for a stale socket
    connected with a blocking connect() and waited for good. Now it is in use: exit 2."""
    path = str(tmp_path / "full.sock")
    taken = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    taken.bind(path)
    taken.listen(0)
    fillers = []
    try:
        while True:  # fill its queue: the next connect would block
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            filler.setblocking(False)
            fillers.append(filler)
            try:
                filler.connect(path)
            except BlockingIOError:
                break
        out = run_cli(["testapp", "--pythonpath", str(APPS), "--bind", path], tmp_path, timeout=10)
    finally:
        for sock in (taken, *fillers):
            sock.close()
    print(f"\n{len(fillers)} connections filled the queue; {out.stderr.strip()}")
    assert out.returncode == 2
    assert out.stderr.strip() == f"fcgidaemon: --bind unix:{path}: address already in use"


def test_bad_toml(tmp_path):
    conf = tmp_path / "bad.toml"
    conf.write_text("workers = [unclosed\n")
    bind = ["--bind", f"127.0.0.1:{free_port()}"]  # not the default port, should it start
    out = run_cli(["testapp", "--config", str(conf), *bind], tmp_path)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    conf.write_text("wrokers = 3\n")
    out = run_cli(["testapp", "--config", str(conf), *bind], tmp_path)
    assert out.returncode == 2 and "unknown option 'wrokers'" in out.stderr
    conf.write_bytes("workers = 2  # caf\u00e9\n".encode("latin-1"))  # TOML is UTF-8: a traceback, exit 1
    out = run_cli(["testapp", "--config", str(conf), *bind], tmp_path)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "not UTF-8 (byte 18: b'\\xe9')" in out.stderr


def test_toml_keys_outside_the_fcgidaemon_table_are_an_error(tmp_path):
    """With a [fcgidaemon] table only the table is read: a key above it, known or misspelt, is
    an error naming it, not silently ignored."""
    conf = tmp_path / "mixed.toml"
    for outside in ("workers = 7", "wrokers = 3"):
        conf.write_text(f'{outside}\n\n[fcgidaemon]\nbind = "127.0.0.1:{free_port()}"\nworkers = 1\n')
        key = outside.split()[0]
        # `check` first: before the fix it says OK at once instead of the daemon serving
        for prefix in (["check"], []):
            out = run_cli([*prefix, "testapp", "--pythonpath", str(APPS), "--config", str(conf)],
                          tmp_path)
            assert out.returncode == 2, (prefix, out.stdout, out.stderr)
            command = "fcgidaemon check" if prefix else "fcgidaemon"
            assert out.stderr.strip() == (f"{command}: config file {conf}: {key!r} is outside the "
                                          f"[fcgidaemon] table (keys go in the table, or all at the "
                                          f"top level)"), out.stderr
    conf.write_text("[fcgidaemon]\nworkers = 3\n[fcgidaemon.extra]\n")  # inside the table: as before
    out = run_cli(["check", "testapp", "--pythonpath", str(APPS), "--config", str(conf)], tmp_path)
    assert out.returncode == 2 and "unknown option 'extra'" in out.stderr, out.stderr


def test_toml_integer_modes_are_the_mode_itself(start_daemon, tmp_path):
    """TOML reads `0o640` as the integer 416: that is the mode, not the octal digits "416"
    (before: socket mode 0o416, and `umask = 0o022` refused as "18" is not octal)."""
    conf = tmp_path / "modes.toml"
    conf.write_text("socket-mode = 0o640\numask = 0o027\n")
    sock = tmp_path / "m.sock"
    d = start_daemon("testapp", "--config", str(conf), workers=1, bind=str(sock))
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o640
    with open(f"/proc/{d.pid}/status") as fh:
        assert re.search(r"^Umask:\s+0027$", fh.read(), re.M)
    # text is octal wherever it comes from: a TOML string, the command line, the environment
    conf.write_text('socket-mode = "0600"\numask = "077"\n')
    c = resolve(["app", "--config", str(conf)], {})
    assert (c.socket_mode, c.umask) == (0o600, 0o077)
    c = resolve(["app", "--socket-mode", "660"], {"FCGIDAEMON_UMASK": "0002"})
    assert (c.socket_mode, c.umask) == (0o660, 0o002)
    conf.write_text("socket-mode = 0o10000\n")
    out = run_cli(["check", "testapp", "--pythonpath", str(APPS), "--config", str(conf)], tmp_path)
    assert out.returncode == 2 and "mode out of range" in out.stderr, out.stderr
    # a bare TOML integer is decimal: 660 was the mode 0o1224 (sticky, -w--w-r--), and
    # `umask = 77` the mask 0o115 (files world-writable), both silently; refused now
    for line, literal, fix in (("socket-mode = 660", "660", "0o660"), ("umask = 77", "77", "0o77"),
                               ("umask = 0", "0", "0o0")):
        conf.write_text(line + "\n")
        out = run_cli(["check", "testapp", "--pythonpath", str(APPS), "--config", str(conf)], tmp_path)
        key = line.split()[0]
        assert (out.returncode, out.stderr) == (2, f"fcgidaemon check: config file {conf}: {key} = "
                                                   f"{literal} is a decimal number; write a mode as "
                                                   f"{fix} or \"{literal}\"\n"), out.stderr
    # a quoted key is the same key: "umask" = 0o022 was refused as decimal (the text was
    # searched for the bare key only), and "umask" = 77 must be refused like umask = 77
    conf.write_text('"umask" = 0o022\n\'socket-mode\' = 0o600\n')
    c = resolve(["app", "--config", str(conf)], {})
    assert (c.socket_mode, c.umask) == (0o600, 0o022)
    conf.write_text('"umask" = 77\n')
    with pytest.raises(ConfigError, match=r"umask = 77 is a decimal number; write a mode as 0o77"):
        resolve(["app", "--config", str(conf)], {})
    out = run_cli(["check", "testapp", "--pythonpath", str(APPS), "--config", ""], tmp_path)
    assert (out.returncode, out.stderr) == (2, "fcgidaemon check: --config: empty file name\n")


def test_min_workers_help_says_what_zero_does(start_daemon, tmp_path):
    """With --max-workers, --min-workers 0 is a floor of 1 (supervise._scale, manager._resize),
    not 'fixed at --workers': the help (and the README table made from it) says so."""
    out = run_cli(["--help"], tmp_path, env={"COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    min_help = text[text.rindex("--min-workers N"):text.rindex("--max-workers N")]  # not usage
    assert "fixed at --workers" not in min_help and "(0: 1)" in min_help, min_help
    d = start_daemon("testapp", "--max-workers", "3", "--idle-timeout", "0.3", workers=2)
    d.wait_log(r"scaling down to 1 worker\b")  # below --workers 2: the floor is 1


def test_config_file_is_used(start_daemon, tmp_path):
    conf = tmp_path / "fcgi.toml"
    conf.write_text('[fcgidaemon]\nworkers = 3\n')
    d = start_daemon("testapp", "--config", str(conf), workers=1)
    # --workers 1 from the harness is on the command line and wins; the file is read and valid
    assert len(d.wait_workers(1)) == 1


# ---------------------------------------------------------------- check


def test_check_ok(tmp_path):
    out = run_cli(["check", "testapp", "--pythonpath", str(APPS)], tmp_path)
    assert out.returncode == 0 and "OK" in out.stdout


def test_check_reports_traceback(tmp_path):
    out = run_cli(["check", "broken_syntax", "--pythonpath", str(APPS)], tmp_path)
    assert out.returncode == 1
    assert "SyntaxError" in out.stderr and "broken_syntax.py" in out.stderr


def test_check_judges_as_the_daemon_does(tmp_path):
    """`check` gates deploy scripts, so it must refuse what the daemon refuses: an import that
    calls os._exit(0) ended `check` with 0 and no word (the daemon: "worker starting exit 0"),
    and an import that hangs hung it past the --ready-timeout it accepts. A callable that is
    not there is "not found" (2), said plainly, not as an AttributeError in our loader.py."""
    (tmp_path / "exits.py").write_text("import os\nos._exit(0)\n")
    (tmp_path / "hangs.py").write_text("import time\ntime.sleep(60)\n")
    (tmp_path / "nocallable.py").write_text("x = 1\n")
    helper_pid = tmp_path / "helper.pid"
    (tmp_path / "forks.py").write_text(  # a helper process started at import holds the pipe
        "import os, time\n"
        "helper = os.fork()\n"
        "if helper == 0:\n"
        "    time.sleep(30)\n"
        "    os._exit(0)\n"
        f"open({str(helper_pid)!r}, 'w').write(str(helper))  # before the import ends\n"
        "def application(environ, start_response):\n"
        "    return []\n")
    cases = {
        "exits": (1, "fcgidaemon check: FAILED: the import ended the process without a verdict "
                     "(exit status 0)\n"),
        "hangs": (1, "fcgidaemon check: FAILED: not imported within 2s (--ready-timeout)\n"),
        "nocallable:app": (2, f"fcgidaemon check: FAILED: application nocallable:app: 'app' not "
                              f"found in {tmp_path / 'nocallable.py'}\n"),
    }
    for app, (code, stderr) in cases.items():
        started = time.monotonic()
        out = run_cli(["check", app, "--pythonpath", str(tmp_path), "--ready-timeout", "2"], tmp_path)
        assert (out.returncode, out.stderr, out.stdout) == (code, stderr, ""), app
        assert time.monotonic() - started < 15, app
    # a good app whose import starts a helper: OK at once (it waited for the helper, then said
    # "not imported within 2s"), and nothing of it is left running
    out = run_cli(["check", "forks", "--pythonpath", str(tmp_path), "--ready-timeout", "2"], tmp_path)
    assert (out.returncode, out.stdout) == (0, "fcgidaemon check: OK: forks:application is function "
                                               "application\n"), out.stderr
    helper = int(helper_pid.read_text())
    wait_for(lambda: not os.path.exists(f"/proc/{helper}") or
             open(f"/proc/{helper}/stat").read().split()[2] == "Z", 5, "the helper to be gone")


# ---------------------------------------------------------------- reload --wait, status, stop


def test_reload_wait_interrupted_by_sigterm_exits_0(start_daemon, tmp_path):
    """systemd sends a stop's SIGTERM to a running ExecReload= too: `reload --wait` died of it,
    and a stop during a reload left the unit "failed" (Result=signal; seen in the sandbox).
    Now it says it stopped waiting and exits 0; the reload itself goes on in the manager."""
    src = app_copy(tmp_path)
    d = start_daemon("liveapp", workers=1, pythonpath=[src])
    d.wait_workers(1)
    (src / "liveapp.py").write_text("import time\ntime.sleep(3)  # a slow import: the reload takes a while\n"
                                    + (src / "liveapp.py").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("FCGI")}
    waiter = subprocess.Popen([sys.executable, "-m", "fcgidaemon", "reload", "--wait", "--pid", str(d.pid)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    try:
        d.wait_log(r"reload: starting generation 2")
        waiter.send_signal(signal.SIGTERM)
        _, err = waiter.communicate(timeout=10)
    finally:
        if waiter.poll() is None:
            waiter.kill()
    print(f"\nexit {waiter.returncode}: {err.strip()}")
    assert waiter.returncode == 0
    assert "SIGTERM while waiting" in err
    d.wait_serving(2)


def test_reload_wait_status_stop(start_daemon, tmp_path):
    src = app_copy(tmp_path)
    pidfile = tmp_path / "d.pid"
    d = start_daemon("liveapp", "--pidfile", str(pidfile), workers=2, pythonpath=[src])
    set_version(src, "v2")
    out = run_cli(["reload", "--wait", "--pidfile", str(pidfile)], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "generation 2 serving" in out.stdout
    assert get(d.address, "/hello").body.startswith(b"hello v2 ")  # true as soon as it returns

    (src / "liveapp.py").write_text("def application(environ, start_response)\n")  # SyntaxError
    out = run_cli(["reload", "--wait", "--pid", str(d.pid)], tmp_path)
    assert out.returncode == 1
    assert re.search(r"reload failed: SyntaxError in .*liveapp\.py:1", out.stderr), out.stderr
    assert get(d.address, "/hello").body.startswith(b"hello v2 ")  # old code still serving

    out = run_cli(["status", "--json", "--pid", str(d.pid)], tmp_path)
    status = json.loads(out.stdout)
    assert status["generation"] == 2 and status["reloads_ok"] == 1 and status["reloads_failed"] == 1
    assert sorted(w["pid"] for w in status["worker_list"] if w["state"] == "ready") == d.workers()
    assert status["workers"]["idle"] == 2 and status["requests"] >= 2
    table = run_cli(["status", "--pid", str(d.pid)], tmp_path).stdout
    assert re.search(r"^generation: +2$", table, re.M) and str(d.workers()[0]) in table

    out = run_cli(["stop", "--pidfile", str(pidfile)], tmp_path)
    assert out.returncode == 0
    assert d.wait_exit(5) == 0


def test_the_control_socket_cannot_be_taken_or_faked_by_another_user(start_daemon, tmp_path):
    """The control socket was @fcgidaemon/<pid>: abstract names have no permissions, so any
    local user could bind the names of the next pids, and the daemon could not start ("cannot
    start: [Errno 98] Address already in use", exit 2, not restarted). Now its name has a random
    part; and a socket bound under a running manager's pid is not taken for its own (clients
    check the listener's pid)."""
    from fcgidaemon import control
    with open("/proc/sys/kernel/ns_last_pid") as fh:
        last = int(fh.read())
    squatters = []
    for pid in range(last + 1, last + 300):  # the old names of the next 300 pids
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(f"\0fcgidaemon/{pid}".encode())
        except OSError:  # taken already, by an old-style manager started meanwhile
            sock.close()
            continue
        sock.listen(1)
        squatters.append(sock)
    try:
        d = start_daemon(workers=1)
        d.wait_workers(1)
        fake = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fake.bind(f"\0fcgidaemon/{d.pid}/0000000000000000".encode())  # listed first, and not the manager
        fake.listen(1)
        squatters.append(fake)
        assert len(control.candidates(d.pid)) == 3  # its own, the fake, and a squatted old name
        out = run_cli(["status", "--json", "--pid", str(d.pid)], tmp_path)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["manager_pid"] == d.pid
    finally:
        for sock in squatters:
            sock.close()


def test_a_client_dribbling_its_command_holds_the_manager_at_most_a_second(start_daemon, tmp_path):
    """A control client that sends one byte every 0.3 s: the manager gives up on it after 1 s in
    all, so a `status` asked meanwhile is answered, and SIGHUP still works."""
    from fcgidaemon import control
    d = start_daemon(workers=1)
    slow = control.connect(d.pid, timeout=5)
    stop = threading.Event()

    def dribble() -> None:
        try:
            while not stop.wait(0.3):
                slow.send(b"s")
        except OSError:
            pass  # the manager gave up on us: what this test wants

    thread = threading.Thread(target=dribble, daemon=True)
    thread.start()
    wait_for(lambda: _reading_a_command(d.pid), 5, "the manager reading the slow command")
    t0 = time.monotonic()
    answer = control.ask(d.pid, "status", timeout=10)
    took = time.monotonic() - t0
    stop.set()
    thread.join(5)
    slow.close()
    print(f"\nstatus answered in {took:.2f}s beside a dribbling client")
    assert answer["ok"] and took < 3  # held 1 s at most; before: no answer in 10 s
    d.wait_log(r"control connection failed: no complete command within 1s")
    d.reload(2)


# system call numbers, for /proc/PID/syscall: a socket with a timeout waits in poll() (ppoll on
# aarch64) before recvmsg(); the manager's loop itself waits in epoll_wait()
READING = {"x86_64": {"7", "47"}, "aarch64": {"73", "212"}}


def _reading_a_command(pid: int) -> bool:
    """Whether the manager is blocked reading a control command (not in its event loop)."""
    numbers = READING.get(os.uname().machine)
    if numbers is None:
        pytest.skip(f"no system call numbers for {os.uname().machine}")
    try:
        with open(f"/proc/{pid}/syscall") as fh:
            return fh.read().split()[0] in numbers
    except OSError:
        pytest.skip("/proc/PID/syscall is not readable here")


def test_control_commands_report_missing_manager(tmp_path):
    import subprocess
    gone = subprocess.Popen(["true"])
    gone.wait(5)  # reaped: its pid names no process (until the kernel reuses it)
    out = run_cli(["reload", "--wait", "--pid", str(gone.pid)], tmp_path)
    assert out.returncode == 1 and f"no process {gone.pid}" in out.stderr
    # no pidfile is a manager that does not run (it removes its pidfile on exit, and systemd's
    # RuntimeDirectory= its directory): status said "cannot read pid" and exit 1, not 3
    none = tmp_path / "none.pid"
    for command, code in (("status", 3), ("stop", 0), ("reload", 1)):
        out = run_cli([command, "--pidfile", str(none)], tmp_path)
        assert (out.returncode, out.stderr) == (code, f"fcgidaemon {command}: no pidfile {none}: not running\n")
    garbage = tmp_path / "garbage.pid"
    garbage.write_text("")
    out = run_cli(["status", "--pidfile", str(garbage)], tmp_path)
    assert (out.returncode, out.stderr) == (1, f"fcgidaemon status: --pidfile {garbage} holds no pid ('')\n")
    # as LSB init scripts answer (it was 1 for both): `status` of a manager that does not run
    # is 3, a `stop` of one is done already (0); both say so
    out = run_cli(["status", "--pid", str(gone.pid)], tmp_path)
    assert (out.returncode, out.stderr) == (3, f"fcgidaemon status: no process {gone.pid}: not running\n")
    out = run_cli(["stop", "--pid", str(gone.pid)], tmp_path)
    assert (out.returncode, out.stderr) == (0, f"fcgidaemon stop: no process {gone.pid}: not running\n")


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "0", "abc"])
def test_control_commands_refuse_a_bad_timeout_in_one_line(tmp_path, value):
    """-1, nan and inf reached the socket's timeout (a 19-line traceback, exit 1), and `stop
    --timeout 0` signalled the manager, then called the stop a failure."""
    out = run_cli(["status", "--pid", "1", "--timeout", value], tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("fcgidaemon status: argument --timeout: "), out.stderr


def test_control_commands_never_signal_a_process_that_is_not_a_manager(tmp_path):
    """A pidfile left behind names whatever process now has that pid: stop, reload and upgrade
    sent it SIGTERM, SIGHUP, SIGUSR2 (a stranger's `sleep` died of each)."""
    import subprocess
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        pidfile = tmp_path / "stale.pid"
        pidfile.write_text(f"{stranger.pid}\n")
        for command in (["stop"], ["reload"], ["upgrade"], ["stop", "--quick"], ["reload", "--wait"]):
            out = run_cli([*command, "--pidfile", str(pidfile)], tmp_path)
            assert out.returncode == (0 if command[0] == "stop" else 1), (command, out.stdout, out.stderr)
            assert out.stderr == (f"fcgidaemon {command[0]}: process {stranger.pid} is not an "
                                  f"fcgidaemon manager (no control socket): not running\n")
            assert stranger.poll() is None, command  # not signalled
    finally:
        stranger.kill()
        stranger.wait(5)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_control_commands_from_another_user_say_permission_denied(start_daemon):
    """Only root and the manager's own user may steer it. Others got tracebacks: a KeyError from
    `status`, a PermissionError from `stop` and `reload`. The commands run in a forked child of
    this test that switched to nobody (the venv may not be readable by nobody)."""
    import pwd

    from fcgidaemon import commands
    d = start_daemon(workers=1)
    nobody = pwd.getpwnam("nobody")
    for command in (["status"], ["stop"], ["reload"], ["upgrade"], ["status", "--json"]):
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:
            try:
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                sys.stdout = sys.stderr = os.fdopen(write_end, "w")  # not pytest's capture
                code = commands.run(command[0], [*command[1:], "--pid", str(d.pid)])
            except BaseException:  # noqa: BLE001 - the traceback is what the test looks for
                import traceback
                traceback.print_exc()
                code = 99
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end) as fh:
            output = fh.read()
        _, status = os.waitpid(child, 0)
        print(command, os.waitstatus_to_exitcode(status), output.strip())
        assert os.waitstatus_to_exitcode(status) == 1, output
        assert "Traceback" not in output
        assert "permission denied" in output and output.count("\n") == 1
    assert d.proc.poll() is None and get(d.address, "/hello").status == 200


def test_command_usage_errors_are_one_line_and_help_lists_the_commands(tmp_path):
    """A usage error of a command printed argparse's usage and the error (three lines); the
    rule is one line and exit 2. `fcgidaemon --help` did not name the commands, and `check
    --help` showed itself as the daemon."""
    for argv, line in ((["status"], "fcgidaemon status: one of the arguments --pid --pidfile is required"),
                       (["reload", "--pid", "abc"], "fcgidaemon reload: argument --pid: invalid int value: 'abc'"),
                       (["check", "--bogus", "x"], "fcgidaemon check: unrecognized arguments: --bogus")):
        out = run_cli(argv, tmp_path)
        assert (out.returncode, out.stderr) == (2, line + "\n"), (argv, out.stderr)
    text = run_cli(["--help"], tmp_path, env={"COLUMNS": "100"}).stdout
    for command in ("reload", "upgrade", "status", "stop", "check"):
        assert re.search(rf"^  {command} ", text, re.M), command
    out = run_cli(["check", "--help"], tmp_path, env={"COLUMNS": "100"})
    assert out.returncode == 0 and out.stdout.startswith("usage: fcgidaemon check ")
    assert "exit 0 if it imports, 1 if it fails, 2 if it is not found" in " ".join(out.stdout.split())


def test_readme_signal_table_is_generated_from_the_code():
    from fcgidaemon.manager import MANAGER_SIGNALS, SIGNAL_DOCS, signals_markdown
    assert signals_markdown() in (ROOT / "README.md").read_text()
    assert set(SIGNAL_DOCS) == set(MANAGER_SIGNALS) - {signal.SIGCHLD}


def test_readme_bench_table_is_the_latest_run():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from update_readme import bench_markdown
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert bench_markdown() in (ROOT / "README.md").read_text(), "run `make readme` after `make bench`"


def test_a_manager_of_the_previous_version_can_reach_this_one_and_be_reached(start_daemon, tmp_path):
    """Managers before the random control name listened on @fcgidaemon/<pid>. Upgraded with
    SIGUSR2 from such a version, the new manager could not reach the old one (it took over
    nothing: both served until the old one's deadline), `status` said "not running" (3) and
    `stop` "not running" (0) while the old one ran, and the old manager's kept connections had
    no name to go to. The old name is still found (its listener's pid checked), and a manager
    listens on it too, if it is free: an old-style client's command is answered."""
    from fcgidaemon import control
    legacy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # this process as an old manager
    legacy.bind(f"\0fcgidaemon/{os.getpid()}".encode())
    legacy.listen(1)
    try:
        assert control.candidates(os.getpid()) == [f"\0fcgidaemon/{os.getpid()}".encode()]
        control.connect(os.getpid(), timeout=5).close()
    finally:
        legacy.close()
    d = start_daemon(workers=1)
    d.wait_workers(1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as old_client:
        old_client.settimeout(5)
        old_client.connect(f"\0fcgidaemon/{d.pid}".encode())
        old_client.sendall(b"status\n")
        answer = b""
        while not answer.endswith(b"\n"):
            answer += old_client.recv(65536)
    assert json.loads(answer)["manager_pid"] == d.pid


def test_a_stale_pidfile_is_not_kept_alive_by_a_name_bound_for_its_pid(start_daemon, tmp_path):
    """A stale pidfile names a pid now used by another program, and a third process bound a
    control-socket name under that pid: the start refused ("names manager N, which is
    running"). The name's listener is not process N, so it is not N's: the daemon starts."""
    import subprocess
    stranger = subprocess.Popen(["sleep", "60"])
    fake = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        fake.bind(f"\0fcgidaemon/{stranger.pid}/0123456789abcdef".encode())
        fake.listen(1)
        pidfile = tmp_path / "d.pid"
        pidfile.write_text(f"{stranger.pid}\n")
        d = start_daemon("testapp", "--pidfile", str(pidfile), workers=1)
        d.wait_workers(1)
        assert pidfile.read_text().strip() == str(d.pid)
    finally:
        fake.close()
        stranger.kill()
        stranger.wait(5)


def _unit_environment(unit: str) -> dict[str, str]:
    env = {}
    for line in (ROOT / "deploy" / "systemd" / unit).read_text().splitlines():
        if line.startswith("Environment="):
            name, _, value = line.removeprefix("Environment=").partition("=")
            env[name] = value.replace("%i", "blog")
    return env


def test_the_template_units_tcp_variant_starts(tmp_path):
    """fcgidaemon@.service sets a unix socket's owner in Environment= and says: set bind =
    "HOST:PORT" in the TOML file for TCP instead. Doing so was refused (exit 2: "--socket-owner
    applies to a unix socket", an option the operator never wrote), and RestartPreventExitStatus=2
    kept the instance down. An owner given on the command line or in the file is still refused,
    and the error says where each value came from."""
    env = _unit_environment("fcgidaemon@.service")
    assert env["FCGIDAEMON_SOCKET_OWNER"] and env["FCGI_SOCKET_PATH"].startswith("unix:")
    conf = tmp_path / "blog.toml"
    conf.write_text('app = "testapp:application"\nbind = "127.0.0.1:9010"\n')
    config = resolve(["--config", str(conf)], env)
    assert (str(config.bind), config.socket_owner) == ("127.0.0.1:9010", None)
    conf.write_text('app = "testapp:application"\nbind = "127.0.0.1:9010"\nsocket-owner = "nobody"\n')
    with pytest.raises(ConfigError, match=rf"--socket-owner \(config file {conf}\) applies to a unix "
                                          rf"socket \(--bind unix:PATH\), not --bind 127.0.0.1:9010 "
                                          rf"\(config file {conf}\)"):
        resolve(["--config", str(conf)], env)
    # the unit's own default, a unix socket, keeps its owner
    assert resolve(["testapp:application"], env).socket_owner == "fcgidaemon:www-data"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start as root and drop to --user")
def test_an_access_log_the_user_cannot_write_is_one_line_and_leaves_no_pidfile(tmp_path):
    """--user nobody with an access log in a directory nobody may not write: the log was checked
    after the privileges were dropped and the pidfile written, so the start failed with a second
    line ("cannot remove pidfile ... Permission denied") and left a pidfile naming a dead pid."""
    os.chmod(tmp_path, 0o755)  # nobody may enter, not write
    pidfile, access = tmp_path / "d.pid", tmp_path / "logs" / "access.log"
    access.parent.mkdir(mode=0o755)
    out = run_cli(["testapp", "--pythonpath", str(APPS), "--bind", f"127.0.0.1:{free_port()}",
                   "--workers", "1", "--user", "nobody", "--pidfile", str(pidfile),
                   "--access-log", str(access)], tmp_path)
    assert (out.returncode, out.stderr) == (2, f"fcgidaemon: --access-log {access}: Permission denied\n")
    assert not pidfile.exists() and not access.exists()


def test_an_unknown_user_or_group_is_named(tmp_path):
    """It said "unknown user or group: nosuchuser:" for either."""
    for flag, name, what in (("--user", "no-such-user-xyz", "user"), ("--group", "no-such-group-xyz", "group")):
        out = run_cli(["check", "testapp", "--pythonpath", str(APPS), flag, name], tmp_path)
        assert (out.returncode, out.stderr) == (2, f"fcgidaemon check: {flag} {name}: no such {what}\n")
