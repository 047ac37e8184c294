"""Nodes on separate network stacks for the partition tests (issue 13): Linux network namespaces
joined by one bridge, so that a coordinator, workers and an S3 server each get their own address
and a link that the test can cut and heal like a cable.

Design
- One bridge `<P>br` in the root namespace, P = "sn<pid mod 10^6>" (unique per test process; at
  start every leftover namespace or link whose name starts with "sn" and whose pid is gone is
  deleted). The bridge has no address: only the nodes talk, so the subnet cannot clash with the
  root namespace or with another test's bridge. Subnet 10.213.<pid mod 250>.0/24.
- One namespace `<P>-<node>` per node, its loopback up, and one veth pair: `<P>v<k>` on the
  bridge (root side) and `eth0` inside with address 10.213.X.(10+k)/24. Every process of the
  node is started with `ip netns exec NS ...` through sytest's protected spawn (PDEATHSIG, own
  process group, the test's mark: none outlives the test). Files are shared (only the network
  is separate), so the test reads metrics.jsonl and events.jsonl as usual; HTTP to a node
  (the coordinator's status server) goes through `ip netns exec NS curl`.
- cut(node) / heal(node): `ip link set <P>v<k> down/up` on the root side. The node's carrier
  goes down: every packet to and from it is dropped, no RST or FIN is sent, TCP connections
  stay established on both sides (half-open, as a pulled cable or a dead switch port): both the
  control plane and the data plane of that node are cut.
- cut_pair(a, b) / heal_pair(a, b): only the traffic between a and b stops (the asymmetric
  cut, scenario d). The bridge ports of a and b are set `isolated` (`bridge link set dev X
  isolated on`): isolated ports do not forward to each other but do to every other port, so
  both still reach the coordinator and the other nodes. One pair at a time.
- close(): kills the processes started here (SIGKILL) and deletes the namespaces and the
  bridge (veths go with their namespace). Registered with atexit and on SIGTERM/SIGHUP/SIGINT
  (sytest's handlers kill the processes first); a namespace or link left by a SIGKILLed test is
  cleaned by the next test's start (stale prefix, pid gone).

available() says whether this machine can do it (root, `ip netns` works); a test exits 77
(skipped) when it cannot.
"""
import atexit
import os
import re
import signal
import subprocess

import sytest


def _ip(*args, check=True, ns=None):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def clean_stale():
    """Deletes namespaces and links named sn<pid>... whose test process is gone."""
    r = _ip("ip", "netns", "list", check=False)
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.match(r"^sn(\d+)-", name)
        if m and not _pid_alive(int(m.group(1))):
            _ip("ip", "netns", "del", name, check=False)
    r = _ip("ip", "-o", "link", "show", check=False)
    for line in r.stdout.splitlines():
        m = re.match(r"^\d+: (sn(\d+)(br|v\d+))[@:]", line)
        if m and not _pid_alive(int(m.group(2))):
            _ip("ip", "link", "del", m.group(1), check=False)


def available():
    """(True, '') when namespaces, veths and bridges can be made here; else (False, why)."""
    if os.geteuid() != 0:
        return False, "not root"
    name = f"sn{os.getpid()}-probe"
    r = _ip("ip", "netns", "add", name, check=False)
    if r.returncode != 0:
        return False, "ip netns add failed: " + r.stderr.strip()
    _ip("ip", "netns", "del", name, check=False)
    return True, ""


class Net:
    """A bridge and its nodes (see the module docstring)."""

    def __init__(self):
        clean_stale()
        pid = os.getpid()
        self.prefix = f"sn{pid}"
        if len(self.prefix) + 4 > 15:  # interface names are at most 15 characters
            raise RuntimeError(f"pid {pid} too long for interface names")
        self.subnet = f"10.213.{pid % 250}"
        self.bridge = f"{self.prefix}br"
        self.nodes = {}  # name → (namespace, veth root side, address)
        self.procs = []
        self.isolated = set()
        self._closed = False
        atexit.register(self.close)
        for sig in (signal.SIGINT,):
            signal.signal(sig, self._on_signal)
        _ip("ip", "link", "add", self.bridge, "type", "bridge")
        _ip("ip", "link", "set", self.bridge, "up")

    def _on_signal(self, sig, frame):
        sytest.kill_all()
        self.close()
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)

    def add(self, node):
        """A namespace for `node` on the bridge; its address."""
        k = len(self.nodes)
        ns, veth, addr = f"{self.prefix}-{node}", f"{self.prefix}v{k}", f"{self.subnet}.{10 + k}"
        self.nodes[node] = (ns, veth, addr)
        _ip("ip", "netns", "add", ns)
        _ip("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("ip", "link", "set", veth, "master", self.bridge)
        _ip("ip", "link", "set", veth, "up")
        _ip("ip", "link", "set", "lo", "up", ns=ns)
        _ip("ip", "addr", "add", f"{addr}/24", "dev", "eth0", ns=ns)
        _ip("ip", "link", "set", "eth0", "up", ns=ns)
        return addr

    def addr(self, node):
        return self.nodes[node][2]

    def ns(self, node):
        return self.nodes[node][0]

    def cmd(self, node, args):
        """args run inside node's namespace."""
        return ["ip", "netns", "exec", self.ns(node)] + list(args)

    def Popen(self, node, args, **kw):
        p = sytest.Popen(self.cmd(node, args), **kw)
        self.procs.append(p)
        return p

    def run(self, node, args, **kw):
        return sytest.run(self.cmd(node, args), **kw)

    def http_get(self, node, url, timeout=5):
        r = sytest.run(self.cmd(node, ["curl", "-s", "-m", str(timeout), url]), capture_output=True,
                       text=True, timeout=timeout + 5)
        return r.stdout if r.returncode == 0 else None

    # -- faults ----------------------------------------------------------------------------------
    def cut(self, node):
        _ip("ip", "link", "set", self.nodes[node][1], "down")

    def heal(self, node):
        _ip("ip", "link", "set", self.nodes[node][1], "up")

    def cut_pair(self, a, b):
        if self.isolated:
            raise RuntimeError("one isolated pair at a time")
        for n in (a, b):
            _ip("bridge", "link", "set", "dev", self.nodes[n][1], "isolated", "on")
            self.isolated.add(n)

    def heal_pair(self, a, b):
        for n in (a, b):
            _ip("bridge", "link", "set", "dev", self.nodes[n][1], "isolated", "off")
            self.isolated.discard(n)

    def heal_all(self):
        """Every link up, no isolated pair (between scenarios, whatever the last one left)."""
        for node, (_, veth, _) in self.nodes.items():
            _ip("bridge", "link", "set", "dev", veth, "isolated", "off", check=False)
            _ip("ip", "link", "set", veth, "up")
        self.isolated.clear()

    def close(self):
        if self._closed:
            return
        self._closed = True
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        for ns, veth, _ in self.nodes.values():
            _ip("ip", "netns", "del", ns, check=False)
            _ip("ip", "link", "del", veth, check=False)
        _ip("ip", "link", "del", self.bridge, check=False)
