"""deploy/slurm/switchyard.sbatch on a real Slurm (issue 13): a single-node cluster brought up in a
temporary folder (munged, slurmctld and slurmd of Debian's slurm-wlm 22.05, a generated
slurm.conf naming this host with its real CPU count), the batch script submitted unchanged with
`sbatch`: the coordinator in the batch step, three worker tasks through the script's own `srun`.

- A job of 30 steps completes (Slurm's JobState COMPLETED, exit 0:0) and every step's loss
  equals `switchyard run --workers 1` exactly (the fp64 losses of metrics.jsonl).
- `kill -9` of one worker task's switchyard-worker process: the script's task loop restarts it
  under the same id (Slurm sees nothing: the task, a bash loop, is still running, so srun neither
  ends the step nor, with --kill-on-bad-exit=0, kills the other tasks); the coordinator opens a
  new generation from the last checkpoint; the job completes and every step's loss (the last
  recorded value of each step) equals the reference.
- `scancel` of the whole job after a checkpoint, then the same `sbatch` again: the second job
  resumes from the latest committed checkpoint (coordinator_started.latest_checkpoint), not from
  step 0, and its losses equal the reference.
Every daemon and job process is gone afterwards (the test's spawn mark; slurmstepd inherits it).

Needs root (slurmd runs the jobs as root here) and the slurm-wlm and munge packages
(deploy/install-deps.sh installs them); exits 77 (skipped) where either is missing."""
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import sytest
from sytest import BUILD, CFG, SRC, SY, check, failures, metrics

SCRIPT = os.path.join(SRC, "deploy", "slurm", "switchyard.sbatch")
DAEMONS = ["munged", "slurmctld", "slurmd"]
CLIENTS = ["sbatch", "scancel", "scontrol", "sinfo", "srun"]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE"}


def which(name):
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Slurm:
    """A one-node Slurm cluster in `root`: started by start(), stopped by stop()."""

    def __init__(self, root):
        self.root = root
        self.conf = f"{root}/slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.procs = []

    def start(self):
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            os.makedirs(f"{r}/{d}", exist_ok=True)
        os.chmod(f"{r}/munge", 0o700)
        with open(f"{r}/munge/munge.key", "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(f"{r}/munge/munge.key", 0o400)
        sock = f"{r}/munge/munge.socket"
        self.spawn([which("munged"), "-F", "-f", f"--socket={sock}", f"--key-file={r}/munge/munge.key",
                    f"--log-file={r}/log/munged.log", f"--pid-file={r}/munge/munged.pid",
                    f"--seed-file={r}/munge/munged.seed"], "munged")
        if not wait_for(lambda: os.path.exists(sock), 10):
            return "munged did not create its socket"
        host = socket.gethostname().split(".")[0]
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20) * 8 // 10
        open(f"{r}/plugstack.conf", "w").close()
        # Single node, root everywhere, no cgroups (not in every container): linuxproc process
        # tracking; OverSubscribe so the test's 3 worker tasks can share 2 CPUs (sbatch -O).
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=sytest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
PlugStackConfig={r}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
InactiveLimit=0
KillWait=5
MinJobAge=600
JobRequeue=1
NodeName={host} CPUs={os.cpu_count()} RealMemory={mem} State=UNKNOWN
PartitionName=sytest Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
        self.spawn([which("slurmctld"), "-D", "-i", "-f", self.conf], "slurmctld")
        self.spawn([which("slurmd"), "-D", "-f", self.conf], "slurmd")
        if not wait_for(lambda: "idle" in self.cmd(["sinfo", "-h", "-o", "%T"]).stdout, 30):
            return "the node did not come up idle in 30 s: " + self.cmd(["sinfo"]).stdout + tail(f"{r}/log/slurmctld.log")
        return None

    def spawn(self, argv, name):
        log = open(f"{self.root}/log/{name}.out", "w")
        self.procs.append(sytest.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def cmd(self, argv, timeout=30):
        return sytest.run([which(argv[0])] + argv[1:], env=self.env, capture_output=True, text=True, timeout=timeout)

    def job(self, jid):
        """JobState and ExitCode of a job (scontrol keeps ended jobs for MinJobAge seconds)."""
        out = self.cmd(["scontrol", "show", "job", "-o", str(jid)]).stdout
        state = re.search(r"JobState=(\S+)", out)
        code = re.search(r"\bExitCode=(\S+)", out)
        return (state.group(1) if state else "?"), (code.group(1) if code else "?")

    def wait_job(self, jid, timeout):
        t = time.time()
        while time.time() - t < timeout:
            st = self.job(jid)
            if st[0] in ENDED:
                return st
            time.sleep(0.5)
        return self.job(jid)

    def stop(self):
        self.cmd(["scancel", "--full", "-u", "root"])
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def wait_for(pred, timeout):
    t = time.time()
    while time.time() - t < timeout:
        if pred():
            return True
        time.sleep(0.2)
    return pred()


def tail(path, n=2000):
    try:
        return open(path).read()[-n:]
    except OSError:
        return ""


def sets(tmp, name, steps, every=10):
    s = {"data.train": f"{tmp}/data/train_*.bin", "data.val": "", "run.name": name, "run.state_dir": f"{tmp}/state-{name}",
         "checkpoint.store": f"{tmp}/store", "run.steps": str(steps), "checkpoint.every": str(every),
         "train.threads": "1"}
    out = []
    for k, v in s.items():
        out += ["--set", f"{k}={v}"]
    return out


def submit(sl, tmp, name, steps):
    """sbatch of the unchanged script: one node, one CPU per task, 3 workers on it (-O: more
    tasks than the node's 2 CPUs). Returns (job id, its output file)."""
    env = dict(sl.env, SY_BIN=BUILD, SY_WORKERS_PER_NODE="3", SY_STOP_GRACE="10", SY_WORKER_RESTARTS="3")
    out = f"{tmp}/{name}-%j.out"
    r = sytest.run([which("sbatch"), "--parsable", "-N1", "-c1", "-O", "-o", out, "-D", tmp, SCRIPT, CFG]
                   + sets(tmp, name, steps), env=env, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        check(False, f"sbatch {name}: {r.stderr.strip()}")
        return None, None
    jid = r.stdout.strip().split(";")[0]
    return jid, out.replace("%j", jid)


def ours():
    """switchyard processes of this test still running: pid -> argv."""
    out = {}
    mark = f"{sytest.MARK}={os.environ[sytest.MARK]}".encode()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            if mark not in open(f"/proc/{d}/environ", "rb").read().split(b"\0"):
                continue
            argv = open(f"/proc/{d}/cmdline", "rb").read().decode(errors="replace").split("\0")
            stat = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        if ") Z " not in stat and os.path.basename(argv[0]).startswith("switchyard"):
            out[int(d)] = argv
    return out


def same_losses(tmp, name, ref, what):
    got = metrics(tmp, name)
    check(sorted(got) == sorted(ref), f"{what}: metrics.jsonl has every step 1..{max(ref)} ({len(got)} steps)")
    worst = max((abs(got[s]["loss"] - ref[s]["loss"]) for s in ref if s in got), default=float("inf"))
    check(worst == 0.0, f"{what}: every step's loss equals `switchyard run --workers 1` exactly (worst {worst:.2e})")
    return got


def main():
    if os.geteuid() != 0:
        print("skipped: needs root (slurmd runs the jobs)")
        return 77
    missing = [n for n in DAEMONS + CLIENTS if not which(n)]
    if missing:
        print(f"skipped: {', '.join(missing)} not installed (apt-get install slurm-wlm munge)")
        return 77
    tmp = sytest.make_tmp("sy-slurm-")
    rnd = random.Random(13)
    words = ["slurm", "runs", "one", "coordinator", "and", "three", "workers", "each", "token", "goes",
             "to", "an", "expert", "of", "the", "switch", "layer"]
    os.makedirs(f"{tmp}/text")
    with open(f"{tmp}/text/c.txt", "w") as f:
        for _ in range(4000):
            f.write(" ".join(rnd.choice(words) for _ in range(rnd.randint(4, 14))) + ".\n")
    r = sytest.run([SY, "data", "prepare", "--input", f"{tmp}/text", "--out", f"{tmp}/data"],
                   capture_output=True, text=True, timeout=120)
    check(r.returncode == 0, f"corpus prepared {r.stderr[-300:]}")

    steps = 30
    r = sytest.run([SY, "run", CFG, "--workers", "1", "--quiet"] + sets(tmp, "ref", steps),
                   capture_output=True, text=True, timeout=600)
    check(r.returncode == 0, f"reference: switchyard run --workers 1 ({r.stderr[-500:]})")
    ref = metrics(tmp, "ref")
    if sorted(ref) != list(range(1, steps + 1)):
        check(False, f"reference has steps 1..{steps} ({sorted(ref)})")
        return 1

    sl = Slurm(f"{tmp}/slurm")
    err = sl.start()
    try:
        if not check(err is None, f"a one-node Slurm ({socket.gethostname()}, {os.cpu_count()} CPUs) is up: {err or 'idle'}"):
            return 1
        scenarios(sl, tmp, ref, steps)
    finally:
        sl.stop()
    left = ours()
    check(not left, f"no switchyard process of the test is left ({left})")
    if failures:
        for f in ("slurmctld.log", "slurmd.log"):
            print(f"---- {f}\n{tail(f'{tmp}/slurm/log/{f}', 3000)}")
    else:
        sytest.remove_tmp(tmp)
    return 1 if failures else 0


def scenarios(sl, tmp, ref, steps):
    # 1. a job runs to the end
    t = time.time()
    jid, out = submit(sl, tmp, "run", steps)
    if not jid:
        return
    st = sl.wait_job(jid, 300)
    ok = check(st == ("COMPLETED", "0:0"), f"job {jid}: {st[0]} {st[1]} in {time.time() - t:.1f} s (COMPLETED 0:0)"
               + ("" if st[0] == "COMPLETED" else tail(out)))
    got = same_losses(tmp, "run", ref, "sbatch run")
    check(ok and all(m["world"] == 3 for m in got.values()), "sbatch run: every step ran with world 3 (three srun tasks)")

    # 2. kill -9 of one worker's process mid-run
    jid, out = submit(sl, tmp, "kill", steps)
    if not jid:
        return
    state = f"{tmp}/state-kill"
    check(wait_for(lambda: len(sytest.jsonl(f"{state}/metrics.jsonl")) >= 14, 180), "kill: the job trains to step 14")
    victim = [pid for pid, argv in ours().items()
              if os.path.basename(argv[0]) == "switchyard-worker" and "w1" in argv]
    if check(len(victim) == 1, f"kill: one switchyard-worker process with id w1 ({victim})"):
        os.kill(victim[0], signal.SIGKILL)
    st = sl.wait_job(jid, 300)
    check(st == ("COMPLETED", "0:0"), f"kill: job {jid} ends {st[0]} {st[1]} after the kill (COMPLETED 0:0)" + ("" if st[0] == "COMPLETED" else tail(out)))
    text = tail(out, 100000)
    check(re.search(r"worker w1 exited 137; restart 1 of 3", text) is not None,
          "kill: the script's task restarted worker w1 under the same id (\"worker w1 exited 137; restart 1 of 3\")")
    ev = sytest.jsonl(f"{state}/events.jsonl")
    gens = [e for e in ev if e.get("event") == "generation_opened"]
    check(len(gens) >= 2 and gens[-1].get("restore_step", 0) >= 10,
          f"kill: a new generation restored from a checkpoint ({[(g.get('world'), g.get('restore_step')) for g in gens]})")
    same_losses(tmp, "kill", ref, "kill")

    # 3. scancel after a checkpoint, then the same sbatch again: resumes, not from step 0
    jid, out = submit(sl, tmp, "cancel", steps)
    if not jid:
        return
    man = f"{tmp}/store/cancel/ckpt/step-000000020/MANIFEST.json"
    check(wait_for(lambda: os.path.exists(man), 240), "cancel: the step-20 checkpoint is committed")
    r = sl.cmd(["scancel", jid])
    st = sl.wait_job(jid, 60)
    check(r.returncode == 0 and st[0] == "CANCELLED", f"cancel: scancel {jid} -> {st[0]} {st[1]}")
    check(wait_for(lambda: not ours(), 30), f"cancel: no switchyard process of the job is left ({ours()})")
    done = max(sytest.metrics(tmp, "cancel"), default=0)
    check(done < steps, f"cancel: the job was cancelled before the end (step {done} of {steps})")
    jid2, out2 = submit(sl, tmp, "cancel", steps)
    if not jid2:
        return
    st = sl.wait_job(jid2, 300)
    check(st == ("COMPLETED", "0:0"), f"cancel: the resubmitted job {jid2} {st[0]} {st[1]}" + ("" if st[0] == "COMPLETED" else tail(out2)))
    started = [e for e in sytest.jsonl(f"{tmp}/state-cancel/events.jsonl") if e.get("event") == "coordinator_started"]
    latest = started[-1].get("latest_checkpoint") if started else None
    check(len(started) == 2 and latest is not None and latest >= 20,
          f"cancel: the second job resumed from the latest committed checkpoint (step {latest}), not step 0")
    same_losses(tmp, "cancel", ref, "cancel + resubmit")


if __name__ == "__main__":
    sys.exit(main())
