"""A simulated multi-node cluster on one machine, for tests of what crosses nodes (root needed).

Each node is a Linux network namespace `megarl-sim-nI` with its own address (10.213.77.(10+I) on a
private bridge that lives in a separate "switch" namespace), its own hostname, /etc/hosts (every
node by name; its own name -> its own address, never 127.0.0.1), no DNS, and its own /dev/shm and
/tmp (tmpfs in the node's mount namespace), so code that wrongly assumes one host fails as it would
on a real cluster. Everything else (the project checkout, /var/tmp, /usr) is shared, like a
cluster's shared filesystem. A node is held open by one `sleep` process; `exec`/`popen` run a
command inside its namespaces with nsenter.

Optional on top: a Ray cluster (head on node 1, one worker per other node, token auth, logical GPUs
declared so GPU placement is exercised on CPU), and a real multi-node Slurm (Debian's packages:
one munged per node with a private /run/munge and the same key, slurmctld on node 1, one slurmd per
node that finds its NodeName from the node's hostname; a short credential lifetime and backfill
interval so a requeued job reruns within ~20 s instead of ~150 s).

The root namespace gets no link and no address; a blackhole route for the subnet makes a stray
connection from it fail at once instead of leaving the machine. `down` removes everything `up`
made (processes by netns census, namespaces, links, route, mounts, state directory) and verifies
it, even after a failed `up`. Only the subnet's own addresses are used, and `up` refuses a subnet
the machine already routes.

    python tools/simcluster.py up --nodes 3 --ray --gpus 4
    python tools/simcluster.py exec 2 hostname
    python tools/simcluster.py down

    with SimCluster(nodes=3, ray=True) as sim:
        sim.run(2, ["hostname"]).stdout
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PREFIX = "megarl-sim"
SUBNET = "10.213.77"                  # a /24: node I is .(10+I); nothing else of it is used
STATE = Path("/var/tmp/megarl-sim")   # shared by the nodes (not under /tmp: that is private per node)
MARKER = ".megarl-sim"                # `down` deletes STATE only if this file says it is ours
RAY_PORT = 6379
SHM_SIZE = "2g"

NODE_INIT = """set -e
hostname "$SIM_NAME"
mount -t tmpfs -o size={shm},mode=1777 {prefix}-shm /dev/shm
mount -t tmpfs -o mode=1777 {prefix}-tmp /tmp
mount --bind "$SIM_STATE/hosts" /etc/hosts
mount --bind "$SIM_STATE/resolv.conf" /etc/resolv.conf
if [ -d /run/munge ]; then mount -t tmpfs -o mode=0755 {prefix}-munge /run/munge; chown munge:munge /run/munge; fi
echo "$$" > "$SIM_STATE/nodes/$SIM_NAME.ready"
exec sleep infinity
"""

RAY_NODES_CHECK = """import time
import ray
ray.init()
n = 0
for _ in range(600):
    n = sum(x["Alive"] for x in ray.nodes())
    if n >= NODES:
        break
    time.sleep(0.2)
print(n)
"""


SLURM_CONF = """ClusterName=megarlsim
SlurmctldHost={head}({head_ip})
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# 22.05 holds a requeued job for the credential lifetime + 1 s (default 120 s), then waits for the
# next backfill pass (default 30 s): short values keep requeue tests short
AuthInfo=cred_expire=10
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
MpiDefault=none
ProctrackType=proctrack/cgroup
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd.%n.pid
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.%n.log
SlurmdTimeout=20
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
{nodes}
PartitionName=sim Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def _install_slurm() -> None:
    """Debian's slurmctld, slurmd, slurm-client and munge (once), the munge key, /run/munge."""
    if not all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurmctld", "slurmd",
                        "slurm-client", "munge"], env=env, check=True, capture_output=True)
    key = Path("/etc/munge/munge.key")
    if not key.exists() or not key.stat().st_size:
        key.write_bytes(secrets.token_bytes(1024))
    shutil.chown(key, "munge", "munge")
    key.chmod(0o600)
    for d, mode in (("/run/munge", 0o755), ("/var/lib/munge", 0o700), ("/var/log/munge", 0o700)):
        os.makedirs(d, exist_ok=True)
        shutil.chown(d, "munge", "munge")
        os.chmod(d, mode)


class SimError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _alive(pid: int) -> bool:
    """Exists and is not a zombie (this machine's pid 1 may be slow to reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop(pids: list[int], grace: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        if not any(_alive(p) for p in pids):
            return


class SimCluster:
    def __init__(self, nodes: int = 3, ray: bool = False, gpus: int = 0, cpus: int = 2, slurm: bool = False,
                 python: str = sys.executable, subnet: str = SUBNET, state: Path = STATE):
        self.nodes, self.ray, self.gpus, self.cpus, self.python = nodes, ray, gpus, cpus, python
        self.slurm = slurm
        self.subnet, self.state = subnet, Path(state)
        self.switch = f"{PREFIX}-sw"

    # ---- names --------------------------------------------------------------------------------
    def name(self, i: int) -> str:
        return f"{PREFIX}-n{i}"

    def ip(self, i: int) -> str:
        return f"{self.subnet}.{10 + i}"

    def holder(self, i: int) -> int:
        return int((self.state / "nodes" / f"{self.name(i)}.ready").read_text())

    # ---- running things on a node -------------------------------------------------------------
    def argv(self, i: int, argv: list[str], cwd: str | None = None) -> list[str]:
        """`argv` inside node i's namespaces (network, hostname, IPC, mounts), in `cwd` (default: the
        current directory, which is shared unless it is under the node's private /tmp)."""
        return ["nsenter", "-t", str(self.holder(i)), "-n", "-u", "-i", "-m", f"--wdns={cwd or os.getcwd()}",
                "--", *argv]

    def env(self) -> dict[str, str]:
        """What a process on a node needs to join the sim's Ray cluster."""
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        if self.ray:
            env.update(RAY_ADDRESS=f"{self.ip(1)}:{RAY_PORT}", RAY_AUTH_MODE="token",
                       RAY_AUTH_TOKEN_PATH=str(self.state / "ray_token"))
        if self.slurm:
            env["SLURM_CONF"] = str(self.state / "slurm" / "slurm.conf")
        return env

    def run(self, i: int, argv: list[str], timeout: float = 300, check: bool = True, cwd: str | None = None,
            **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env())
        return subprocess.run(self.argv(i, argv, cwd), capture_output=True, text=True, timeout=timeout, check=check,
                              **kw)

    def popen(self, i: int, argv: list[str], cwd: str | None = None, **kw) -> subprocess.Popen:
        kw.setdefault("env", self.env())
        return subprocess.Popen(self.argv(i, argv, cwd), **kw)

    def node_pids(self, i: int) -> list[int]:
        """Every process in node i's network namespace (a process cannot leave it: a complete census)."""
        out = _ip("netns", "pids", self.name(i), check=False).stdout.split()
        return [int(p) for p in out]

    # ---- faults -------------------------------------------------------------------------------
    def crash(self, i: int) -> None:
        """Every process on node i killed at once (its address stays: peers get connection resets),
        as when a node's processes crash or the OOM killer runs; the node itself stays up."""
        holder = self.holder(i)
        for pid in self.node_pids(i):
            if pid != holder:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def cut(self, i: int) -> None:
        """Node i's link to the switch goes down: its processes live on, but nothing reaches them and
        nothing they send arrives (no reset either: peers see silence, as in a network partition)."""
        _ip("-n", self.switch, "link", "set", f"{PREFIX}-v{i}", "down")

    def heal(self, i: int) -> None:
        """Node i's link comes back up (after `cut`)."""
        _ip("-n", self.switch, "link", "set", f"{PREFIX}-v{i}", "up")

    # ---- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> SimCluster:
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self, timeout: float = 180.0) -> None:
        if os.geteuid() != 0 or not shutil.which("nsenter") or not shutil.which("ip"):
            raise SimError("the simulated cluster needs root, nsenter and ip (iproute2)")
        if self.state.exists() or Path(f"/run/netns/{self.switch}").exists():
            raise SimError(f"a simulated cluster is already up (or was not torn down): {sys.argv[0]} down")
        try:
            if self.slurm:
                _install_slurm()  # before the nodes start: each mounts a private /run/munge
            self._network()
            for i in range(1, self.nodes + 1):
                self._node(i)
            self._wait_nodes(timeout)
            if self.ray:
                self._ray(timeout)
            if self.slurm:
                self._slurm(timeout)
        except BaseException:
            self.down()
            raise

    def _network(self) -> None:
        routed = _ip("route", "show", "root", f"{self.subnet}.0/24").stdout
        if routed.strip():
            raise SimError(f"{self.subnet}.0/24 is already routed on this machine ({routed.strip()}); pick another "
                           "subnet")
        (self.state / "nodes").mkdir(parents=True)
        (self.state / MARKER).touch()
        hosts = ["127.0.0.1 localhost"] + [f"{self.ip(i)} {self.name(i)}" for i in range(1, self.nodes + 1)]
        (self.state / "hosts").write_text("\n".join(hosts) + "\n")
        (self.state / "resolv.conf").write_text("# no nameserver: unknown names fail at once\noptions timeout:1\n")
        _ip("route", "add", "blackhole", f"{self.subnet}.0/24")
        (self.state / "created_route").touch()
        if not subprocess.run(["mountpoint", "-q", "/run/netns"]).returncode == 0:
            (self.state / "created_run_netns").touch()  # the first `ip netns add` mounts it; undo that later
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", f"{PREFIX}-br", "type", "bridge")
        _ip("-n", self.switch, "link", "set", f"{PREFIX}-br", "up")

    def _node(self, i: int) -> None:
        name, veth = self.name(i), f"{PREFIX}-v{i}"
        _ip("netns", "add", name)
        _ip("-n", self.switch, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
        _ip("-n", self.switch, "link", "set", veth, "master", f"{PREFIX}-br", "up")
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        # nsenter, not `ip netns exec`: that remounts /sys (hiding the cgroup mounts) and keeps the hostname
        log = open(self.state / "nodes" / f"{name}.log", "w")
        subprocess.Popen(["nsenter", f"--net=/run/netns/{name}", "--", "unshare", "--uts", "--ipc", "--mount",
                          "--propagation", "private", "--", "sh", "-c",
                          NODE_INIT.format(shm=SHM_SIZE, prefix=PREFIX)],
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SIM_NAME": name,
                              "SIM_STATE": str(self.state)},
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)

    def _wait_nodes(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for i in range(1, self.nodes + 1):
            ready = self.state / "nodes" / f"{self.name(i)}.ready"
            while not (ready.exists() and ready.read_text().strip()):
                if time.monotonic() > deadline:
                    log = (self.state / "nodes" / f"{self.name(i)}.log").read_text()
                    raise SimError(f"node {i} did not come up: {log}")
                time.sleep(0.05)

    def _ray(self, timeout: float) -> None:
        token = self.state / "ray_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        for i in range(1, self.nodes + 1):
            self._start_ray_node(i)
            if i == 1:
                time.sleep(2.0)  # the head's GCS first; workers retry anyway
        self._wait_ray(timeout)

    def _start_ray_node(self, i: int) -> None:
        env = {k: v for k, v in self.env().items() if k != "RAY_ADDRESS"}
        role = (["--head", f"--port={RAY_PORT}", "--include-dashboard=false"] if i == 1
                else [f"--address={self.ip(1)}:{RAY_PORT}"])
        log = open(self.state / "nodes" / f"{self.name(i)}.ray.log", "a")
        proc = self.popen(i, [self.python, "-m", "ray.scripts.scripts", "start", "--block", *role,
                              f"--node-ip-address={self.ip(i)}", f"--num-cpus={self.cpus}", f"--num-gpus={self.gpus}",
                              "--object-store-memory=300000000", "--disable-usage-stats"],
                          env=env, stdout=log, stderr=log, cwd=str(self.state), start_new_session=True)
        pids_file = self.state / "ray_pids"
        pids = json.loads(pids_file.read_text()) if pids_file.exists() else []
        pids_file.write_text(json.dumps(pids + [proc.pid]))

    def _wait_ray(self, timeout: float) -> None:
        check = RAY_NODES_CHECK.replace("NODES", str(self.nodes))
        out = self.run(1, [self.python, "-c", check], timeout=timeout, cwd=str(self.state))
        if int(out.stdout.split()[-1]) < self.nodes:
            logs = "\n".join(f"--- {p.name}:\n" + "\n".join(p.read_text().splitlines()[-15:])
                             for p in sorted((self.state / "nodes").glob("*.ray.log")))
            raise SimError(f"Ray came up with {out.stdout.split()[-1]} of {self.nodes} nodes\n{logs}")

    def restart_ray_node(self, i: int, timeout: float = 180.0) -> None:
        """Node i (not the head) joins the Ray cluster again, e.g. after `crash(i)`."""
        self._start_ray_node(i)
        self._wait_ray(timeout)

    def _slurm(self, timeout: float) -> None:
        d = self.state / "slurm"
        for sub in ("state", "log", "run", *(f"spool/{self.name(i)}" for i in range(1, self.nodes + 1))):
            (d / sub).mkdir(parents=True, exist_ok=True)
        nodes = "\n".join(f"NodeName={self.name(i)} NodeAddr={self.ip(i)} CPUs={self.cpus} RealMemory=4096 "
                          "State=UNKNOWN" for i in range(1, self.nodes + 1))
        (d / "slurm.conf").write_text(SLURM_CONF.format(head=self.name(1), head_ip=self.ip(1), d=d, nodes=nodes))
        (d / "cgroup.conf").write_text("CgroupPlugin=autodetect\nConstrainCores=no\nConstrainRAMSpace=no\n"
                                       "ConstrainDevices=no\n")
        for i in range(1, self.nodes + 1):
            self.run(i, ["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--seed-file=/run/munge/munged.seed",
                         "--log-file=/run/munge/munged.log"])
        self.run(1, ["slurmctld"], cwd=str(self.state))
        for i in range(1, self.nodes + 1):
            self.run(i, ["slurmd"], cwd=str(self.state))
        deadline = time.monotonic() + timeout
        while True:
            states = self.run(1, ["sinfo", "-h", "-N", "-o", "%t"], check=False).stdout.split()
            if states == ["idle"] * self.nodes:
                return
            if time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-1500:] for p in sorted((d / "log").glob("*.log")))
                raise SimError(f"Slurm nodes not idle: {states}\n{logs}")
            time.sleep(0.2)

    def _stop_slurm(self) -> None:
        d = self.state / "slurm"
        if not d.exists():
            return
        if Path(f"/run/netns/{self.name(1)}").exists() and (self.state / "nodes" / f"{self.name(1)}.ready").exists():
            env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf")}
            self.run(1, ["scancel", "--user=root"], env=env, check=False, timeout=60)  # slurmctld is on the sim net
        pids = [int(p.read_text()) for p in (d / "run").glob("*.pid") if p.read_text().strip().isdigit()]
        _stop(pids, grace=10)
        for i in range(1, self.nodes + 1):  # slurmd's per-node cgroup roots (proctrack/cgroup)
            for root in Path("/sys/fs/cgroup").glob(f"*/slurm_{self.name(i)}"):
                for sub in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
                    if sub.is_dir():
                        sub.rmdir()
                root.rmdir()

    def down(self) -> None:
        """Everything `up` made, removed and checked; safe to call twice and after a failed `up`."""
        self._stop_slurm()
        pids_file = self.state / "ray_pids"
        if pids_file.exists():
            _stop(json.loads(pids_file.read_text()), grace=15)
        nodes = [n for n in _ip("netns", "list", check=False).stdout.split() if n.startswith(f"{PREFIX}-n")]
        for name in nodes:
            pids = [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split()]
            _stop(pids, grace=5)
            _ip("netns", "del", name, check=False)
        if Path(f"/run/netns/{self.switch}").exists():
            _ip("netns", "del", self.switch, check=False)
        if (self.state / "created_route").exists():
            _ip("route", "del", "blackhole", f"{self.subnet}.0/24", check=False)
        if (self.state / "created_run_netns").exists() and not os.listdir("/run/netns"):
            subprocess.run(["umount", "/run/netns"], capture_output=True)
        if (self.state / MARKER).exists():
            shutil.rmtree(self.state)
        left = self.leftovers()
        if left:
            raise SimError("simulated cluster not fully removed: " + "; ".join(left))

    def leftovers(self) -> list[str]:
        """Anything of the sim still on the machine (empty when clean)."""
        found = [f"netns {n}" for n in _ip("netns", "list", check=False).stdout.split() if n.startswith(PREFIX)]
        found += [f"link {line.split()[1]}" for line in _ip("-o", "link", check=False).stdout.splitlines()
                  if PREFIX in line]
        found += [f"route {r}" for r in _ip("route", "show", "root", f"{self.subnet}.0/24", check=False)
                  .stdout.splitlines() if r.strip()]
        with open("/proc/self/mountinfo") as f:
            found += [f"mount {line.split()[4]}" for line in f if PREFIX in line]
        found += [f"cgroup {p}" for p in Path("/sys/fs/cgroup").glob(f"*/slurm_{PREFIX}-n*")]
        if self.state.exists():
            found.append(f"directory {self.state}")
        return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--ray", action="store_true")
    up.add_argument("--gpus", type=int, default=0, help="logical GPUs per node declared to Ray")
    up.add_argument("--slurm", action="store_true", help="a multi-node Slurm too (Debian packages)")
    sub.add_parser("down")
    ex = sub.add_parser("exec")
    ex.add_argument("node", type=int)
    ex.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.cmd == "up":
        SimCluster(args.nodes, args.ray, args.gpus, slurm=args.slurm).up()
        print(f"up: {args.nodes} node(s), {SUBNET}.11-{SUBNET}.{10 + args.nodes}" + (" with Ray" if args.ray else "")
              + (" with Slurm" if args.slurm else ""))
        return 0
    if args.cmd == "down":
        SimCluster(slurm=True).down()
        print("down: nothing left")
        return 0
    sim = SimCluster(ray=(STATE / "ray_token").exists(), slurm=(STATE / "slurm").exists())
    return subprocess.call(sim.argv(args.node, args.command), env=sim.env())


if __name__ == "__main__":
    sys.exit(main())
