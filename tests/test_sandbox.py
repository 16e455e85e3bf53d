"""The code sandbox: hostile programs end in ok=False within their limits, and this process is unharmed."""
import os
import subprocess
import sys
import time

import pytest

from nanoseek.sandbox import OUTPUT_CAP, run_python


def _leftover_processes() -> list[str]:
    """Live processes of sandbox runs that have already returned. A run's temp dir is the last argument on its
    command line and is deleted before run_python returns, so runs of other, concurrent test sessions (whose
    dirs still exist) are not counted."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    args = f.read().decode(errors="replace").split("\0")
            except OSError:
                continue
            dirs = [a for a in args if "nanoseek-sandbox-" in a and "\n" not in a]
            if dirs and not os.path.exists(dirs[-1]):
                found.append(" ".join(args)[-200:])
    return found


def _check_unharmed():
    assert _leftover_processes() == []  # nothing left running
    out = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "42"  # we can still start processes


def test_correct_program_runs_and_reads_stdin():
    res = run_python("a, b = map(int, input().split())\nprint(a + b)", stdin="2 40\n")
    assert res.ok and res.reason == "" and res.returncode == 0
    assert res.stdout == "42\n"


def test_stdlib_imports_and_files_inside_the_temp_dir_work():
    code = ("import json, collections, itertools, fractions, heapq, re, math, random, dataclasses, pathlib\n"
            "pathlib.Path('sub').mkdir()\n"
            "with open('sub/a.txt', 'w') as f:\n    f.write(json.dumps({'k': 1}))\n"
            "print(open('sub/a.txt').read())\nimport os\nprint(os.getcwd())")
    res = run_python(code)
    assert res.ok, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == '{"k": 1}'
    assert not os.path.exists(lines[1])  # the temp dir is deleted afterwards


def test_infinite_loop_times_out():
    t0 = time.monotonic()
    res = run_python("while True:\n    pass", timeout_s=1.0)
    elapsed = time.monotonic() - t0
    assert not res.ok and res.reason == "timeout"
    assert elapsed < 3.0
    _check_unharmed()


def test_sleep_times_out_on_the_wall_clock():
    t0 = time.monotonic()
    res = run_python("import time\ntime.sleep(60)", timeout_s=1.0)
    assert not res.ok and res.reason == "timeout" and res.returncode is None
    assert time.monotonic() - t0 < 3.0


@pytest.mark.parametrize("code", [
    "import os\nwhile True:\n    os.fork()",
    "import subprocess\nsubprocess.run(\"bash -c ':(){ :|:& };:'\", shell=True)",
    "import multiprocessing as mp\ndef f():\n    pass\nwhile True:\n    mp.Process(target=f).start()",
    "import os\nos.system(':(){ :|:& };:')",
    "import os\nos.execv('/bin/sh', ['sh', '-c', 'cat /etc/passwd'])",
])
def test_fork_bombs_and_process_spawning_fail(code):
    t0 = time.monotonic()
    res = run_python(code, timeout_s=2.0)
    assert not res.ok
    assert "root:" not in res.stdout
    assert time.monotonic() - t0 < 4.0
    _check_unharmed()


def test_fork_bomb_that_swallows_the_refusal_is_still_a_failure():
    res = run_python("import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass",
                     timeout_s=1.0)
    assert not res.ok and res.reason == "blocked: os.fork"
    _check_unharmed()


def test_huge_allocation_hits_the_memory_limit():
    res = run_python("x = bytearray(10 * 1024**3)\nprint('allocated')", memory_mb=256)
    assert not res.ok and res.reason == "memory"
    assert "allocated" not in res.stdout


def test_writing_outside_the_temp_dir_is_blocked(tmp_path):
    target = tmp_path / "escaped.txt"
    res = run_python(f"open({str(target)!r}, 'w').write('x')")
    assert not res.ok and res.reason.startswith("blocked: open")
    assert not target.exists()
    res = run_python(f"import os\nos.remove({str(tmp_path)!r})")
    assert not res.ok and tmp_path.exists()


@pytest.mark.parametrize("code", [
    "import os\nos.symlink({d!r}, 'link')\nfd = os.open('link/escaped.txt', os.O_WRONLY | os.O_CREAT)\n"
    "os.write(fd, b'x')",
    "import os\nfd = os.open({d!r}, os.O_RDONLY)\nos.close(os.open('escaped.txt', os.O_WRONLY | os.O_CREAT, "
    "dir_fd=fd))",
    # the dir_fd path is checked relative to the cwd: a deep cwd would make '../../..' mean two things
    "import os\nos.makedirs('a/b/c/d/e')\nos.chdir('a/b/c/d/e')\nfd = os.open('../../../../..', os.O_RDONLY)\n"
    "os.close(os.open('../../..' + {d!r} + '/escaped.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd))",
])
def test_writing_outside_via_symlinks_or_dir_fds_is_blocked(tmp_path, code):
    res = run_python(code.format(d=str(tmp_path)))
    assert not res.ok and res.reason.startswith("blocked:")
    assert not (tmp_path / "escaped.txt").exists()


def _symlink_into_etc():
    for root in ("/usr/lib/ssl", "/usr/lib", "/usr/share"):
        try:
            names = sorted(os.listdir(root))
        except OSError:
            continue
        for name in names:
            path = os.path.join(root, name)
            if os.path.islink(path) and os.path.realpath(path).startswith("/etc/") and os.path.isfile(path):
                return root, name
    pytest.skip("no symlink from /usr into /etc on this machine")


def test_reading_through_a_symlink_in_an_allowed_dir_is_blocked():
    root, name = _symlink_into_etc()  # e.g. /usr/lib/ssl/openssl.cnf -> /etc/ssl/openssl.cnf
    res = run_python(f"print(open({os.path.join(root, name)!r}).read())")
    assert not res.ok and res.reason.startswith("blocked: open /etc/")
    res = run_python(f"import os\nfd = os.open({root!r}, os.O_RDONLY)\n"
                     f"print(os.read(os.open({name!r}, os.O_RDONLY, dir_fd=fd), 100))")
    assert not res.ok and "a directory outside the temp dir" in res.reason


def test_socket_is_blocked():
    res = run_python("import socket\ns = socket.socket()\ns.connect(('1.1.1.1', 80))\nprint('connected')")
    assert not res.ok and res.reason == "blocked: socket.__new__"
    res = run_python("import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)", timeout_s=3)
    assert not res.ok


@pytest.mark.parametrize("path", ["/etc/passwd", "/proc/self/environ", os.path.expanduser("~/.bashrc")])
def test_reading_sensitive_files_is_blocked(path):
    res = run_python(f"print(open({path!r}).read())")
    assert not res.ok and res.reason.startswith("blocked: open")
    assert "root:" not in res.stdout


def test_caught_refusal_still_fails_and_listing_is_blocked():
    res = run_python("try:\n    open('/etc/passwd').read()\nexcept Exception:\n    pass\nprint('done')")
    assert not res.ok and res.returncode == 0 and res.reason.startswith("blocked: open /etc/passwd")
    res = run_python("import os\nprint(os.listdir('/root'))")
    assert not res.ok and res.reason.startswith("blocked: os.listdir")


@pytest.mark.parametrize("code", [
    # rebinding what a naive hook would call
    "import builtins, posixpath\nposixpath.realpath = lambda p, **k: '/tmp'\nbuiltins.any = lambda x: True\n"
    "builtins.isinstance = lambda *a: False\nprint(open('/etc/passwd').read())",
    # a fresh, unpatched copy of posix, or native code
    "import sys\ndel sys.modules['posix']\nimport posix\nposix.fork()",
    "import ctypes\nctypes.CDLL(None).fork()",
    # reaching the hook's state or another interpreter
    "import gc\nprint(len(gc.get_objects()))",
    "import sys\nsys.settrace(lambda *a: None)",
    # killing the caller, or lifting the limits
    "import os\nos.kill(os.getppid(), 9)",
    "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
])
def test_escape_attempts_fail(code):
    res = run_python(code)
    assert not res.ok
    assert "root:" not in res.stdout
    _check_unharmed()


def test_output_is_capped():
    res = run_python("while True:\n    print('x' * 1000)", timeout_s=1.0)
    assert not res.ok and res.reason == "timeout"
    assert OUTPUT_CAP <= len(res.stdout) < OUTPUT_CAP + 200 and "truncated" in res.stdout


def test_exit_codes_and_exceptions_are_reported():
    res = run_python("import sys\nsys.exit(3)")
    assert not res.ok and res.reason == "exit code 3" and res.returncode == 3
    res = run_python("raise ValueError('boom')")
    assert not res.ok and res.reason == "exit code 1" and "ValueError: boom" in res.stderr


def test_bad_limits_are_refused():
    with pytest.raises(ValueError):
        run_python("pass", timeout_s=0)
