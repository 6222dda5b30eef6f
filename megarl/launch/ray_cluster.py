"""A Ray cluster for one job, started and stopped by the PIDs this launcher owns.

Head on the first node, one worker per other node, each a `ray start --block` process: under Slurm
inside its own job step (`srun --overlap --nodes=1 --ntasks=1 -w NODE`, so it runs beside the
batch step and the job's other steps instead of waiting for their CPUs), locally as a plain child
process. Teardown sends SIGTERM to exactly those processes (an `srun` step forwards it to its
task), workers first and the head last, SIGKILL after a grace period. Never `ray stop`: it finds
Ray processes host-wide by name (other jobs' too) and does not end `ray start --block`.

Ports are bound, then published: the head starts with `--port=0` (`megarl.launch.ray_node`), its GCS
binds the kernel's choice and the head writes its address to `<log_dir>/ray_head_address.json`;
the workers are started with that address. The Ray Client server is not started at all.

Each node logs to `<log_dir>/ray_<role>_<node>.log`; Ray's own files go to a short per-job temp
dir (`/tmp/megarl_ray_<job>`; unix socket paths are limited to 107 bytes).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

from megarl.launch.nodes import LaunchError, NodeMap


def extra_srun_args() -> list[str]:
    """MEGARL_SRUN_ARGS: site flags for every job step (e.g. pyxis --container-image=...)."""
    return shlex.split(os.environ.get("MEGARL_SRUN_ARGS", ""))


HEAD_ADDRESS_FILE = "ray_head_address.json"   # in the log dir: the head's address, published by the head
UNPUBLISHED = "<the address the head publishes>"


class RayCluster:
    def __init__(self, nodes: NodeMap, log_dir: str, port: int = 0, cpus_per_node: int | None = None):
        self.nodes, self.log_dir = nodes, log_dir
        # port 0: the head's GCS binds the kernel's choice and publishes it (`megarl.launch.ray_node`);
        # a fixed port (`launch --ray-port`) only where a site's firewall wants one
        self.port = port or 0
        self.cpus = cpus_per_node or nodes.cpus_per_node
        self.tag = nodes.job_id or f"local{os.getpid()}"
        self.temp_dir = f"/tmp/megarl_ray_{self.tag}"
        self.address_file = os.path.join(log_dir, HEAD_ADDRESS_FILE)
        self.address = UNPUBLISHED     # known once the head is up (start)
        self.procs: list[tuple[str, subprocess.Popen, str]] = []   # (what, process, log path)

    # ---- commands --------------------------------------------------------------------------------
    def _ray_start(self, head: bool) -> list[str]:
        cmd = [sys.executable, "-m", "megarl.launch.ray_node"]
        if head:
            cmd += ["--publish", os.path.abspath(self.address_file)]
        cmd += ["--block", f"--num-cpus={self.cpus}", f"--num-gpus={self.nodes.gpus_per_node}"]
        if head:
            cmd += ["--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}", "--include-dashboard=false"]
        else:
            cmd += [f"--address={self.address}"]
        return cmd

    def _on_node(self, node: str, cmd: list[str]) -> list[str]:
        if not self.nodes.slurm:
            return cmd
        return ["srun", "--overlap", "--nodes=1", "--ntasks=1", "-w", node, "--kill-on-bad-exit=0",
                *extra_srun_args(), *cmd]

    def head_command(self) -> tuple[str, list[str]]:
        return f"head {self.nodes.head}", self._on_node(self.nodes.head, self._ray_start(True))

    def worker_commands(self) -> list[tuple[str, list[str]]]:
        """(what, argv) of every worker; they join at `self.address` (published by the head)."""
        return [(f"worker {n}", self._on_node(n, self._ray_start(False))) for n in self.nodes.workers]

    def commands(self) -> list[tuple[str, list[str]]]:
        """(what, argv) for the head and every worker, in start order."""
        return [self.head_command(), *self.worker_commands()]

    def render(self) -> str:
        return "\n".join(f"  {what}: {shlex.join(cmd)}" for what, cmd in self.commands())

    # ---- lifecycle -------------------------------------------------------------------------------
    def auth_env(self) -> dict[str, str]:
        """Token authentication with a fresh per-job token (mode 0600 in the log dir): the head,
        the workers, the launcher's readiness check and the driver all present it; nobody else
        on the network can use the cluster."""
        import secrets

        path = os.path.join(self.log_dir, "ray_auth_token")
        if not os.path.exists(path):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": os.path.abspath(path)}

    def client_env(self) -> dict[str, str]:
        """What a driver needs to join: the address and the token."""
        return {"RAY_ADDRESS": self.address, **self.auth_env()}

    def start(self, timeout: float = 300.0) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **self.auth_env()}
        deadline = time.monotonic() + timeout
        if os.path.exists(self.address_file):  # an earlier attempt's (requeue): the new head publishes anew
            os.remove(self.address_file)
        self._spawn(*self.head_command(), env)
        self.address = self._wait_for_head(deadline)
        for what, cmd in self.worker_commands():
            self._spawn(what, cmd, env)
        self.wait_for_resources(deadline)

    def _spawn(self, what: str, cmd: list[str], env: dict) -> None:
        log = os.path.join(self.log_dir, f"ray_{what.replace(' ', '_')}.log")
        with open(log, "ab") as f:
            # a new session: the terminal's Ctrl-C goes to the launcher, which stops these in order
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append((what, proc, log))

    def _check_alive(self) -> None:
        for what, proc, log in self.procs:
            if proc.poll() is not None:
                raise LaunchError(f"ray {what} exited with code {proc.returncode} while starting; its log "
                                  f"({log}) ends with:\n{_tail(log)}")

    def _wait_for_head(self, deadline: float) -> str:
        """The head's address once it has published it (its GCS is listening by then)."""
        from megarl.runtime.rendezvous import read_address

        while not os.path.exists(self.address_file):
            self._check_alive()
            if time.monotonic() > deadline:
                raise LaunchError(f"the Ray head did not publish its address ({self.address_file}) in time; "
                                  f"log: {self.procs[0][2]}")
            time.sleep(0.25)
        host, port = read_address(self.address_file)   # published: the loop above saw the file
        return f"{host}:{port}"

    def wait_for_resources(self, deadline: float) -> dict:
        """Block until every node has joined with its CPUs and GPUs; a clear error at the deadline
        or as soon as one of our Ray processes dies. The check runs in a child process (ray.init
        cannot be interrupted), polled here together with the node processes."""
        import json

        want = {"nodes": len(self.nodes.nodes), "CPU": self.cpus * len(self.nodes.nodes), "GPU": self.nodes.total_gpus}
        seconds = str(max(1.0, deadline - time.monotonic()))
        checker = subprocess.Popen([sys.executable, "-c", _READY_CHECK, json.dumps(want), seconds],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, **self.client_env(), "RAY_USAGE_STATS_ENABLED": "0"})
        try:
            while checker.poll() is None:
                self._check_alive()
                time.sleep(0.5)
        finally:
            if checker.poll() is None:
                checker.kill()
        out, err = checker.communicate()
        # The answer is the marked line: a Ray driver's stdout also carries messages the GCS pushes
        # to every driver (e.g. "raylet has lagging heartbeats" on a busy node), before or after it.
        marked = [line for line in out.splitlines() if line.startswith(_READY_MARK)]
        result = json.loads(marked[-1][len(_READY_MARK):]) if marked else {}
        if checker.returncode == 0 and result.get("ready"):
            return result["resources"]
        seen = result.get("seen")
        raise LaunchError(
            (f"Ray at {self.address} shows {seen} after the start timeout, want {want}; " if seen else
             f"could not join Ray at {self.address}: {err.strip().splitlines()[-1] if err.strip() else 'no answer'}; ")
            + f"node logs are in {self.log_dir} (a worker that cannot reach the head, or GPUs Slurm did not give "
            "the job, look like this)")

    def pids(self) -> list[int]:
        return [p.pid for _, p, _ in self.procs]

    def stop(self, grace: float = 30.0) -> list[str]:
        """SIGTERM each started process (workers first, head last), SIGKILL after `grace` seconds.
        Returns what had to be killed."""
        killed = []
        for what, proc, _ in reversed(self.procs):
            if proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                killed.append(what)
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the whole process group
                proc.wait(timeout=grace)
        self.procs.clear()
        return killed


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


_READY_MARK = "MEGARL_RAY_READY "
# run as `python -c _READY_CHECK WANT_JSON SECONDS`: prints _READY_MARK + {"ready", "resources"|"seen"}
_READY_CHECK = f"""
import json, sys, time
import ray
want, deadline = json.loads(sys.argv[1]), time.monotonic() + float(sys.argv[2])
ray.init(log_to_driver=False, logging_level="ERROR", configure_logging=False)
while True:
    alive = [n for n in ray.nodes() if n.get("Alive")]
    res = ray.cluster_resources()
    seen = {{"nodes": len(alive), "CPU": res.get("CPU", 0.0), "GPU": res.get("GPU", 0.0)}}
    if all(seen[k] >= want[k] for k in want):
        print("{_READY_MARK}" + json.dumps({{"ready": True, "resources": res}}))
        break
    if time.monotonic() > deadline:
        print("{_READY_MARK}" + json.dumps({{"ready": False, "seen": seen}}))
        sys.exit(1)
    time.sleep(0.5)
"""
