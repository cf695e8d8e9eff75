"""The fleet lab: test hosts with their own addresses on this machine, reached over real SSH.

Each host is a Linux network namespace joined to one bridge, with an address in 198.18.0.0/24
(a range set aside for benchmarking networks) and nothing else: no default route, so traffic
from a lab host can only reach the other lab hosts and the bridge's own address on this machine
(198.18.0.1, where the orchestrator sits). Every host runs Debian's OpenSSH server with its own
host key; one client key pair per lab logs in as root. Roles:

- `docker`: a dockerd of its own inside the namespace; its socket is what `docker_socket` in
  the host's stack entry names, reached through SSH (never directly by the tests).
- `systemd`: systemd as PID 1 in a container (image built with debootstrap plus
  openssh-server) run by a dockerd inside the namespace with host networking, so the container
  is the namespace; its own sshd (the image's ssh.service) listens on the host's address.
- `agent`: sshd, and (`start_agent`) a Prefect process worker inside the namespace, so that the
  process backend of the flow runs it takes is local to that host; it reaches the orchestrator's
  Prefect API through a relay on the bridge address (tests/support/tcp_relay.py).
- `plain`: only sshd, for runner tests.

Everything the lab makes is named with the prefix `hxl-<lab>-` (namespaces, veths, the bridge)
and lives under the lab's directory, so `down` and the sweep at the start of `up` remove every
namespace, link, process (all processes inside the lab's namespaces) and file it made, also
after a crash. Needs root (namespaces, links, dockerd).

Each host gets an `nvidia-smi` TEST DOUBLE on the PATH of its SSH sessions (no GPU here),
printing the format a real H200 printed; its GPUs and processes come from the host's
`gpus.json` (tests/support/nvidia_smi_double.py).

Used by the fleet tests' fixtures and by `scripts/fleet-lab.sh up|down|status`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

PREFIX = "hxl-"
SUBNET = "198.18.0.0/24"
GATEWAY_ADDRESS = "198.18.0.1"
FIRST_HOST = 2
MAX_HOSTS = 40
SSH_PORT = 22
SYSTEMD_SSH_IMAGE = "hxp-test/debian-systemd-ssh:12"
SYSTEMD_SSH_ROOT = Path("/var/cache/hxp-test/debian-systemd-ssh")
DEFAULT_DIR = Path("/var/tmp/hxp-fleet-lab")
SWEEP_MARKER = "lab.json"
Role = Literal["docker", "systemd", "agent", "plain"]
_LAB_NAME_RE = re.compile(r"[a-z0-9]{1,8}")
_HOST_NAME_RE = re.compile(r"[a-z][a-z0-9]{0,15}")
DOUBLE = Path(__file__).resolve().parent / "nvidia_smi_double.py"
ROOT = Path(__file__).resolve().parents[2]


class LabError(RuntimeError):
    """The lab could not be set up (or torn down); the message says what to do."""


@dataclass(frozen=True)
class LabHost:
    """One lab host: its name, role, address and where its files and sockets are."""

    name: str
    role: Role
    address: str
    namespace: str
    directory: str
    docker_socket: str = ""  # the host's own dockerd (docker and systemd roles)
    container: str = ""  # systemd role: the container that is the host

    @property
    def sshd_log(self) -> Path:
        return Path(self.directory) / "sshd.log"

    @property
    def gpus_file(self) -> Path:
        return Path(self.directory) / "gpus.json"


@dataclass
class LabState:
    """What `up` made, written to DIR/lab.json so `down` and `status` find it."""

    name: str
    directory: str
    bridge: str
    client_key: str
    known_hosts: str
    hosts: list[LabHost] = field(default_factory=list)

    def host(self, name: str) -> LabHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def ssh_host_entry(self, name: str, **extra: Any) -> dict[str, Any]:
        """The stack's `hosts:` entry for lab host `name` (a docker or systemd host) driven
        over SSH with the lab's key and pinned host keys; `extra` fields added."""
        h = self.host(name)
        entry: dict[str, Any] = {
            "backend": "docker" if h.role == "docker" else "systemd",
            "runner": "ssh",
            "address": h.address,
            "ssh_user": "root",
            "ssh_key": self.client_key,
            "known_hosts": self.known_hosts,
        }
        if h.role == "docker":
            entry["docker_socket"] = h.docker_socket
        entry.update(extra)
        return entry

    def save(self) -> None:
        path = Path(self.directory) / SWEEP_MARKER
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> LabState | None:
        try:
            data = json.loads((directory / SWEEP_MARKER).read_text())
        except (OSError, ValueError):
            return None
        hosts = [LabHost(**h) for h in data.pop("hosts")]
        return cls(**data, hosts=hosts)


def require_root() -> None:
    """The lab makes namespaces, links and daemons: root only."""
    if os.geteuid() != 0:
        raise LabError(
            "the fleet lab needs root (it creates network namespaces, a bridge, veth links "
            "and runs sshd and dockerd): run it as root, e.g. `sudo scripts/fleet-lab.sh up`"
        )


def lab_available() -> str | None:
    """None when a lab can run here, else why not (for a test's skip reason)."""
    if os.geteuid() != 0:
        return "the fleet lab needs root"
    for tool in ("ip", "sshd", "ssh", "ssh-keygen", "dockerd"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"{tool} is not installed (scripts/install-system-deps.sh)"
    return None


def _run(argv: Sequence[str], check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False, **kw)
    if check and done.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` exited {done.returncode}: {done.stderr.strip()}")
    return done


def _in_ns(namespace: str, argv: Sequence[str]) -> list[str]:
    # Only the network namespace: `ip netns exec` would also remount /sys, hiding the cgroup
    # tree dockerd needs (TOOLING.md: `nsenter --net=/run/netns/NS dockerd`).
    return ["nsenter", f"--net=/run/netns/{namespace}", *argv]


class FleetLab:
    """Creates, inspects and removes one lab named `name` under `directory`."""

    def __init__(self, name: str = "lab", directory: Path | None = None) -> None:
        if not _LAB_NAME_RE.fullmatch(name):
            raise LabError(f"invalid lab name {name!r}: 1-8 lowercase letters and digits")
        self.name = name
        self.directory = Path(directory or DEFAULT_DIR / name).resolve()
        self.prefix = f"{PREFIX}{name}-"
        self.bridge = f"{PREFIX}{name}-br"

    # ---------------------------------------------------------------- names

    def namespace(self, host: str) -> str:
        return f"{self.prefix}{host}"

    def _veth(self, index: int) -> str:
        return f"{self.prefix}{index}"  # at most 15 characters: hxl- + 8 + - + 2

    # ---------------------------------------------------------------- up

    def up(self, roles: Sequence[tuple[str, Role]]) -> LabState:
        """Sweep anything left by an earlier run of this lab, then create the hosts."""
        require_root()
        if len(roles) > MAX_HOSTS:
            raise LabError(f"at most {MAX_HOSTS} lab hosts")
        names = [n for n, _ in roles]
        for n in names:
            if not _HOST_NAME_RE.fullmatch(n):
                raise LabError(f"invalid lab host name {n!r}")
        if len(set(names)) != len(names):
            raise LabError(f"a lab host name is listed twice: {names}")
        self._refuse_other_labs()
        self.down()
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        state = LabState(
            name=self.name,
            directory=str(self.directory),
            bridge=self.bridge,
            client_key=str(self.directory / "client_key"),
            known_hosts=str(self.directory / "known_hosts"),
        )
        state.save()  # first: a crash from here on is swept by the next up/down
        # The engines' images and containers on a tmpfs: a lab's teardown is an unmount, not
        # the deletion of a few hundred MB of image files.
        engines = self.directory / "engines"
        engines.mkdir(mode=0o700)
        _run(
            [
                "mount",
                "-t",
                "tmpfs",
                "-o",
                "mode=0700,size=4g",
                f"{self.prefix}engines",
                str(engines),
            ]
        )
        _run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                f"hxl-{self.name}",
                "-f",
                state.client_key,
            ]
        )
        self._bridge()
        try:
            for index, (host, role) in enumerate(roles):
                state.hosts.append(self._host(index, host, role, state))
                state.save()
            Path(state.known_hosts).write_text(
                "".join(self._known_hosts_line(h) for h in state.hosts)
            )
            for h in state.hosts:
                wait_for_ssh(state, h)
        except BaseException:
            self.down()
            raise
        return state

    def _refuse_other_labs(self) -> None:
        """Two labs would both claim 198.18.0.0/24 on this machine."""
        links = _run(["ip", "-o", "link", "show", "type", "bridge"]).stdout
        for m in re.finditer(rf"^\d+: ({re.escape(PREFIX)}[a-z0-9]+)-br[:@]", links, re.M):
            if m.group(1) != f"{PREFIX}{self.name}":
                other = m.group(1)[len(PREFIX) :]
                raise LabError(
                    f"another fleet lab ({other!r}) is up and holds {SUBNET}: "
                    f"`scripts/fleet-lab.sh down {other}` first"
                )

    def _bridge(self) -> None:
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{GATEWAY_ADDRESS}/24", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])

    def _host(self, index: int, host: str, role: Role, state: LabState) -> LabHost:
        ns = self.namespace(host)
        address = f"198.18.0.{FIRST_HOST + index}"
        folder = self.directory / "hosts" / host
        folder.mkdir(parents=True, exist_ok=True)
        _run(["ip", "netns", "add", ns])
        outside, inside = self._veth(index), f"{self._veth(index)}p"
        _run(["ip", "link", "add", outside, "type", "veth", "peer", "name", inside])
        _run(["ip", "link", "set", outside, "master", self.bridge, "up"])
        _run(["ip", "link", "set", inside, "netns", ns])
        _run(["ip", "-n", ns, "link", "set", inside, "name", "eth0"])
        _run(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                f"{host}.hxl-{self.name}",
                "-f",
                str(folder / "ssh_host_ed25519_key"),
            ]
        )
        self._nvidia_smi_double(folder)
        made = LabHost(host, role, address, ns, str(folder))
        match role:
            case "plain" | "agent":
                self._sshd(made, state)
                return made
            case "docker":
                sock = self._dockerd(made)
                made = LabHost(host, role, address, ns, str(folder), docker_socket=sock)
                self._sshd(made, state)
                return made
            case "systemd":
                sock = self._dockerd(made)
                container = self._systemd_container(made, sock, state)
                return LabHost(host, role, address, ns, str(folder), sock, container)

    def _nvidia_smi_double(self, folder: Path) -> None:
        """`bin/nvidia-smi` on the host's SSH PATH: the TEST DOUBLE, reading `gpus.json`."""
        bindir = folder / "bin"
        bindir.mkdir(exist_ok=True)
        script = bindir / "nvidia-smi"
        script.write_text(
            "#!/bin/sh\n"
            "# TEST DOUBLE of nvidia-smi for a fleet lab host (no GPU here): see\n"
            f"# {DOUBLE}\n"
            f'exec python3 {DOUBLE} --config {folder / "gpus.json"} "$@"\n'
        )
        script.chmod(0o755)
        (folder / "gpus.json").write_text('{"gpus": [], "processes": []}\n')

    def _sshd_config(self, host: LabHost, state: LabState, log: bool) -> str:
        folder = Path(host.directory)
        lines = [
            f"ListenAddress {host.address}:{SSH_PORT}",
            f"HostKey {folder / 'ssh_host_ed25519_key'}",
            f"AuthorizedKeysFile {folder / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "LogLevel VERBOSE",
            "MaxStartups 64:30:128",
            "AllowStreamLocalForwarding yes",
            "AllowTcpForwarding yes",
            f"SetEnv PATH={folder / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
            ":/sbin:/bin",
        ]
        if log:
            lines += [f"PidFile {folder / 'sshd.pid'}"]
        return "\n".join(lines) + "\n"

    def _sshd(self, host: LabHost, state: LabState) -> None:
        folder = Path(host.directory)
        shutil.copy(Path(state.client_key + ".pub"), folder / "authorized_keys")
        conf = folder / "sshd_config"
        conf.write_text(self._sshd_config(host, state, log=True))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        _run([sshd, "-t", "-f", str(conf)])
        subprocess.Popen(
            _in_ns(host.namespace, [sshd, "-D", "-f", str(conf), "-E", str(host.sshd_log)]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _dockerd(self, host: LabHost) -> str:
        folder = Path(host.directory)
        # containerd's sockets live under exec-root: keep that path short.
        exec_root = Path(tempfile.mkdtemp(prefix=f"{self.prefix}{host.name}-", dir="/run"))
        (folder / "exec-root").write_text(str(exec_root))
        sock = folder / "docker.sock"
        log = (folder / "dockerd.log").open("ab")
        subprocess.Popen(
            _in_ns(
                host.namespace,
                [
                    "dockerd",
                    "--storage-driver=overlay2",
                    "--iptables=false",
                    "--ip6tables=false",
                    "--bridge=none",
                    f"--data-root={self.directory / 'engines' / host.name}",
                    f"--exec-root={exec_root}",
                    f"--pidfile={folder / 'docker.pid'}",
                    f"--host=unix://{sock}",
                ],
            ),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        import docker

        deadline = time.monotonic() + 60
        while True:
            try:
                docker.DockerClient(base_url=f"unix://{sock}").ping()
                return str(sock)
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise LabError(
                        f"dockerd of lab host {host.name} did not answer: {exc} "
                        f"(see {folder / 'dockerd.log'})"
                    ) from None
                time.sleep(0.1)

    def _systemd_container(self, host: LabHost, sock: str, state: LabState) -> str:
        """systemd as PID 1 with the namespace's network, its own sshd on the host's address."""
        import docker

        from tests.support.systemd_container import PACKAGES, debian_systemd_root

        client = docker.DockerClient(base_url=f"unix://{sock}")
        root = debian_systemd_root(SYSTEMD_SSH_ROOT, PACKAGES + ",openssh-server")
        repository, version = SYSTEMD_SSH_IMAGE.split(":")
        with tempfile.TemporaryFile(dir="/var/tmp") as buf:
            with tarfile.open(fileobj=buf, mode="w") as tar:
                tar.add(root, arcname=".")
            buf.seek(0)
            client.api.import_image_from_data(buf, repository=repository, tag=version)
        folder = Path(host.directory)
        shutil.copy(Path(state.client_key + ".pub"), folder / "authorized_keys")
        name = f"{self.prefix}{host.name}"
        container = client.containers.run(
            SYSTEMD_SSH_IMAGE,
            ["/sbin/init"],
            name=name,
            hostname=host.name,
            detach=True,
            network_mode="host",
            stop_signal="SIGRTMIN+3",
            tmpfs={"/run": "", "/run/lock": "", "/tmp": ""},
            volumes={
                "/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "ro"},
                str(folder): {"bind": str(folder), "mode": "rw"},
                str(DOUBLE.parent): {"bind": str(DOUBLE.parent), "mode": "ro"},
            },
            environment={"container": "docker"},
        )
        conf = self._sshd_config(host, state, log=False)
        data = _tar_bytes({"etc/ssh/sshd_config.d/00-hxl.conf": conf})
        container.put_archive("/", data)
        deadline = time.monotonic() + 60
        state_text = ""
        while time.monotonic() < deadline:
            container.reload()
            if container.status != "running":
                raise LabError(f"systemd container exited: {container.logs()[-2000:]!r}")
            code, out = container.exec_run(["systemctl", "is-system-running"])
            state_text = out.decode(errors="replace").strip()
            if state_text in ("running", "degraded"):
                break
            time.sleep(0.2)
        else:
            raise LabError(f"systemd in lab host {host.name} did not boot ({state_text!r})")
        code, out = container.exec_run(["systemctl", "restart", "ssh.service"])
        if code != 0:
            raise LabError(f"ssh.service in lab host {host.name}: {out.decode(errors='replace')}")
        return name

    @staticmethod
    def _known_hosts_line(host: LabHost) -> str:
        key = (Path(host.directory) / "ssh_host_ed25519_key.pub").read_text().split()
        where = host.address if SSH_PORT == 22 else f"[{host.address}]:{SSH_PORT}"
        return f"{where} {key[0]} {key[1]}\n"

    # ---------------------------------------------------------------- agent

    def start_agent(
        self, state: LabState, host: str, api_url: str, pool: str, state_dir: Path, log: Path
    ) -> int:
        """A `prefect worker start --pool POOL --type process` inside `host`'s namespace, with
        its own HXP_STATE_DIR, reaching `api_url` (on this machine's loopback) through a relay
        on the bridge address; returns the worker's pid (swept with the namespace)."""
        h = state.host(host)
        if h.role != "agent":
            raise LabError(f"lab host {host} has role {h.role}, not agent")
        env = {
            **os.environ,
            "PREFECT_API_URL": self.relay(api_url),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "1",
            "HXP_STATE_DIR": str(state_dir),
        }
        prefect = str(Path(sys.executable).parent / "prefect")
        with log.open("ab") as out:
            worker = subprocess.Popen(
                _in_ns(
                    h.namespace, [prefect, "worker", "start", "--pool", pool, "--type", "process"]
                ),
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return worker.pid

    def relay(self, api_url: str) -> str:
        """`api_url` (a Prefect API on this machine's loopback) as lab hosts reach it: through
        a relay listening on the bridge's address, stopped by `down`."""
        from urllib.parse import urlsplit

        api = urlsplit(api_url)
        relay = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.tcp_relay",
                GATEWAY_ADDRESS,
                f"{api.hostname}:{api.port}",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        (self.directory / f"relay-{relay.pid}.pid").write_text(f"{relay.pid}\n")
        assert relay.stdout is not None
        port = int(relay.stdout.readline())
        return f"http://{GATEWAY_ADDRESS}:{port}{api.path}"

    def set_link(self, host: str, up: bool) -> None:
        """Take lab host `host`'s link down (or bring it back) inside its namespace: the host
        stops answering as a host whose cable was pulled, its processes still running."""
        state = "up" if up else "down"
        _run(["ip", "-n", self.namespace(host), "link", "set", "eth0", state])

    def _stop_relays(self) -> list[str]:
        stopped = []
        for pidfile in self.directory.glob("relay-*.pid"):
            pid = int(pidfile.read_text())
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"tests.support.tcp_relay" in cmdline:  # not a recycled pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone([pid], 5.0)
                stopped.append(f"relay {pid}")
        return stopped

    # ---------------------------------------------------------------- down

    def down(self) -> list[str]:
        """Remove every namespace, link, process and file of this lab (made by this run or by
        one that crashed); returns what was removed. Safe to call when nothing is up."""
        require_root()
        removed: list[str] = self._stop_relays()
        self._remove_containers()
        for ns in self._namespaces():
            pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for sig in (signal.SIGTERM, signal.SIGKILL):
                alive = [int(p) for p in pids if _alive(int(p))]
                for pid in alive:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                if sig == signal.SIGTERM and alive:
                    _wait_gone(alive, 15.0)
            _run(["ip", "netns", "del", ns], check=False)
            removed.append(f"namespace {ns}")
        links = _run(["ip", "-o", "link", "show"]).stdout
        for m in re.finditer(rf"^\d+: ({re.escape(self.prefix)}[a-z0-9]+)[:@]", links, re.M):
            _run(["ip", "link", "del", m.group(1)], check=False)
            removed.append(f"link {m.group(1)}")
        for root in Path("/run").glob(f"{self.prefix}*"):
            for mount in _mounts_under(root):
                _run(["umount", "-l", mount], check=False)
            shutil.rmtree(root, ignore_errors=True)
            removed.append(f"directory {root}")
        # The engines' tmpfs is named after the lab: found even when `down` is given another
        # directory than `up` was.
        for engines in _mounts_named(f"{self.prefix}engines"):
            for mount in _mounts_under(Path(engines)):
                _run(["umount", "-l", mount], check=False)
            removed.append(f"mount {engines}")
        if self.directory.exists() and (self.directory / SWEEP_MARKER).exists():
            for mount in _mounts_under(self.directory):
                _run(["umount", "-l", mount], check=False)
            shutil.rmtree(self.directory, ignore_errors=True)
            removed.append(f"directory {self.directory}")
        return removed

    def _remove_containers(self) -> None:
        """Containers first, through their engines: systemd as PID 1 ignores the SIGTERM the
        sweep sends, and an engine stopping a container cleans up after it (cgroups)."""
        import docker

        for sock in self.directory.glob("hosts/*/docker.sock"):
            try:
                client = docker.DockerClient(base_url=f"unix://{sock}", timeout=10)
                for container in client.containers.list(all=True):
                    container.remove(force=True)
            except Exception:  # a dead engine: the sweep below kills what is left
                continue

    def _namespaces(self) -> list[str]:
        listing = _run(["ip", "netns", "list"], check=False).stdout
        return [
            line.split()[0]
            for line in listing.splitlines()
            if line.split() and line.split()[0].startswith(self.prefix)
        ]

    # ---------------------------------------------------------------- status

    def status(self) -> list[str]:
        """One line per host: its address, role and whether its sshd answers."""
        state = LabState.load(self.directory)
        if state is None:
            return [f"lab {self.name}: not up"]
        lines = [f"lab {self.name}: {len(state.hosts)} host(s) in {self.directory}"]
        namespaces = set(self._namespaces())
        for h in state.hosts:
            ns = "up" if h.namespace in namespaces else "MISSING"
            sshd = "answers" if _ssh_banner(h.address) else "silent"
            lines.append(f"  {h.name:<12} {h.address:<14} {h.role:<8} namespace {ns}, sshd {sshd}")
        return lines


# ---------------------------------------------------------------------- helpers for tests


def set_gpus(host: LabHost, gpus: list[dict[str, Any]], processes: list[dict[str, Any]]) -> None:
    """What the host's nvidia-smi double reports (see tests/support/nvidia_smi_double.py)."""
    host.gpus_file.write_text(json.dumps({"gpus": gpus, "processes": processes}) + "\n")


def sshd_log(host: LabHost) -> str:
    """What the host's sshd logged so far (LogLevel VERBOSE): its log file or, on a systemd
    host, the container's journal (read through the lab's own engine, not through SSH)."""
    if host.role == "systemd":
        import docker

        client = docker.DockerClient(base_url=f"unix://{host.docker_socket}")
        _code, out = client.containers.get(host.container).exec_run(
            ["journalctl", "-u", "ssh.service", "-o", "cat", "--no-pager"]
        )
        return out.decode(errors="replace")
    try:
        return host.sshd_log.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def ssh_connections(host: LabHost) -> int:
    """TCP connections the host's sshd accepted so far: it logs each one at LogLevel VERBOSE
    (`Connection from ADDR port N on ADDR port 22`)."""
    return len(re.findall(r"^.*Connection from \S+ port \d+ on ", sshd_log(host), re.M))


def wait_for_ssh(state: LabState, host: LabHost, seconds: float = 60.0) -> None:
    """Until the host's sshd answers with its SSH banner."""
    deadline = time.monotonic() + seconds
    while not _ssh_banner(host.address):
        if time.monotonic() > deadline:
            raise LabError(f"sshd of lab host {host.name} ({host.address}) did not answer")
        time.sleep(0.1)


def _ssh_banner(address: str) -> bool:
    try:
        with socket.create_connection((address, SSH_PORT), timeout=1.0) as s:
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def _tar_bytes(files: dict[str, str]) -> bytes:
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _alive(pid: int) -> bool:
    """Running (a zombie is not: our own children are reaped here)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _wait_gone(pids: list[int], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


def _mounts_named(source: str) -> list[str]:
    """Mount points of the filesystems whose source is `source` (e.g. a named tmpfs)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split()
        if " - " in line and line.split(" - ", 1)[1].split()[1:2] == [source]:
            found.append(fields[4])
    return found


def _mounts_under(directory: Path) -> list[str]:
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    found = [line.split()[4] for line in lines if len(line.split()) > 4]
    inside = [m for m in found if m == str(directory) or m.startswith(f"{directory}/")]
    return sorted(inside, key=len, reverse=True)


# ---------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """`up [--name N] [--dir D] HOST:ROLE ...`, `down [N]`, `status [N]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="fleet-lab", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="create the lab (sweeping an earlier one of the same name)")
    up.add_argument(
        "hosts",
        nargs="*",
        default=["h1:docker", "h2:systemd"],
        help="NAME:ROLE, role docker, systemd or plain (default h1:docker h2:systemd)",
    )
    for p in (
        up,
        sub.add_parser("down", help="remove everything the lab made"),
        sub.add_parser("status", help="list the lab's hosts"),
    ):
        p.add_argument("--name", default="lab", help="lab name (1-8 lowercase letters/digits)")
        p.add_argument("--dir", default=None, help=f"lab directory (default {DEFAULT_DIR}/NAME)")
    args = parser.parse_args(argv)
    try:
        lab = FleetLab(args.name, Path(args.dir) if args.dir else None)
        if args.command == "up":
            roles: list[tuple[str, Role]] = []
            for item in args.hosts:
                host, _, role = item.partition(":")
                if role not in ("docker", "systemd", "agent", "plain"):
                    raise LabError(
                        f"{item!r}: expected NAME:ROLE, role docker, systemd, agent or plain"
                    )
                roles.append((host, role))  # type: ignore[arg-type]
            state = lab.up(roles)
            print(f"lab {state.name} up in {state.directory}")
            print(f"  ssh key:     {state.client_key}")
            print(f"  known_hosts: {state.known_hosts}")
            for h in state.hosts:
                extra = f" docker_socket {h.docker_socket}" if h.role == "docker" else ""
                print(f"  {h.name:<12} {h.address:<14} {h.role}{extra}")
        elif args.command == "down":
            removed = lab.down()
            print(f"lab {args.name}: removed {len(removed)} thing(s)")
        else:
            require_root()
            print("\n".join(lab.status()))
    except LabError as exc:
        print(f"fleet-lab: {exc}", file=sys.stderr)
        return 2 if os.geteuid() != 0 else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
