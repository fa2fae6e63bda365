"""SIGUSR2: a new manager takes over the listening socket; nothing is lost, failure is safe."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from daemon import APPS, Daemon, alive, children, free_port, run_cli, wait_for
from fcgiclient import FCGIClient, build_request, make_params
from load import FCGIChecker, run_load
from test_lifecycle import _wait_busy, app_copy, get, proc_title, set_version


def preload_info(address) -> dict:
    return json.loads(get(address, "/preload").body)


def test_upgrade_under_load_new_manager_new_preload_zero_failures(start_daemon, tmp_path):
    src = app_copy(tmp_path)
    (src / "preloaded_mod.py").write_text("import os\nIMPORT_PID = os.getpid()\nFLAVOUR = 'old'\n")
    pidfile = tmp_path / "m.pid"
    d = start_daemon("liveapp", "--preload", "preloaded_mod", "--pidfile", str(pidfile), workers=3,
                     pythonpath=[src])
    old_workers = d.wait_workers(3)
    assert preload_info(d.address)["preload_pid"] == d.pid
    outcome: dict = {}

    def upgrader():
        time.sleep(1.5)
        (src / "preloaded_mod.py").write_text("import os\nIMPORT_PID = os.getpid()\nFLAVOUR = 'new'\n")
        set_version(src, "v2")
        outcome["cli"] = run_cli(["upgrade", "--wait", "--pidfile", str(pidfile)], tmp_path)

    thread = threading.Thread(target=upgrader)
    thread.start()
    results = []
    for keep in (True, False):
        with FCGIChecker(d.address, keep_conn=keep, uri_template="/id?id={uid}") as checker:
            results.append(run_load(checker, clients=16, duration=3 if keep else 2))
        if keep:
            thread.join(20)
    for result in results:
        print(result.summary())
        assert result.failures == 0, result.errors
    assert outcome["cli"].returncode == 0, outcome["cli"].stderr
    new_pid = int(pidfile.read_text())
    assert new_pid != d.pid
    wait_for(lambda: d.proc.poll() is not None, 10, "the old manager to exit")
    assert d.proc.returncode == 0
    assert not any(alive(w) for w in old_workers)
    info = preload_info(d.address)
    assert info["preload_pid"] == new_pid and info["ppid"] == new_pid  # new preload, new manager
    assert get(d.address, "/hello").body.startswith(b"hello v2 ")
    assert not (tmp_path / "m.pid.oldbin").exists()
    d.wait_log(rf"\[manager {new_pid} gen 2\] generation 2 serving")
    # the new manager is a full manager: reload and stop work on it
    set_version(src, "v3")
    assert run_cli(["reload", "--wait", "--pid", str(new_pid)], tmp_path).returncode == 0
    assert get(d.address, "/hello").body.startswith(b"hello v3 ")
    assert run_cli(["stop", "--pid", str(new_pid)], tmp_path).returncode == 0
    assert not pidfile.exists()


def test_upgrade_with_broken_preload_keeps_the_old_manager(start_daemon, tmp_path):
    src = app_copy(tmp_path)
    pidfile = tmp_path / "m.pid"
    d = start_daemon("liveapp", "--preload", "preloaded_mod", "--pidfile", str(pidfile), workers=2,
                     pythonpath=[src])
    workers = d.wait_workers(2)
    outcome: dict = {}

    def upgrader():
        time.sleep(1)
        (src / "preloaded_mod.py").write_text("raise ImportError('broken preload')\n")
        outcome["cli"] = run_cli(["upgrade", "--wait", "--pid", str(d.pid)], tmp_path)

    thread = threading.Thread(target=upgrader)
    thread.start()
    with FCGIChecker(d.address, keep_conn=True, uri_template="/id?id={uid}") as checker:
        result = run_load(checker, clients=8, duration=3)
    thread.join(20)
    print(result.summary())
    assert result.failures == 0, result.errors
    assert outcome["cli"].returncode == 1
    # why, not only "exited before it was ready" (the new manager tells the old one)
    assert re.fullmatch(r"upgrade failed: new manager \d+: preload failed: preload preloaded_mod: "
                        r"ImportError in \S+preloaded_mod.py:1: broken preload\n", outcome["cli"].stderr), \
        outcome["cli"].stderr
    assert d.proc.poll() is None and d.workers() == workers
    assert pidfile.read_text().strip() == str(d.pid)  # it named the old manager all along
    assert preload_info(d.address)["preload_pid"] == d.pid
    d.wait_log(r"ImportError: broken preload")


def test_a_worker_count_set_by_sigttin_survives_an_upgrade(start_daemon, tmp_path):
    """--workers 2, then SIGTTIN: 3 workers. After SIGUSR2 the new manager runs 3, not the 2 of
    its (unchanged) command line; the count used to fall back to --workers at every upgrade."""
    d = start_daemon("testapp", workers=2)
    d.wait_workers(2)
    d.signal(signal.SIGTTIN)
    d.wait_workers(3)
    out = run_cli(["upgrade", "--wait", "--pid", str(d.pid)], tmp_path, timeout=30)
    assert out.returncode == 0, out.stderr
    new = int(re.search(r"manager (\d+) serving", out.stdout).group(1))
    try:
        wait_for(lambda: d.proc.poll() is not None, 10, "the old manager to exit")
        d.wait_log(rf"\[manager {new} gen 2\] generation 2 serving: \d+ workers")
        workers = children(new)
        print(f"\nafter SIGTTIN and SIGUSR2: manager {new} runs {len(workers)} workers")
        assert len(workers) == 3
        assert d.count(rf"\[manager {new} gen 2\] generation 2 serving: 3 workers") == 1
    finally:
        os.kill(new, signal.SIGTERM)
        wait_for(lambda: not alive(new), 10, "the new manager to stop")


def test_second_usr2_during_an_upgrade_is_refused(start_daemon, tmp_path):
    src = app_copy(tmp_path)
    (src / "slowpre.py").write_text("import time\ntime.sleep(1.5)\n")
    d = start_daemon("liveapp", "--preload", "slowpre", workers=1, pythonpath=[src])
    d.signal(signal.SIGUSR2)
    d.wait_log(r"upgrade: started new manager")
    d.signal(signal.SIGUSR2)
    d.wait_log(r"upgrade refused: an upgrade to manager \d+ is in progress")
    d.wait_log(r"upgrade: manager \d+ is ready")
    wait_for(lambda: d.proc.poll() is not None, 10, "the old manager to exit")
    assert d.count(r"upgrade: started new manager") == 1


def test_stop_by_pidfile_during_an_upgrade_stops_both_managers(start_daemon, tmp_path):
    """`fcgidaemon stop --pidfile` while the new manager still starts (its preload takes 3 s):
    the pidfile still names the manager in charge, the old one, so the stop reaches it, and it
    stops the new one with it; nothing serves afterwards. The pidfile used to name the new
    manager from its first moment: the stop ended that one, said "stopped" and exited 0, and
    the old manager took that for a failed upgrade and served on."""
    src = app_copy(tmp_path)
    (src / "slowpre.py").write_text("import time\ntime.sleep(3)\n")
    pidfile = tmp_path / "m.pid"
    d = start_daemon("liveapp", "--preload", "slowpre", "--pidfile", str(pidfile), workers=1,
                     pythonpath=[src])
    d.signal(signal.SIGUSR2)
    d.wait_log(r"upgrade: started new manager \d+")
    new = int(re.search(r"upgrade: started new manager (\d+)", d.log()).group(1))
    try:
        named = pidfile.read_text().strip()
        out = run_cli(["stop", "--pidfile", str(pidfile)], tmp_path, timeout=30)
        wait_for(lambda: not alive(new), 10, "the new manager to stop too")
    finally:
        if alive(new):
            os.kill(new, signal.SIGKILL)
    print(f"\nduring the upgrade the pidfile named {named} (old {d.pid}, new {new}); "
          f"stop: exit {out.returncode}, {out.stdout.strip()!r}")
    assert named == str(d.pid)
    assert out.returncode == 0, out.stderr
    assert d.proc.poll() == 0
    assert not pidfile.exists() and not (tmp_path / "m.pid.oldbin").exists()
    with pytest.raises(OSError):
        socket.create_connection(d.address, timeout=2).close()
    d.wait_log(r"upgrade failed: the old manager is stopping")
    assert d.count(r"the old manager is stopping; still serving") == 0  # it is not: it stops


@pytest.mark.parametrize("name", ["up.sock", "my app.sock"])
def test_upgrade_keeps_the_unix_socket(start_daemon, tmp_path, name):
    """... and the new manager removes it at its exit, whatever its name (a path with a space
    was cut at the space when the duty was handed over, and the file was left behind)."""
    path = tmp_path / name
    d = start_daemon(bind=f"unix:{path}", workers=1)
    d.signal(signal.SIGUSR2)
    d.wait_log(r"handed over to manager (\d+)")
    import re
    new_pid = int(re.search(r"handed over to manager (\d+)", d.log()).group(1))
    wait_for(lambda: d.proc.poll() is not None, 10, "the old manager to exit")
    assert path.exists()
    assert get(str(path), "/hello").status == 200
    import os
    os.kill(new_pid, signal.SIGTERM)
    wait_for(lambda: not alive(new_pid), 10, "the new manager to stop")
    assert not path.exists()  # the new manager owned the socket file and removed it


def test_upgrade_through_apache_enablereuse_loses_nothing(tmp_path):
    """SIGUSR2 while Apache keeps pooled connections (enablereuse=on): the old workers hand
    their kept connections to the new manager, so Apache never sees one closed."""
    import collections

    from frontends import apache_available
    from load import http_checker
    from test_frontends_reload import daemon_and_front, exact_id_check, front_end_errors

    if not apache_available():
        import pytest
        pytest.skip("apache2 with mod_proxy_fcgi is not installed")
    with daemon_and_front(tmp_path, "apache", True, "tcp", workers=4) as (d, fe):
        def upgrader():
            time.sleep(1.5)
            d.signal(signal.SIGUSR2)

        thread = threading.Thread(target=upgrader)
        thread.start()
        with http_checker(fe.host, fe.port, "/app/id?id={uid}", exact_id_check(collections.Counter()),
                          timeout=30.0) as checker:
            result = run_load(checker, clients=32, duration=5)
        thread.join(10)
        print(f"{result.summary()}; Apache proxy errors: {len(front_end_errors(fe))}")
        assert result.failures == 0, result.errors
        assert front_end_errors(fe) == []
        wait_for(lambda: d.proc.poll() is not None, 10, "the old manager to hand over and exit")
        d.wait_log(r"handed over to manager \d+")


def test_an_upgrade_to_a_bad_config_file_says_why(start_daemon, tmp_path):
    """The new manager re-reads --config; an error there is the new manager's exit 2, which the
    old one, watching it through /proc, reported as "exited before it was ready" (as it did a
    failed preload): the operator could not tell them apart without the log."""
    conf = tmp_path / "d.toml"
    conf.write_text("backlog = 64\n")
    d = start_daemon("testapp", "--config", str(conf), workers=1)
    d.wait_workers(1)
    conf.write_text('max-params = "100"\n')
    out = run_cli(["upgrade", "--wait", "--pid", str(d.pid)], tmp_path)
    new_pid = re.search(r"upgrade: started new manager (\d+)", d.log()).group(1)
    assert (out.returncode, out.stderr) == (1, f"upgrade failed: new manager {new_pid}: configuration "
                                               f"error: --max-params (config file {conf}): must be at "
                                               f"least 1k (every request's params count), got '100'\n"), out.stderr
    assert d.proc.poll() is None and get(d.address, "/hello").status == 200


def test_only_the_successor_may_say_it_failed_and_only_while_it_starts(start_daemon):
    """'successor-failed PID reason' was taken from any process of the manager's user (the
    application's workers included), pid and all from the text, and in any phase: sent after
    the hand-over, the retired manager dropped its successor and closed the kept connections
    its workers handed back instead of passing them on. The kernel's peer pid must be the
    successor's, while it starts."""
    from fcgidaemon import control
    d = start_daemon("testapp", workers=1)
    d.wait_workers(1)
    kept = FCGIClient(d.address, timeout=10)
    try:
        assert kept.request(make_params("GET", "/id?id=k0"), keep_conn=True).status == 200
        slow = threading.Thread(target=lambda: get(d.address, "/sleep?s=3", timeout=15))
        slow.start()
        _wait_busy(d)  # the only old worker runs the slow request; `kept` waits on it, idle
        d.signal(signal.SIGUSR2)
        d.wait_log(r"upgrade: manager \d+ is ready; retiring 1 worker\b")
        new_pid = int(re.search(r"upgrade: manager (\d+) is ready", d.log()).group(1))
        answer = control.ask(d.pid, f"successor-failed {new_pid} spoofed", 5.0)
        slow.join(15)
        time.sleep(0.5)
        after = kept.request(make_params("GET", "/id?id=k1"), keep_conn=True)
    finally:
        kept.close()
    assert answer == {"ok": False, "message": "no such upgrade in progress"}
    assert after.status == 200 and after.body.startswith(b"id=k1 ")
    assert d.count(r"spoofed") == 0
    wait_for(lambda: not alive(d.pid), 15, "the old manager to exit")
    os.kill(new_pid, signal.SIGTERM)
    wait_for(lambda: not alive(new_pid), 15, "the new manager to exit")


def test_a_new_manager_gone_after_it_took_over_is_said_not_a_loop_error(start_daemon):
    """An upgrade: the new manager takes over, then dies (SIGKILL, standing in for a crash).
    The old worker then finishes the request it was running on a kept connection and hands
    the connection over; passing it to the dead manager raised ControlError (no control
    socket), which was caught as OSError only: a "manager loop error" traceback, with what
    followed that hand-off skipped. Now the connection is closed with one line (nobody is left
    to take it), and the old manager's last line says its successor has exited."""
    d = start_daemon("testapp", workers=1)
    d.wait_workers(1)
    kept = FCGIClient(d.address, timeout=15)
    try:
        assert kept.request(make_params("GET", "/id?id=k0"), keep_conn=True).status == 200
        kept.send_raw(build_request(make_params("GET", "/id?id=k1&sleep=2"), keep_conn=True))
        _wait_busy(d)
        d.signal(signal.SIGUSR2)
        d.wait_log(r"upgrade: manager \d+ is ready; retiring 1 worker\b")
        new_pid = int(re.search(r"upgrade: manager (\d+) is ready", d.log()).group(1))
        os.kill(new_pid, signal.SIGKILL)
        answer = kept.read_response(1, keep_conn=True)
    finally:
        kept.close()
    assert d.wait_exit(20) == 0
    print(f"\n{answer.body!r}; the old manager's last lines:\n" + "\n".join(d.log().splitlines()[-4:]))
    assert answer.body.startswith(b"id=k1 ")
    assert d.count(rf"cannot pass 1 connection\(s\) to manager {new_pid}: .*; closing them") == 1
    assert d.count(rf"handed over to manager {new_pid}, which has exited since") == 1
    assert d.count(r"manager loop error|Traceback") == 0


def test_a_failed_upgrade_leaves_the_old_manager_its_unix_socket(start_daemon, tmp_path):
    """The new manager inherits the duty to remove the socket file, but only once the old one
    has accepted it: a new manager that fails (here its preload) used to remove the file on its
    way out, and the old manager, still serving, could no longer be reached by anyone."""
    src = app_copy(tmp_path)
    path = tmp_path / "up.sock"
    d = start_daemon("liveapp", "--preload", "preloaded_mod", bind=f"unix:{path}", workers=1,
                     pythonpath=[src])
    workers = d.wait_workers(1)
    (src / "preloaded_mod.py").write_text("raise ImportError('broken preload')\n")
    d.signal(signal.SIGUSR2)
    d.wait_log(r"upgrade failed: new manager \d+: preload failed: ")
    assert path.exists()
    assert get(str(path), "/hello").status == 200
    assert d.workers() == workers
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert not path.exists()  # still the old manager's to remove


def _upgrade_to_flaky_code(start_daemon, tmp_path: Path, fails_after: float) -> tuple[Daemon, list[int]]:
    """Two workers of module `flaky`, then SIGUSR2 with new code that imports fine in the first
    new worker and fails in the second after `fails_after` seconds: returns once the first new
    worker is ready (serving beside the old ones); the daemon and the old workers' pids."""
    src = app_copy(tmp_path)
    flag, lock = tmp_path / "flaky.on", tmp_path / "flaky.lock"
    (src / "flaky.py").write_text(
        "import os, time\n"
        f"if os.path.exists({str(flag)!r}):\n"
        "    try:\n"
        f"        os.close(os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY))\n"
        "    except FileExistsError:\n"
        f"        time.sleep({fails_after})\n"
        "        raise RuntimeError('this worker failed to import')\n"
        "from liveapp import application  # noqa: E402,F401\n")
    d = start_daemon("flaky", workers=2, pythonpath=[src])
    old_workers = d.wait_workers(2)
    flag.touch()
    d.signal(signal.SIGUSR2)
    d.wait_log(r"\[manager \d+ gen 2\] worker \d+ ready")
    return d, old_workers


def test_a_failed_upgrade_lets_the_new_managers_ready_workers_finish(start_daemon, tmp_path):
    """The new manager's first worker is ready and serving from the shared socket when its
    second fails to import: the new manager stops gracefully (it used to quick-stop, and the
    requests its ready worker held died with it) and the old manager serves on."""
    d, old_workers = _upgrade_to_flaky_code(start_daemon, tmp_path, fails_after=1.5)
    with FCGIChecker(d.address, keep_conn=False, uri_template="/id?id={uid}&sleep=0.2") as checker:
        result = run_load(checker, clients=6, duration=3)
    print(result.summary())
    d.wait_log(r"upgrade failed: new manager \d+: application failed to start: RuntimeError in "
               r"\S+flaky.py:7: this worker failed to import")
    assert result.failures == 0, result.errors
    assert d.count(r"\[manager \d+ gen 2\] graceful stop") == 1
    assert d.workers() == old_workers and d.proc.poll() is None


def test_a_failed_upgrade_hands_the_new_managers_kept_connections_back(start_daemon, tmp_path):
    """The old workers are busy, so the new manager's first ready worker accepts 4 kept
    connections; its second worker then fails to import and the upgrade fails. The new
    manager's graceful stop closed those connections as soon as they were idle (Apache's
    enablereuse does not retry a request on a reused connection that closes: a 503 each). Now
    its workers hand them over and the new manager passes them to the old one, which serves
    on: the next request on each is answered, by an old worker."""
    d, old_workers = _upgrade_to_flaky_code(start_daemon, tmp_path, fails_after=2.5)
    slow = [threading.Thread(target=get, args=(d.address, "/sleep?s=3"), kwargs={"timeout": 20})
            for _ in old_workers]
    for thread in slow:
        thread.start()
    wait_for(lambda: all("busy" in proc_title(w) for w in old_workers), 10, "both old workers busy")
    clients = [FCGIClient(d.address, timeout=20) for _ in range(4)]
    try:
        first = [c.request(make_params("GET", f"/id?id=k{i}"), keep_conn=True) for i, c in enumerate(clients)]
        d.wait_log(r"upgrade failed: new manager \d+: application failed to start")
        for thread in slow:
            thread.join(20)
        then = [c.request(make_params("GET", f"/id?id=n{i}"), keep_conn=True) for i, c in enumerate(clients)]
    finally:
        for c in clients:
            c.close()
    pids = [int(r.body.split(b"pid=")[1]) for r in first + then]
    print(f"\nserved first by {pids[:4]}, then by {pids[4:]} (old workers {old_workers})")
    assert not set(pids[:4]) & set(old_workers)  # the new manager's worker took them
    assert [r.body.split()[0] for r in then] == [f"id=n{i}".encode() for i in range(4)]
    assert set(pids[4:]) <= set(old_workers)
    assert d.count(r"\[manager \d+ gen 2\] graceful stop: .*handing kept connections back to manager") == 1
    assert d.workers() == old_workers and d.proc.poll() is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the daemon as nobody")
def test_an_upgrade_that_cannot_fork_keeps_the_pidfile_and_says_why(start_daemon, tmp_path):
    """No process left for the new manager (RLIMIT_NPROC, as nobody): the pidfile, renamed to
    .oldbin before the fork, was never put back, the error escaped into the manager's loop
    ('manager loop error') and `upgrade --wait` got no answer. Now the pidfile is back, one
    line says why, and the manager serves on."""
    import pwd
    import resource
    from test_resilience import _tasks_of
    nobody = pwd.getpwnam("nobody")
    appdir = Path(tempfile.mkdtemp(prefix="fcgidaemon-nobody-"))
    run = tmp_path / "run"
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    try:
        appdir.chmod(0o755)
        shutil.copy(APPS / "testapp.py", appdir / "testapp.py")
        tmp_path.chmod(0o755)
        run.mkdir()
        os.chown(run, nobody.pw_uid, nobody.pw_gid)  # the manager, as nobody, may rename in it
        pidfile = run / "m.pid"
        resource.setrlimit(resource.RLIMIT_NPROC, (_tasks_of(nobody.pw_uid) + 3, hard))
        try:  # root ignores the limit; the manager inherits it and meets it as nobody
            d = start_daemon("testapp", "--user", "nobody", "--pidfile", str(pidfile), workers=2,
                             pythonpath=[appdir])
        finally:
            resource.setrlimit(resource.RLIMIT_NPROC, (soft, hard))
        workers = d.wait_workers(2)
        out = run_cli(["upgrade", "--wait", "--pid", str(d.pid)], tmp_path)
        assert out.returncode == 1
        assert "upgrade failed: cannot start a new manager: Resource temporarily unavailable" in out.stderr
        assert sorted(os.listdir(run)) == ["m.pid"] and pidfile.read_text().strip() == str(d.pid)
        assert d.count(r"loop error|Traceback") == 0, d.log()[-2000:]
        assert d.workers() == workers and get(d.address, "/hello").status == 200
    finally:
        shutil.rmtree(appdir)


def test_an_upgrade_is_refused_while_the_previous_manager_still_retires(start_daemon, tmp_path):
    """Manager 1 upgraded to 2, which was upgraded to 3 while 1's worker still finished a slow
    request: 2 handed over and exited, and 1's worker then handed its kept connections to a
    manager that was gone, so they were closed (8 requests lost of 8,628 under load). Manager 2
    now refuses until 1 is gone; then the upgrade goes through. A SIGHUP to the retired
    manager 1 said nothing; now it says where to send it."""
    pidfile = tmp_path / "m.pid"
    d = start_daemon("testapp", "--pidfile", str(pidfile), workers=1)
    (old_worker,) = d.wait_workers(1)
    out: dict = {}

    def slow() -> None:
        out["slow"] = get(d.address, "/sleep?s=3", timeout=15).status

    thread = threading.Thread(target=slow)
    managers = [d.pid]
    try:
        with FCGIClient(d.address, timeout=10) as kept:
            assert kept.request(make_params("GET", "/id?id=a"), keep_conn=True).body.endswith(
                f"pid={old_worker}".encode())
            thread.start()
            _wait_busy(d)
            first = run_cli(["upgrade", "--wait", "--pidfile", str(pidfile)], tmp_path)
            assert first.returncode == 0, first.stderr
            managers.append(int(pidfile.read_text()))
            d.signal(signal.SIGHUP)
            d.wait_log(rf"reload refused: this manager handed over to manager {managers[1]}; "
                       "signal that one")
            # over the control socket too: it answered "the manager is stopping" and "an
            # upgrade to manager N is in progress"
            for command in ("reload", "upgrade"):
                asked = run_cli([command, "--wait", "--pid", str(d.pid)], tmp_path)
                assert asked.returncode == 1
                assert (f"{command} refused: this manager handed over to manager {managers[1]}; "
                        "signal that one") in asked.stderr, asked.stderr
            second = run_cli(["upgrade", "--wait", "--pidfile", str(pidfile)], tmp_path)
            print(f"\nsecond upgrade while manager {d.pid} retires: {second.returncode} "
                  f"{second.stderr.strip()}")
            assert second.returncode == 1
            assert f"upgrade refused: the previous manager {d.pid} is still retiring" in second.stderr
            thread.join(15)
            assert out["slow"] == 200
            wait_for(lambda: d.proc.poll() is not None, 10, "the first manager to exit")
            # the kept connection went to manager 2's worker, and is still open
            reply = kept.request(make_params("GET", "/id?id=b"), keep_conn=True)
            assert reply.body.split()[0] == b"id=b" and not reply.body.endswith(f"pid={old_worker}".encode())
        third = run_cli(["upgrade", "--wait", "--pidfile", str(pidfile)], tmp_path)
        assert third.returncode == 0, third.stderr
        managers.append(int(pidfile.read_text()))
        assert len(set(managers)) == 3
    finally:
        for pid in managers[1:]:
            if alive(pid):
                os.kill(pid, signal.SIGTERM)
        for pid in managers[1:]:
            wait_for(lambda: not alive(pid), 15, f"manager {pid} to stop")


def test_a_quick_stop_of_the_old_manager_after_an_upgrade_is_quick(start_daemon, tmp_path):
    """After the hand-over the old manager waits for its workers' last requests; SIGQUIT (a
    quick stop) was ignored then, so it waited for a 6 s request. Now its workers quit at once."""
    d = start_daemon("testapp", workers=1)
    d.wait_workers(1)
    out: dict = {}

    def slow() -> None:
        try:
            out["status"] = get(d.address, "/sleep?s=6", timeout=15).status
        except Exception as exc:  # noqa: BLE001 - cut off on purpose: recorded
            out["error"] = exc

    thread = threading.Thread(target=slow)
    thread.start()
    _wait_busy(d)
    d.signal(signal.SIGUSR2)
    d.wait_log(r"upgrade: manager \d+ is ready; retiring 1 worker\b")
    t0 = time.monotonic()
    d.signal(signal.SIGQUIT)
    assert d.wait_exit(10) == 0
    took = time.monotonic() - t0
    thread.join(15)
    new_pid = int(re.search(r"upgrade: manager (\d+) is ready", d.log()).group(1))
    try:
        print(f"\nquick stop of the retired manager: {took:.2f}s; the slow request: {out}")
        assert took < 2 and "error" in out
        assert get(d.address, "/hello").status == 200  # the new manager serves on
    finally:
        os.kill(new_pid, signal.SIGTERM)
        wait_for(lambda: not alive(new_pid), 10, "the new manager to stop")


def test_a_stop_right_after_an_upgrade_waits_for_the_old_managers_last_requests(start_daemon, tmp_path):
    """SIGTERM to the new manager just after the hand-over, while a worker of the old one still
    finishes a 3 s request. The new manager exited as soon as its own workers had, with the old
    manager still running: under systemd (KillMode=mixed) the main process's exit has the rest
    of the cgroup killed, so that request was cut (seen in the sandbox: "EOF before END_REQUEST",
    and the unit said success). Now the new manager leaves only after the old one has."""
    d = start_daemon("testapp", workers=1)
    d.wait_workers(1)
    out: dict = {}

    def slow() -> None:
        out["status"] = get(d.address, "/sleep?s=3", timeout=15).status

    thread = threading.Thread(target=slow)
    thread.start()
    _wait_busy(d)
    d.signal(signal.SIGUSR2)
    d.wait_log(r"upgrade: manager \d+ is ready; retiring 1 worker\b")
    new_pid = int(re.search(r"upgrade: manager (\d+) is ready", d.log()).group(1))
    try:
        os.kill(new_pid, signal.SIGTERM)
        exits: dict = {}
        deadline = time.monotonic() + 15
        while len(exits) < 2 and time.monotonic() < deadline:
            for name, pid in (("old", d.pid), ("new", new_pid)):
                if name not in exits and not alive(pid):
                    exits[name] = time.monotonic()
            time.sleep(0.01)
        thread.join(15)
        print(f"\nexits: {sorted(exits, key=exits.get)}; the slow request: {out}")
        assert out.get("status") == 200
        assert set(exits) == {"old", "new"} and exits["old"] <= exits["new"], exits
    finally:
        for pid in (new_pid, d.pid):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_an_upgrade_says_when_the_config_file_moved_the_bind(tmp_path):
    """`bind` changed in the --config file, then SIGUSR2: the new manager keeps the sockets it
    was handed, so it still listens where the old one did. It said nothing, and `upgrade
    --wait` reported success; now it logs that a restart is what changes them."""
    old_port, new_port = free_port(), free_port()
    conf = tmp_path / "d.toml"
    conf.write_text(f'[fcgidaemon]\nbind = "127.0.0.1:{old_port}"\nworkers = 1\n')
    log = tmp_path / "d.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FCGI")}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fcgidaemon", "testapp", "--pythonpath", str(APPS),
                                 "--config", str(conf)], stdout=out, stderr=subprocess.STDOUT,
                                cwd=tmp_path, env=env, start_new_session=True)
    new = None
    try:
        wait_for(lambda: "generation 1 serving" in log.read_text(), 15, "the daemon to serve")
        conf.write_text(f'[fcgidaemon]\nbind = "127.0.0.1:{new_port}"\nworkers = 1\n')
        result = run_cli(["upgrade", "--wait", "--pid", str(proc.pid)], tmp_path, timeout=30)
        assert result.returncode == 0, result.stderr
        new = int(re.search(r"manager (\d+) serving", result.stdout).group(1))
        text = log.read_text()
        print("\n" + "\n".join(line for line in text.splitlines() if "WARNING" in line))
        assert f"--bind 127.0.0.1:{new_port} is not where the old manager listened (127.0.0.1:{old_port}" in text
        assert get(("127.0.0.1", old_port), "/hello").status == 200
    finally:
        for pid in (new, proc.pid):
            if pid and alive(pid):
                os.kill(pid, signal.SIGTERM)
        proc.wait(15)
        if new:
            wait_for(lambda: not alive(new), 15, "the new manager to stop")


def test_an_upgrade_whose_exec_fails_says_why(tmp_path):
    """The interpreter the daemon was started with is gone (a Python upgrade removed it) at
    SIGUSR2: the exec fails. The log said only "exited before it was ready"; now the reason is
    there too, and the old manager serves on."""
    import site
    python = tmp_path / "python3"
    python.symlink_to(sys.executable)
    port = free_port()
    log = tmp_path / "d.log"
    paths = [str(Path(__file__).resolve().parents[1] / "src"), *site.getsitepackages()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FCGI")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), *paths]))  # a copy first
    with open(log, "w") as out:
        proc = subprocess.Popen([str(python), "-m", "fcgidaemon", "testapp", "--pythonpath", str(APPS),
                                 "--bind", f"127.0.0.1:{port}", "--workers", "1"], stdout=out,
                                stderr=subprocess.STDOUT, cwd=tmp_path, env=env, start_new_session=True)
    try:
        wait_for(lambda: "generation 1 serving" in log.read_text(), 15, "the daemon to serve")
        python.unlink()
        proc.send_signal(signal.SIGUSR2)
        wait_for(lambda: "upgrade failed" in log.read_text(), 15, "the upgrade to fail")
        text = log.read_text()
        print("\n" + "\n".join(line for line in text.splitlines() if "exec" in line or "upgrade" in line))
        assert f"cannot exec the new manager {python}: No such file or directory" in text
        assert get(("127.0.0.1", port), "/hello").status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the daemon as nobody")
def test_with_user_the_pidfile_is_the_users_so_a_successor_can_rewrite_it(start_daemon, tmp_path):
    """--user nobody, --pidfile in a directory only root may write (/run): the pidfile was root's,
    so after a SIGUSR2 the new manager (nobody) could not replace it and it kept naming the old
    manager, gone ("no process N" from `status` and `stop`; seen in the sandbox). The file is now
    nobody's, and the handover's write, refused a new file there, rewrites it in place. (The
    upgrade itself is not run here: nobody cannot exec this machine's interpreter under /root;
    the write is run as nobody, in a child, as the new manager runs it.)"""
    import pwd
    from fcgidaemon import control
    nobody = pwd.getpwnam("nobody")
    appdir = Path(tempfile.mkdtemp(prefix="fcgidaemon-nobody-"))
    run = Path(tempfile.mkdtemp(prefix="fcgidaemon-run-"))  # as /run: nobody may not create files in it
    d = None
    try:
        for folder in (appdir, run):
            folder.chmod(0o755)
        shutil.copy(APPS / "testapp.py", appdir / "testapp.py")
        tmp_path.chmod(0o755)
        pidfile = run / "m.pid"
        d = start_daemon("testapp", "--user", "nobody", "--pidfile", str(pidfile), workers=1,
                         pythonpath=[appdir])
        d.wait_workers(1)
        assert os.stat(pidfile).st_uid == nobody.pw_uid
        child = os.fork()
        if child == 0:  # what the successor does at the handover, as nobody
            code = 1
            try:
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                control.write_pidfile(str(pidfile))
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert pidfile.read_text() == f"{child}\n"
        pidfile.write_text(f"{d.pid}\n")  # the daemon's again, for its stop
    finally:
        shutil.rmtree(appdir)
        if d is not None:
            d.stop()
        shutil.rmtree(run)
