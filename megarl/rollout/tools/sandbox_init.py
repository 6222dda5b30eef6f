"""The first process inside a tool sandbox (pid 1 of its own pid namespace when that layer is on).

Run by `sandbox.py` as `unshare [flags] python -I -S sandbox_init.py CONFIG_JSON` with fd CONFIG["report_fd"]
open for one JSON line: {"layers": [...]} once set up, or {"error": "..."} before exiting 121. It
imports only the standard library: it runs under the base interpreter, outside the project's
environment, and the project is not mounted in the root it builds.

What it does, in order:
1. mount layer: a new root on tmpfs holding read-only bind mounts of the system and the Python
   prefix (nosuid, nodev), /dev/{null,zero,random,urandom}, a fresh /proc, and a size-capped tmpfs
   /tmp that is the only writable place; then pivot_root into it and detach the old root, so
   nothing else of the host (the project, /etc, /root, /home) is reachable;
2. forks the tool program, which drops to an unprivileged uid with no supplementary groups and
   no_new_privs (user layer), sets its rlimits and execs Python on /tmp/main.py;
3. as pid 1, reaps every orphan until the tool program exits, then exits with its status; the kernel
   then kills whatever else is left in the pid namespace, so nothing outlives the call.
"""

import ctypes
import json
import os
import platform
import resource
import shutil
import signal
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}  # glibc has no wrapper for pivot_root
EXIT_SETUP_FAILED = 121
DEVICES = ("null", "zero", "random", "urandom")

libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                      ctypes.c_ulong(flags), data.encode() if data else None), f"mount {target}")


def bind_readonly(path: str, root: str) -> None:
    """`path` of the host at the same place under `root`, read-only; symlinks (merged /usr: /bin ->
    usr/bin) are copied as symlinks."""
    target = root + path
    if os.path.islink(path):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.lexists(target):
            os.symlink(os.readlink(path), target)
        return
    if not os.path.exists(path):
        return
    if os.path.isdir(path):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    mount(path, target, None, MS_BIND | MS_REC)
    mount("none", target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_REC)


def build_root(cfg: dict) -> None:
    """Steps 1: the private root; afterwards "/" is the new root and /tmp holds main.py."""
    root = cfg["root"]
    mount("none", "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    os.makedirs(root, exist_ok=True)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for path in cfg["readonly"]:
        bind_readonly(path, root)
    os.makedirs(root + "/dev")
    for name in DEVICES:
        bind_readonly("/dev/" + name, root)
    os.makedirs(root + "/proc")
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs(root + "/tmp")
    mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['tmp_mb']}m,mode=1777")
    shutil.copy(cfg["script"], root + "/tmp/main.py")
    os.chmod(root + "/tmp/main.py", 0o644)
    old = root + "/.old_root"
    os.makedirs(old)
    _check(libc.syscall(SYS_PIVOT_ROOT[platform.machine()], root.encode(), old.encode()), "pivot_root")
    os.chdir("/")
    _check(libc.umount2(b"/.old_root", MNT_DETACH), "umount old root")
    os.rmdir("/.old_root")
    mount("none", "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def drop_privileges(uid: int | None) -> None:
    """Step 2 (in the tool program): an unprivileged uid/gid that owns nothing on the host, no
    supplementary groups; no_new_privs so no setuid binary can give privileges back."""
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def set_limits(limits: dict) -> None:
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def run_tool(cfg: dict) -> None:
    """The forked child: becomes the tool program (never returns)."""
    try:
        drop_privileges(cfg["uid"])
        set_limits(cfg["rlimits"])
        os.chdir(cfg["workdir"])
        env = {"PATH": "/usr/bin:/bin", "HOME": cfg["workdir"], "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
        os.execve(cfg["python"], [cfg["python"], "-I", "-S", cfg["workdir"] + "/main.py"], env)
    except BaseException as e:  # noqa: BLE001 - reported to the caller as a setup failure
        os.write(2, f"megarl-sandbox: could not start the tool program: {e}\n".encode())
        os._exit(EXIT_SETUP_FAILED)


def wait_for(child: int) -> int:
    """Step 3: reap everything until `child` exits; its exit code (128 + signal when killed)."""
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def main() -> int:
    cfg = json.loads(sys.argv[1])
    report = os.fdopen(cfg["report_fd"], "w")
    try:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the caller killed -> the sandbox goes too
        for procs in cfg["cgroup_procs"]:  # before anything is started: all of it is counted
            with open(procs, "w") as f:
                f.write("0")
        if "mount" in cfg["layers"]:
            build_root(cfg)
    except OSError as e:
        report.write(json.dumps({"error": f"setting up the sandbox: {e}"}) + "\n")
        return EXIT_SETUP_FAILED
    report.write(json.dumps({"layers": cfg["layers"]}) + "\n")
    report.close()
    child = os.fork()
    if child == 0:
        run_tool(cfg)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGKILL))
    return wait_for(child)


if __name__ == "__main__":
    sys.exit(main())
