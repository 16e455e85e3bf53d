"""Run untrusted Python (model-written code for rewards) in an isolated child process.

`run_python(code, timeout_s=5.0, memory_mb=512, stdin=None) -> SandboxResult`. Layers, outermost first:
1. `unshare --net --pid --fork --kill-child` when the kernel allows it (probed once): no network interfaces, and
   the child is pid 1 of its own pid namespace, so killing it takes every descendant with it (fork bombs).
2. rlimits set in `preexec_fn`: CPU seconds, address space (memory), file size, open files, no core dumps, and
   RLIMIT_NPROC for non-root users (the kernel ignores NPROC for root, hence layers 1 and 4).
3. A fresh temp working directory (deleted afterwards), a minimal environment, `python -I -B`, its own session
   so a wall-clock timeout kills the whole process group.
4. A prelude that runs before the user's code and installs an audit hook (PEP 578; it cannot be removed): no
   fork/exec/spawn/kill, no sockets, no ctypes, no rlimit changes, no chdir or symlinks, no writes outside the
   temp dir, and reads only of files in the temp dir and the Python installation (so /etc, /root, /home, /proc
   stay closed while the stdlib still imports). A refused operation raises PermissionError in the child and is
   reported as `reason` "blocked: ..." even if the user's code catches the exception.
Outputs are capped (head and tail of each stream kept) so a print loop cannot exhaust the caller's memory.
This is defence in depth for RL rewards on a trusted machine, not a boundary against a determined attacker:
layer 4 is Python-level (a path object whose __fspath__ answers differently on each call, raced from a thread,
could slip past it), and without unshare a root caller gets no network or pid isolation. The first call probes
unshare (~0.1 s); each run then costs one interpreter start (~50 ms).
"""
from __future__ import annotations

import functools
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

OUTPUT_CAP = 64 * 1024              # bytes kept per stream (half head, half tail)
FILE_SIZE_LIMIT = 16 * 1024 * 1024  # largest file the child may write
OPEN_FILES_LIMIT = 64
BLOCK_MARK = "nanoseek-sandbox blocked: "


@dataclass
class SandboxResult:
    ok: bool            # exited 0 within the time limit and nothing was blocked
    stdout: str
    stderr: str
    reason: str         # "" when ok; else "timeout", "memory", "exit code N", "signal N", "blocked: ..."
    returncode: int | None  # None when killed for the wall-clock timeout


# The prelude runs inside the child as `python -I -B -c PRELUDE TMPDIR`; the user's code is TMPDIR/main.py.
# Everything the hook uses is captured in its closure before user code runs: user code can rebind module
# globals, builtins and stdlib functions (posixpath.realpath), but cannot reach a closure without the hook
# object, which no API hands out (gc introspection, settrace and setprofile are refused).
_PRELUDE = r'''
import os, posix, sys, _posixsubprocess
sys.dont_write_bytecode = True

def _install(tmp):
    # The one spawn path without an audit event of its own; drop every reference to it.
    fork_exec = _posixsubprocess.fork_exec
    for mod in list(sys.modules.values()):
        for key, val in list(getattr(mod, "__dict__", {}).items()):
            if val is fork_exec:
                delattr(mod, key)
    del fork_exec
    isinstance_, len_, str_, bytes_, int_ = isinstance, len, str, bytes, int
    to_str, decode = str.__str__, bytes.decode  # exact str even from a str subclass with tricks
    fspath, lstat, readlink, getcwd, write = posix.fspath, posix.lstat, posix.readlink, posix.getcwd, posix.write
    pathlike = os.PathLike
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    deny = ("/etc", "/proc", "/sys", "/dev", "/root", "/home", "/var", "/run", "/boot", "/srv", "/mnt", "/media")
    read_roots = [tmp, "/usr", "/lib", "/lib64", "/dev/null", "/dev/zero", "/dev/urandom"]
    for p in [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path]:
        p = os.path.realpath(p) if p else ""
        if p and p != "/" and p not in deny:
            read_roots.append(p)
    read_roots, write_roots = tuple(read_roots), (tmp, "/dev/null")
    denied_events = frozenset({
        "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile",
        "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function", "ctypes.cdata", "ctypes.addressof",
        "socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.gethostbyname",
        "socket.gethostbyname_ex", "socket.gethostbyaddr", "socket.sethostname",
        "resource.setrlimit", "resource.prlimit", "os.chroot", "sys.settrace", "sys.setprofile",
        # With the cwd pinned to the temp dir, no symlinks and no directory fds from outside it, a path checked
        # relative to the cwd cannot mean something else to a dir_fd call (the "open" event omits dir_fd).
        "os.chdir", "os.symlink",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "cpython.PyInterpreterState_New"})
    # Fresh copies of these would come back unpatched or give native access; subinterpreters lack this hook.
    denied_imports = frozenset({"ctypes", "_ctypes", "posix", "os", "_posixsubprocess", "_xxsubinterpreters",
                                "_xxinterpchannels", "_interpreters"})
    mutating = frozenset({"os.mkdir", "os.remove", "os.rmdir", "os.rename", "os.replace", "os.link",
                          "os.truncate", "os.chmod", "os.chown", "os.utime", "os.mknod", "os.mkfifo",
                          "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags"})
    with_dir_fd = frozenset({"os.mkdir", "os.remove", "os.rmdir", "os.chmod", "os.chown", "os.utime", "os.mknod",
                             "os.mkfifo", "os.rename", "os.replace", "os.link"})
    reading = frozenset({"os.listdir", "os.scandir", "glob.glob", "os.listxattr", "os.getxattr"})

    def resolve(path, dir_fd=-1):
        """realpath from captured primitives only; audit events pass dir_fd=-1 when none was given."""
        path = fspath(path)
        path = decode(path, "utf-8", "surrogateescape") if isinstance_(path, bytes_) else to_str(path)
        if not path.startswith("/"):
            base = readlink("/proc/self/fd/%d" % dir_fd) if dir_fd >= 0 else getcwd()
            path = base + "/" + path
        todo, done, hops = path.split("/")[::-1], "", 0
        while todo:
            name = todo.pop()
            if name in ("", "."):
                continue
            if name == "..":
                done = done.rpartition("/")[0]
                continue
            cand = done + "/" + name
            try:
                is_link = (lstat(cand).st_mode & 0o170000) == 0o120000
            except OSError:
                is_link = False
            if is_link and hops < 40:
                hops += 1
                target = readlink(cand)
                done = "" if target.startswith("/") else done
                todo.extend(target.split("/")[::-1])
            else:
                done = cand
        return done or "/"

    def is_dir(path):
        try:
            return (lstat(path).st_mode & 0o170000) == 0o040000
        except OSError:
            return False

    def inside(path, roots):
        for r in roots:
            if path == r or path.startswith(r + "/"):
                return True
        return False

    def refuse(what):
        write(2, ("\n@BLOCK_MARK@" + what + "\n").encode("utf-8", "replace"))
        raise PermissionError("blocked: " + what)

    def is_path(p):
        return p is not None and not isinstance_(p, int_)

    def hook(event, args):
        if event in denied_events:
            refuse(event)
        elif event == "import":
            # ImportError, unreported: libraries that probe optional imports (numpy tries ctypes) keep working.
            if args[0] in denied_imports:
                raise ImportError("blocked: import " + args[0])
        elif event == "open":
            path, mode, flags = args
            if is_path(path):
                writing = (mode is not None and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)) \
                    or (flags & write_flags) != 0
                real = resolve(path)
                if not inside(real, write_roots if writing else read_roots):
                    refuse("open %s for %s" % (real, "writing" if writing else "reading"))
                if not inside(real, write_roots) and is_dir(real):
                    refuse("open %s (a directory outside the temp dir)" % real)
        elif event in reading:
            if len_(args) and is_path(args[0]) and not inside(resolve(args[0]), read_roots):
                refuse("%s %s" % (event, resolve(args[0])))
        elif event in mutating:
            # Path arguments come first; a trailing int is the dir_fd (-1 for none) except where noted.
            paths = args[:2] if event in ("os.rename", "os.replace", "os.link") else args[:1]
            dir_fd = args[-1] if event in with_dir_fd and isinstance_(args[-1], int_) else -1
            for p in paths:
                if isinstance_(p, (str_, bytes_, pathlike)) and not inside(resolve(p, dir_fd), write_roots):
                    refuse("%s %s" % (event, resolve(p, dir_fd)))

    sys.addaudithook(hook)

_tmp = os.path.realpath(sys.argv[1])
sys.argv = ["main.py"]
os.chdir(_tmp)
with open("main.py", encoding="utf-8") as _f:
    _code = compile(_f.read(), "main.py", "exec")
_install(_tmp)
del _install, _f, _tmp
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__, "__file__": "main.py"})
'''.replace("@BLOCK_MARK@", BLOCK_MARK)


@functools.lru_cache(maxsize=1)
def _isolation_prefix() -> tuple[str, ...]:
    """The strongest `unshare` wrapper this kernel allows us (probed once); () when none works."""
    if shutil.which("unshare") is None:
        return ()
    user_ns = () if os.geteuid() == 0 else ("--user", "--map-root-user")  # non-root needs a user namespace
    for extra in (("--pid", "--fork", "--kill-child"), ()):
        prefix = ("unshare", *user_ns, "--net", *extra)
        try:
            probe = subprocess.run([*prefix, sys.executable, "-I", "-c", "pass"], capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


def _user_task_count() -> int:
    """Processes+threads owned by our real uid: RLIMIT_NPROC counts them all, so the limit must sit above it."""
    uid, n = os.getuid(), 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    n += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                continue
    return n


def _limits(timeout_s: float, memory_mb: int) -> list[tuple[int, int, int]]:
    cpu = max(1, math.ceil(timeout_s))
    limits = [(resource.RLIMIT_CPU, cpu, cpu + 1),  # soft: SIGXCPU; hard: SIGKILL (pid-namespace init ignores XCPU)
              (resource.RLIMIT_AS, memory_mb * 2**20, memory_mb * 2**20),
              (resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT, FILE_SIZE_LIMIT),
              (resource.RLIMIT_NOFILE, OPEN_FILES_LIMIT, OPEN_FILES_LIMIT),
              (resource.RLIMIT_CORE, 0, 0)]
    if os.geteuid() != 0:  # the kernel does not enforce NPROC for root
        nproc = _user_task_count() + 32
        hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        nproc = nproc if hard == resource.RLIM_INFINITY else min(nproc, hard)
        limits.append((resource.RLIMIT_NPROC, nproc, nproc))
    return limits


class _Drain(threading.Thread):
    """Reads a pipe to EOF keeping only the first and last OUTPUT_CAP/2 bytes, so the child never blocks on a
    full pipe and a flood of output costs us no memory."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.head, self.tail, self.dropped = pipe, bytearray(), bytearray(), 0
        self.blocked: str | None = None
        self._carry = b""

    def run(self):
        half, mark = OUTPUT_CAP // 2, BLOCK_MARK.encode()
        while chunk := self.pipe.read1(65536):
            scan = self._carry + chunk
            if self.blocked is None and (i := scan.find(mark)) >= 0:
                line = scan[i + len(mark):].split(b"\n", 1)[0]
                self.blocked = line.decode("utf-8", "replace")[:200]
            self._carry = scan[-(len(mark) + 200):]
            room = max(0, half - len(self.head))
            self.head += chunk[:room]
            self.tail += chunk[room:]
            if len(self.tail) > half:
                self.dropped += len(self.tail) - half
                del self.tail[:-half]

    def text(self) -> str:
        gap = f"\n... [{self.dropped} bytes truncated] ...\n".encode() if self.dropped else b""
        return bytes(self.head + gap + self.tail).decode("utf-8", "replace")


def run_python(code: str, timeout_s: float = 5.0, memory_mb: int = 512, stdin: str | bytes | None = None
               ) -> SandboxResult:
    """Run `code` as a script in a fresh isolated interpreter; never raises for anything the code does."""
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s and memory_mb must be positive, got {timeout_s} and {memory_mb}")
    tmp = tempfile.mkdtemp(prefix="nanoseek-sandbox-")
    try:
        with open(os.path.join(tmp, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        stdin_path = os.path.join(tmp, ".stdin")
        with open(stdin_path, "wb") as f:  # a file, not a pipe: no writer thread, no deadlock on unread input
            f.write(stdin.encode() if isinstance(stdin, str) else (stdin or b""))
        limits = _limits(timeout_s, memory_mb)

        def set_limits():  # runs in the forked child before exec: only async-signal-safe-ish setrlimit calls
            for res, soft, hard in limits:
                resource.setrlimit(res, (soft, hard))

        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp,
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        cmd = [*_isolation_prefix(), sys.executable, "-I", "-B", "-c", _PRELUDE, tmp]
        with open(stdin_path, "rb") as fin:
            proc = subprocess.Popen(cmd, stdin=fin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp,
                                    env=env, preexec_fn=set_limits, start_new_session=True, close_fds=True)
        os.unlink(stdin_path)  # the child holds it open; the user's code should see a clean directory
        out, err = _Drain(proc.stdout), _Drain(proc.stderr)
        out.start()
        err.start()
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            returncode = None
        _kill_group(proc)  # also reaps anything the child left behind in its group
        out.join(timeout=2.0)
        err.join(timeout=2.0)
        proc.stdout.close()
        proc.stderr.close()
        stdout, stderr = out.text(), err.text()
        reason = _reason(returncode, stderr, err.blocked)
        return SandboxResult(ok=reason == "", stdout=stdout, stderr=stderr, reason=reason, returncode=returncode)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _reason(returncode: int | None, stderr: str, blocked: str | None) -> str:
    if blocked is not None:  # first: code that catches the refusal and then spins should say why
        return "blocked: " + blocked
    if returncode is None or returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"  # wall clock, or the CPU rlimit (soft: SIGXCPU, hard: SIGKILL)
    if "MemoryError" in stderr:
        return "memory"
    if returncode < 0:
        return f"signal {-returncode}"
    return "" if returncode == 0 else f"exit code {returncode}"
