"""The deployment files of deploy/ (system spec §1), checked as far as this machine allows.

- systemd (deploy/systemd/): the units parse (systemd-analyze verify when present, else an INI
  check), carry the settings docs/deployment.md promises, name only flags the binaries accept,
  and their ExecStart lines, expanded as systemd would, run a real 2-worker run.
- Slurm (deploy/slurm/switchyard.sbatch): run under fake `srun`/`scontrol`
  (tests/deploy/fake-slurm/) emulating a 2-node allocation on this machine: a run, a
  resubmission that resumes from the checkpoint with another shape, a worker crash and scancel
  (SIGTERM), SIGUSR1 (checkpoint + requeue); every process it started is gone afterwards.
- Kubernetes (deploy/k8s/): every YAML document parses; kinds, selectors, ports, the container
  flags, the downward-API variables, and the ConfigMap's config (through `switchyard config
  show`) agree with each other; `kubectl kustomize` builds it when kubectl is present.
- Container (deploy/container/): static only (no Docker daemon here): base image, COPY sources,
  the entrypoint and binaries are CMake targets, the build packages come from
  deploy/install-deps.sh, the runtime packages hold every library the binaries load.
- docs/deployment.md names every file of deploy/{systemd,slurm,k8s,container}.

Prints one ok:/FAIL: line per check; exit 1 when any fails."""
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import sytest
from sytest import BUILD, SRC, SY, check, failures

DEPLOY = os.path.join(SRC, "deploy")
FAKE_SLURM = os.path.join(SRC, "tests", "deploy", "fake-slurm")
TINY = sytest.CFG
MARK = "SY_DEPLOY_TEST"  # every process a check starts carries it in its environment


# --- what the build offers ---------------------------------------------------------------------

def cmake_targets():
    text = open(os.path.join(SRC, "CMakeLists.txt")).read()
    return set(re.findall(r"add_executable\((switchyard[\w-]*)", text))


HELP = {}


def help_flags(binary):
    """The --long-flags a binary's --help names (its usage text is the contract)."""
    if binary not in HELP:
        r = sytest.run([os.path.join(BUILD, binary), "--help"], capture_output=True, text=True, timeout=10)
        HELP[binary] = set(re.findall(r"(--[a-z][a-z-]*)", r.stdout + r.stderr))
    return HELP[binary]


def flags_known(binary, argv, what):
    flags = [a.split("=", 1)[0] for a in argv if a.startswith("--")]
    unknown = [f for f in flags if f not in help_flags(binary)]
    check(not unknown and help_flags(binary), f"{what}: flags {sorted(set(flags))} are in `{binary} --help`"
          + (f" (unknown: {unknown})" if unknown else ""))


def marked_pids(tag):
    """Processes still running whose environment carries MARK=tag."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            env = open(f"/proc/{d}/environ", "rb").read().split(b"\0")
            stat = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        if f"{MARK}={tag}".encode() in env and ") Z " not in stat:
            out.append(int(d))
    return out


def kill_marked(tag):
    for pid in marked_pids(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def jsonl(path):
    out = []
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def make_corpus(tmp):
    import random
    rnd = random.Random(7)
    words = ["switch", "routes", "each", "token", "to", "one", "expert", "and", "the", "capacity",
             "factor", "bounds", "load", "of", "experts"]
    os.makedirs(f"{tmp}/text")
    with open(f"{tmp}/text/c.txt", "w") as f:
        for _ in range(3000):
            f.write(" ".join(rnd.choice(words) for _ in range(rnd.randint(4, 14))) + ".\n")
    r = sytest.run([SY, "data", "prepare", "--input", f"{tmp}/text", "--out", f"{tmp}/data"],
                   capture_output=True, text=True, timeout=60)
    check(r.returncode == 0, "corpus prepared")


def run_sets(tmp, steps, name="dep", extra=()):
    s = [("data.train", f"{tmp}/data/train_*.bin"), ("data.val", ""), ("run.name", name),
         ("run.steps", str(steps)), ("checkpoint.every", "3"), ("checkpoint.store", f"{tmp}/store"),
         ("run.state_dir", f"{tmp}/state-{name}"), ("train.threads", "1")] + list(extra)
    out = []
    for k, v in s:
        out += ["--set", f"{k}={v}"]
    return out


# --- systemd -----------------------------------------------------------------------------------

def parse_unit(path):
    """A systemd unit as {section: [(key, value), ...]}; None and a message when malformed."""
    sections, cur, pending = {}, None, ""
    for n, raw in enumerate(open(path), 1):
        line = pending + raw.rstrip("\n")
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        s = line.strip()
        if not s or s[0] in "#;":
            continue
        if s.startswith("["):
            if not s.endswith("]"):
                return None, f"line {n}: bad section header"
            cur = s[1:-1]
            sections.setdefault(cur, [])
        elif "=" in s and cur:
            k, v = s.split("=", 1)
            sections[cur].append((k.strip(), v.strip()))
        else:
            return None, f"line {n}: not KEY=VALUE inside a section: {s!r}"
    return sections, ""


def unit_get(u, section, key):
    return [v for k, v in u.get(section, []) if k == key]


def expand_exec(line, env, instance=""):
    """ExecStart= as systemd expands it: %i/%% specifiers, ${VAR} = one word, $VAR = split."""
    line = line.replace("%i", instance).replace("%%", "%")
    out = []
    for word in shlex.split(line):
        m = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if m:
            out += env.get(m.group(1), "").split()
        else:
            out.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda mm: env.get(mm.group(1), ""), word))
    return out


def unit_env(u, env_files):
    """Environment= values, then the EnvironmentFile= files (which win), as systemd does."""
    env = {}
    for v in unit_get(u, "Service", "Environment"):
        for item in shlex.split(v):
            k, _, val = item.partition("=")
            env[k] = val
    for f in env_files:
        for line in open(f):
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                k, _, val = line.partition("=")
                env[k.strip()] = val.strip()
    return env


def check_systemd(tmp):
    d = os.path.join(DEPLOY, "systemd")
    units = {"coordinator": os.path.join(d, "switchyard-coordinator.service"),
             "worker": os.path.join(d, "switchyard-worker@.service")}
    parsed = {}
    targets = cmake_targets()
    for role, path in units.items():
        name = os.path.basename(path)
        if not check(os.path.exists(path), f"systemd: {name} exists"):
            continue
        u, err = parse_unit(path)
        if not check(u is not None, f"systemd: {name} parses as a unit file {err}"):
            continue
        parsed[role] = u
        check({"Unit", "Service", "Install"} <= set(u), f"systemd: {name} has [Unit], [Service], [Install]")
        want = {"User": "switchyard", "Restart": "on-failure", "NoNewPrivileges": "yes",
                "ProtectSystem": "strict", "PrivateTmp": "yes", "KillSignal": "SIGTERM",
                "WorkingDirectory": "/var/lib/switchyard", "StateDirectory": "switchyard"}
        bad = {k: unit_get(u, "Service", k) for k, v in want.items() if unit_get(u, "Service", k) != [v]}
        check(not bad, f"systemd: {name}: {', '.join(f'{k}={v}' for k, v in want.items())} ({bad or 'all set'})")
        check("-/etc/switchyard/env" in unit_get(u, "Service", "EnvironmentFile"),
              f"systemd: {name}: EnvironmentFile=-/etc/switchyard/env (optional)")
        check(bool(unit_get(u, "Service", "ReadWritePaths")) and bool(unit_get(u, "Service", "TimeoutStopSec")),
              f"systemd: {name}: ReadWritePaths= and TimeoutStopSec= set")
        check(unit_get(u, "Install", "WantedBy") == ["multi-user.target"], f"systemd: {name}: WantedBy=multi-user.target")
        ex = unit_get(u, "Service", "ExecStart")
        if not check(len(ex) == 1, f"systemd: {name}: one ExecStart="):
            continue
        argv = shlex.split(ex[0])
        binary = os.path.basename(argv[0])
        check(argv[0].startswith("/usr/local/bin/") and binary in targets,
              f"systemd: {name}: runs /usr/local/bin/{binary}, a CMake target")
        flags_known(binary, argv[1:], f"systemd: {name}")
        if role == "coordinator":
            check(argv[1:2] == ["/etc/switchyard/run.yaml"], f"systemd: {name}: the config is /etc/switchyard/run.yaml")
    if "coordinator" in parsed:
        u = parsed["coordinator"]
        helptext = sytest.run([os.path.join(BUILD, "switchyard-coordinator"), "--help"], capture_output=True,
                              text=True).stdout
        check("3 stopped early" in helptext and "2 bad usage" in helptext
              and unit_get(u, "Service", "SuccessExitStatus") == ["3"]
              and set(" ".join(unit_get(u, "Service", "RestartPreventExitStatus")).split()) == {"2", "3"},
              "systemd: coordinator: exit 3 (clean stop) counts as success, 2 and 3 are not restarted (as --help says)")
    if len(parsed) == 2:
        cx = unit_get(parsed["coordinator"], "Service", "ExecStart")[0]
        wx = unit_get(parsed["worker"], "Service", "ExecStart")[0]
        check("cluster.curve_server_key=/etc/switchyard/keys/coordinator.key" in cx
              and "cluster.curve_authorized_keys=/etc/switchyard/keys/authorized_workers" in cx
              and "--curve-server-public /etc/switchyard/keys/coordinator.pub" in wx
              and "--curve-key /etc/switchyard/keys/worker.key" in wx
              and cx.index("cluster.curve_server_key") < cx.index("$SY_COORDINATOR_ARGS"),
              "systemd: both units use CurveZMQ key files of /etc/switchyard/keys (SY_COORDINATOR_ARGS can override)")
        check(not any(re.search(r"token=|secret-key", x) for x in (cx, wx)), "systemd: no secret on an ExecStart line")
    if "worker" in parsed:
        ex = unit_get(parsed["worker"], "Service", "ExecStart")[0]
        check("--id %i" in ex and "-/etc/switchyard/worker-%i.env" in unit_get(parsed["worker"], "Service", "EnvironmentFile"),
              "systemd: worker@: the instance name is the worker id (--id %i), with its own optional env file")

    # systemd-analyze verify: with the binaries pointed at the build (it checks they exist)
    sa = shutil.which("systemd-analyze")
    if sa and parsed:
        vd = os.path.join(tmp, "units")
        os.makedirs(vd)
        for path in units.values():
            text = open(path).read().replace("/usr/local/bin/", BUILD + "/")
            open(os.path.join(vd, os.path.basename(path)), "w").write(text)
        r = sytest.run([sa, "verify", os.path.join(vd, "switchyard-coordinator.service"),
                        os.path.join(vd, "switchyard-worker@w0.service")], capture_output=True, text=True,
                       timeout=60, cwd=vd)
        noise = [ln for ln in (r.stdout + r.stderr).splitlines() if "switchyard" in ln]
        check(r.returncode == 0 and not noise, "systemd: `systemd-analyze verify` accepts both units"
              + (f" ({noise})" if noise else ""))
    else:
        print("skip: systemd-analyze not found: the INI check above is all")

    # the ExecStart lines, expanded as systemd does, run a real run: coordinator + worker@w0/@w1
    if len(parsed) < 2:
        return
    etc, wd = os.path.join(tmp, "etc"), os.path.join(tmp, "var-lib")
    os.makedirs(etc)
    os.makedirs(wd)
    keys = os.path.join(etc, "keys")  # as docs/deployment.md makes them
    os.makedirs(keys, mode=0o700)
    for k in ("coordinator", "worker"):
        r = sytest.run([SY, "keygen", os.path.join(keys, k)], capture_output=True, text=True, timeout=30)
        check(r.returncode == 0, f"systemd: switchyard keygen {k} {r.stderr.strip()}")
    with open(os.path.join(keys, "authorized_workers"), "w") as f:
        f.write(open(os.path.join(keys, "worker.pub")).read())
    cfg = os.path.join(etc, "run.yaml")
    shutil.copy(TINY, cfg)
    with open(os.path.join(etc, "env"), "w") as f:
        f.write("# test\nSY_COORDINATOR_ARGS=--expect-workers 2 " + " ".join(
            run_sets(tmp, 6, "sd", [("run.state_dir", "runs/sd"), ("checkpoint.store", "checkpoints"),
                                    ("cluster.bind", "tcp://127.0.0.1:0"), ("status.addr", "127.0.0.1:0")])) + "\n")

    def argv_of(role, env, instance=""):
        ex = unit_get(parsed[role], "Service", "ExecStart")[0]
        return [a.replace("/usr/local/bin/", BUILD + "/").replace("/etc/switchyard/", etc + "/")
                for a in expand_exec(ex, env, instance)]

    def env_files(role, instance=""):
        fs = [f[1:] if f.startswith("-") else f for f in unit_get(parsed[role], "Service", "EnvironmentFile")]
        fs = [f.replace("%i", instance).replace("/etc/switchyard/", etc + "/") for f in fs]
        return [f for f in fs if os.path.exists(f)]

    tag = tmp + "/systemd"
    base = dict(os.environ, **{MARK: tag})
    cenv = unit_env(parsed["coordinator"], env_files("coordinator"))
    coord = sytest.Popen(argv_of("coordinator", cenv), cwd=wd, env=dict(base, **cenv), stdout=subprocess.PIPE,
                         stderr=open(os.path.join(tmp, "systemd-coord.log"), "w"), text=True)
    ready = coord.stdout.readline()
    m = re.search(r"bind=(tcp://\S+)", ready)
    workers = []
    if check(m is not None, f"systemd: the coordinator's ExecStart starts it ({ready.strip()})"):
        for wid in ["w0", "w1"]:
            with open(os.path.join(etc, f"worker-{wid}.env"), "w") as f:
                f.write(f"SY_COORDINATOR={m.group(1)}\nSY_WORKER_ARGS=--threads 1\n")
            wenv = unit_env(parsed["worker"], env_files("worker", wid))
            workers.append(sytest.Popen(argv_of("worker", wenv, wid), cwd=wd, env=dict(base, **wenv),
                                        stderr=open(os.path.join(tmp, f"systemd-{wid}.log"), "w")))
    try:
        rc = coord.wait(timeout=60)
        wrc = [w.wait(timeout=20) for w in workers]
    except subprocess.TimeoutExpired:
        rc, wrc = None, None
    kill_marked(tag)
    metrics = jsonl(os.path.join(wd, "runs/sd/metrics.jsonl"))
    check(rc == 0 and wrc == [0, 0] and sorted({x["step"] for x in metrics}) == list(range(1, 7)),
          f"systemd: coordinator + worker@w0 + worker@w1 run 6 steps, state under WorkingDirectory "
          f"(exit {rc}, workers {wrc})")
    check(os.path.exists(os.path.join(wd, "checkpoints/sd/ckpt/step-000000006/MANIFEST.json")),
          "systemd: a relative checkpoint.store lands under /var/lib/switchyard (StateDirectory)")
    clog = tail(os.path.join(tmp, "systemd-coord.log"), 10 ** 6)
    check("control plane: CURVE on" in clog and all("control plane: CURVE" in tail(os.path.join(tmp, f"systemd-{w}.log"),
                                                                                   10 ** 6) for w in ("w0", "w1")),
          "systemd: the run used CurveZMQ with the key files (coordinator and both workers say so)")
    # SIGTERM (KillSignal) stops it with exit 3, which the unit counts as success
    coord = sytest.Popen(argv_of("coordinator", cenv), cwd=wd, env=dict(base, **cenv), stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    coord.stdout.readline()
    t = time.time()
    coord.send_signal(signal.SIGTERM)
    try:
        rc = coord.wait(timeout=30)
    except subprocess.TimeoutExpired:
        rc = None
    kill_marked(tag)
    check(rc == 3, f"systemd: SIGTERM stops the coordinator with exit 3 in {time.time() - t:.2f} s (TimeoutStopSec 30s)")


# --- Slurm -------------------------------------------------------------------------------------

def sbatch(tmp, tag, args, env=None, wait=True):
    e = dict(os.environ)
    e.update({"PATH": FAKE_SLURM + ":" + os.environ.get("PATH", ""), MARK: tag, "SLURM_JOB_ID": "4242",
              "SLURM_JOB_NODELIST": "localhost," + os.uname().nodename, "SLURM_JOB_NUM_NODES": "2",
              "SLURM_NNODES": "2", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1",
              "SLURM_CPUS_PER_TASK": "1", "SLURM_SUBMIT_DIR": tmp, "SY_BIN": BUILD,
              "FAKE_SLURM_LOG": f"{tmp}/fake-slurm.log", "SY_STOP_GRACE": "10"})
    e.update(env or {})
    log = open(f"{tmp}/sbatch-{len(glob.glob(tmp + '/sbatch-*'))}.log", "w")
    p = sytest.Popen(["bash", os.path.join(DEPLOY, "slurm", "switchyard.sbatch"), TINY] + args, env=e,
                     cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    p.logname = log.name
    if wait:
        try:
            p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
    return p


def wait_for(pred, timeout):
    t = time.time()
    while time.time() - t < timeout:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


def tail(path, n=1500):
    try:
        return open(path).read()[-n:]
    except OSError:
        return ""


def check_slurm(tmp):
    script = os.path.join(DEPLOY, "slurm", "switchyard.sbatch")
    if not check(os.path.exists(script), "slurm: switchyard.sbatch exists"):
        return
    text = open(script).read()
    directives = re.findall(r"^#SBATCH\s+(\S+)", text, re.M)
    check("--requeue" in directives and any(d.startswith("--signal=B:USR1") for d in directives),
          f"slurm: #SBATCH --requeue and --signal=B:USR1@... ({directives})")
    sc = shutil.which("shellcheck")
    if sc:
        files = [script] + [os.path.join(FAKE_SLURM, f) for f in ("srun", "scontrol")]
        r = sytest.run([sc, "-s", "bash", "-S", "warning"] + files, capture_output=True, text=True, timeout=60)
        check(r.returncode == 0, f"slurm: shellcheck -S warning is clean {r.stdout[-800:]}")
    flags_known("switchyard-coordinator", ["--bind", "--status-addr", "--expect-workers", "--set"],
                "slurm: the coordinator's flags")
    used = set(re.findall(r"--(?:coordinator|id|data-bind|threads|curve-server-public|curve-key|insecure)\b", text))
    flags_known("switchyard-worker", sorted(used), "slurm: the worker's flags")

    # 1. a run: 2 nodes x 1 worker
    tag = tmp + "/slurm1"
    t = time.time()
    p = sbatch(tmp, tag, run_sets(tmp, 6, "sl"))
    left = marked_pids(tag)
    kill_marked(tag)
    ev = jsonl(f"{tmp}/state-sl/events.jsonl")
    steps = sorted({m["step"] for m in jsonl(f"{tmp}/state-sl/metrics.jsonl")})
    ok = check(p.returncode == 0, f"slurm: 2-node job exits 0 in {time.time() - t:.1f} s"
               + ("" if p.returncode == 0 else f" (exit {p.returncode}) {tail(p.logname)}"))
    check(steps == list(range(1, 7)), f"slurm: metrics.jsonl has every step 1..6 ({steps})")
    gens = [e for e in ev if e.get("event") == "generation_opened"]
    check(len(gens) == 1 and gens[0]["world"] == 2 and sorted(gens[0]["workers"]) == ["w0", "w1"],
          f"slurm: one generation of world 2, workers w0 w1 (= SLURM_PROCID) "
          f"({[(g['world'], g['workers']) for g in gens]})")
    tasks = [ln.split() for ln in open(f"{tmp}/fake-slurm.log") if ln.startswith("srun task")] \
        if os.path.exists(f"{tmp}/fake-slurm.log") else []
    check(sorted((t_[2], t_[3], t_[5]) for t_ in tasks) == [("0", "0", "localhost"), ("1", "1", os.uname().nodename)],
          f"slurm: srun started one task on each of the 2 nodes ({tasks})")
    check(ok and not left, f"slurm: no process left behind ({left})")
    out = tail(p.logname, 10 ** 6)
    check("control plane: CURVE on" in out and "CurveZMQ: " + tmp + "/.switchyard-keys.4242" in out,
          "slurm: the job made its own CurveZMQ keys in the submit directory and the coordinator used them")
    check(not glob.glob(f"{tmp}/.switchyard-keys.*"), "slurm: the job's key folder is removed at the end")
    check(all(x in text for x in ('keygen "$SY_KEYS/coordinator"', 'keygen "$SY_KEYS/worker"', "umask 077",
                                  '--curve-key "$SY_KEYS/worker.key"', "-K -"))
          and '-H "Authorization' not in text,
          "slurm: the script generates keys (switchyard keygen, umask 077), gives the workers --curve-key, "
          "and sends the token to curl on stdin")

    # 2. resubmitted with 2 workers per node and more steps: resumes from step 6 with world 4
    tag = tmp + "/slurm2"
    p = sbatch(tmp, tag, run_sets(tmp, 10, "sl"), {"SY_WORKERS_PER_NODE": "2"})
    left = marked_pids(tag)
    kill_marked(tag)
    ev = jsonl(f"{tmp}/state-sl/events.jsonl")
    ms = jsonl(f"{tmp}/state-sl/metrics.jsonl")
    started = [e for e in ev if e.get("event") == "coordinator_started"]
    gens = [e for e in ev if e.get("event") == "generation_opened"]
    check(p.returncode == 0 and started and started[-1].get("latest_checkpoint") == 6,
          f"slurm: the resubmitted job resumes from the step-6 checkpoint (exit {p.returncode}, "
          f"latest_checkpoint {started[-1].get('latest_checkpoint') if started else None})"
          + ("" if p.returncode == 0 else tail(p.logname)))
    check(gens and gens[-1]["world"] == 4 and gens[-1].get("restore_step") == 6
          and sorted(gens[-1]["workers"]) == ["w0", "w1", "w2", "w3"],
          f"slurm: SY_WORKERS_PER_NODE=2 gives a generation of world 4 from step 6 "
          f"({[(g['world'], g.get('restore_step')) for g in gens[-1:]]})")
    check(sorted({m["step"] for m in ms}) == list(range(1, 11)) and all(m["world"] == 4 for m in ms if m["step"] > 6),
          "slurm: metrics.jsonl has every step 1..10, steps 7..10 with world 4")
    check(not left, f"slurm: no process left behind after the resubmitted job ({left})")

    # 3. a worker crash (restarted by its task under the same id), then scancel (SIGTERM)
    tag = tmp + "/slurm3"
    p = sbatch(tmp, tag, run_sets(tmp, 100000, "cancel", [("checkpoint.every", "1000")]), wait=False)
    state = f"{tmp}/state-cancel"
    check(wait_for(lambda: len(jsonl(f"{state}/metrics.jsonl")) >= 2, 30), "slurm: the long job trains")

    def worker_pid(wid):
        for pid in marked_pids(tag):
            try:
                argv = open(f"/proc/{pid}/cmdline").read().split("\0")
            except OSError:
                continue
            if os.path.basename(argv[0]) == "switchyard-worker" and f"--id\0{wid}\0" in "\0".join(argv) + "\0":
                return pid
        return None

    pid = worker_pid("w1")
    if pid:
        os.kill(pid, signal.SIGKILL)
    joined = lambda: sum(1 for e in jsonl(f"{state}/events.jsonl")  # noqa: E731
                         if e.get("event") == "worker_joined" and e.get("worker") == "w1")
    check(pid is not None and wait_for(lambda: joined() >= 2 and "restart 1 of 3" in tail(p.logname, 100000), 15),
          "slurm: a worker killed with SIGKILL is restarted by its task and rejoins under the same id")
    n = len(jsonl(f"{state}/metrics.jsonl"))
    wait_for(lambda: len(jsonl(f"{state}/metrics.jsonl")) > n, 15)
    t = time.time()
    p.send_signal(signal.SIGTERM)
    try:
        rc = p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        rc = None
    dt = time.time() - t
    time.sleep(0.3)
    left = marked_pids(tag)
    kill_marked(tag)
    ev = jsonl(f"{state}/events.jsonl")
    check(rc == 3 and any(e.get("event") == "run_stopped" for e in ev),
          f"slurm: SIGTERM (scancel) stops the run cleanly: exit {rc} in {dt:.1f} s, run_stopped recorded")
    check(not left, f"slurm: no process left behind after SIGTERM ({left})")

    # 4. SIGUSR1 before the time limit: a checkpoint, `scontrol requeue`, a clean stop
    tag = tmp + "/slurm4"
    p = sbatch(tmp, tag, run_sets(tmp, 100000, "usr1", [("checkpoint.every", "1000")]),
               {"SY_STATUS_TOKEN": "t0ken-for-the-test", "SY_CKPT_GRACE": "20"}, wait=False)
    state = f"{tmp}/state-usr1"
    check(wait_for(lambda: len(jsonl(f"{state}/metrics.jsonl")) >= 2, 30), "slurm: the USR1 job trains")
    p.send_signal(signal.SIGUSR1)
    try:
        rc = p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        rc = None
    time.sleep(0.3)
    left = marked_pids(tag)
    kill_marked(tag)
    ev = jsonl(f"{state}/events.jsonl")
    log = open(f"{tmp}/fake-slurm.log").read() if os.path.exists(f"{tmp}/fake-slurm.log") else ""
    committed = [e["step"] for e in ev if e.get("event") == "checkpoint_committed"]
    check(rc == 3 and "scontrol requeue 4242" in log and committed,
          f"slurm: SIGUSR1 commits a checkpoint (steps {committed}), requeues the job and stops (exit {rc})"
          + ("" if rc == 3 else tail(p.logname)))
    check(not left, f"slurm: no process left behind after SIGUSR1 ({left})")


# --- Kubernetes --------------------------------------------------------------------------------

def check_k8s(tmp):
    try:
        import yaml
    except ImportError:
        check(False, "k8s: PyYAML is needed (python3-yaml: python3-torch of deploy/install-deps.sh depends on it)")
        return
    d = os.path.join(DEPLOY, "k8s")
    docs = []
    for f in sorted(glob.glob(os.path.join(d, "*.yaml"))):
        try:
            for doc in yaml.safe_load_all(open(f)):
                if doc is not None:
                    docs.append((os.path.basename(f), doc))
        except yaml.YAMLError as e:
            check(False, f"k8s: {os.path.basename(f)} parses: {e}")
    api = {"ConfigMap": "v1", "Secret": "v1", "Service": "v1", "Deployment": "apps/v1", "StatefulSet": "apps/v1",
           "Kustomization": "kustomize.config.k8s.io/v1beta1"}
    bad = [(f, x.get("kind"), x.get("apiVersion")) for f, x in docs if api.get(x.get("kind")) != x.get("apiVersion")]
    check(docs and not bad, f"k8s: {len(docs)} YAML documents parse, each a known kind with its apiVersion {bad or ''}")
    by = {}
    for f, x in docs:
        if x["kind"] != "Kustomization":
            by[(x["kind"], x["metadata"]["name"])] = x
    cm = by.get(("ConfigMap", "switchyard-run"))
    dep = by.get(("Deployment", "switchyard-coordinator"))
    svc = by.get(("Service", "switchyard-coordinator"))
    sts = by.get(("StatefulSet", "switchyard-worker"))
    sec = by.get(("Secret", "switchyard-secrets"))
    if not check(all([cm, dep, svc, sts, sec]), "k8s: ConfigMap, Secret, coordinator Deployment + Service, worker StatefulSet"):
        return
    check(dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate",
          "k8s: coordinator Deployment: replicas 1, strategy Recreate")

    def labels_match(sel, labels):
        return bool(sel) and all(labels.get(k) == v for k, v in sel.items())

    for x, what in [(dep, "Deployment"), (sts, "StatefulSet")]:
        check(labels_match(x["spec"]["selector"]["matchLabels"], x["spec"]["template"]["metadata"]["labels"]),
              f"k8s: {what} selector matches its pod labels")
    check(labels_match(svc["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])
          and not labels_match(svc["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"]),
          "k8s: the coordinator Service selects the coordinator pod and not the workers")
    hl = by.get(("Service", sts["spec"].get("serviceName")))
    check(hl is not None and hl["spec"].get("clusterIP") == "None", "k8s: the StatefulSet's serviceName is a headless Service")

    targets = cmake_targets()
    secret_keys = set(sec.get("stringData", {})) | set(sec.get("data", {}))
    conts = {}
    for x, what in [(dep, "coordinator"), (sts, "worker")]:
        pod = x["spec"]["template"]["spec"]
        c = pod["containers"][0]
        conts[what] = c
        cmd = c.get("command", []) + c.get("args", [])
        check(cmd and cmd[0] in targets, f"k8s: {what} container runs {cmd[:1]}, a CMake target")
        flags_known(cmd[0], cmd[1:], f"k8s: {what} container")
        env_names = {e["name"] for e in c.get("env", [])}
        if any(r.get("secretRef", {}).get("name") == "switchyard-secrets" for r in c.get("envFrom", [])):
            env_names |= secret_keys
        refs = set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", " ".join(cmd)))
        check(refs <= env_names, f"k8s: {what}: every $(VAR) of the command is defined ({sorted(refs)})")
        check(pod.get("securityContext", {}).get("runAsNonRoot") is True
              and c.get("securityContext", {}).get("allowPrivilegeEscalation") is False,
              f"k8s: {what} runs as non-root without privilege escalation")
        check("cpu" in c.get("resources", {}).get("limits", {}), f"k8s: {what} has CPU requests/limits")
    check(conts["coordinator"]["image"] == conts["worker"]["image"], "k8s: one image for coordinator and workers")
    wenv = {e["name"]: e for e in conts["worker"].get("env", [])}
    wcmd = conts["worker"]["command"]
    ccmd = conts["coordinator"]["command"]

    def arg(cmd, flag):
        return cmd[cmd.index(flag) + 1] if flag in cmd and cmd.index(flag) + 1 < len(cmd) else None

    check(arg(wcmd, "--id") == "$(POD_NAME)" and wenv.get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {})
          .get("fieldPath") == "metadata.name", "k8s: worker --id is the pod name (stable: StatefulSet)")
    check(arg(wcmd, "--data-bind") == "tcp://$(POD_IP):*" and wenv.get("POD_IP", {}).get("valueFrom", {})
          .get("fieldRef", {}).get("fieldPath") == "status.podIP", "k8s: worker --data-bind tcp://$(POD_IP):* (downward API)")
    check(arg(ccmd, "--expect-workers") == str(sts["spec"]["replicas"]),
          f"k8s: coordinator --expect-workers = StatefulSet replicas ({sts['spec']['replicas']})")

    # the ConfigMap's config, as the coordinator will read it
    cfgtext = cm["data"].get("run.yaml", "")
    mounts = {m["name"]: m["mountPath"] for m in conts["coordinator"].get("volumeMounts", [])}
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"].get("volumes", [])}
    cfgvol = [n for n, v in vols.items() if v.get("configMap", {}).get("name") == "switchyard-run"]
    check(cfgvol and ccmd[1] == os.path.join(mounts.get(cfgvol[0], "?"), "run.yaml"),
          f"k8s: the coordinator reads the ConfigMap's run.yaml where it is mounted ({ccmd[1]})")
    cf = os.path.join(tmp, "k8s-run.yaml")
    open(cf, "w").write(cfgtext)
    r = sytest.run([SY, "config", "show", cf], capture_output=True, text=True, timeout=30)
    if not check(r.returncode == 0, f"k8s: `switchyard config show` accepts the ConfigMap's config {r.stderr.strip()}"):
        return
    cfg = json.loads(r.stdout)
    check(cfg["checkpoint"]["store"].startswith("s3://"), f"k8s: checkpoint.store is object storage ({cfg['checkpoint']['store']})")
    bind_port = int(cfg["cluster"]["bind"].rsplit(":", 1)[1])
    status_host, status_port = cfg["status"]["addr"].rsplit(":", 1)
    cports = {p["name"]: p["containerPort"] for p in conts["coordinator"].get("ports", [])}
    sports = {p["name"]: (p["port"], cports.get(p.get("targetPort"), p.get("targetPort"))) for p in svc["spec"]["ports"]}
    check(sports.get("control") == (bind_port, bind_port) and sports.get("status") == (int(status_port), int(status_port)),
          f"k8s: Service ports control/status = cluster.bind {bind_port} / status.addr {status_port} ({sports})")
    check(not cfg["cluster"]["bind"].startswith("tcp://127.") and status_host not in ("127.0.0.1", "localhost"),
          "k8s: the config binds the pod's interfaces, not loopback")
    check(arg(wcmd, "--coordinator") == f"tcp://{svc['metadata']['name']}:{sports.get('control', (0,))[0]}",
          f"k8s: workers connect to the coordinator Service's control port ({arg(wcmd, '--coordinator')})")
    state_mount = [m for m in mounts.values() if cfg["run"]["state_dir"].startswith(m + "/")]
    check(bool(state_mount), f"k8s: run.state_dir {cfg['run']['state_dir']} is on a writable volume")

    # CurveZMQ out of the box: the keys are files of the Secret switchyard-curve, copied 0600 by
    # an init container into a volume the main container reads; each pod gets only its keys
    curve = by.get(("Secret", "switchyard-curve"))
    check(curve is not None and {"coordinator.key", "coordinator.pub", "worker.key", "authorized_workers"}
          <= set(curve.get("stringData", {})), "k8s: secret.example.yaml shows the Secret switchyard-curve (4 key files)")

    def key_volume(x, c, path):
        """The Secret items behind `path` of container c, through an init container's copy."""
        pod = x["spec"]["template"]["spec"]
        vols_ = {v["name"]: v for v in pod.get("volumes", [])}
        mnt = [m for m in c.get("volumeMounts", []) if path.startswith(m["mountPath"] + "/")]
        if not mnt:
            return None
        for ic in pod.get("initContainers", []):
            outs = [m for m in ic.get("volumeMounts", []) if m["name"] == mnt[0]["name"]]
            ins = [vols_.get(m["name"], {}).get("secret", {}) for m in ic.get("volumeMounts", [])]
            ins = [v for v in ins if v.get("secretName") == "switchyard-curve"]
            if outs and ins and "chmod 600" in " ".join(ic.get("command", [])):
                return {i["path"] for i in ins[0].get("items", [])}
        return None

    ck, ak = cfg["cluster"]["curve_server_key"], cfg["cluster"]["curve_authorized_keys"]
    citems = key_volume(dep, conts["coordinator"], ck) if ck else None
    check(citems == {os.path.basename(ck), os.path.basename(ak)},
          f"k8s: the ConfigMap sets cluster.curve_server_key and curve_authorized_keys, files of the Secret copied "
          f"0600 by the coordinator's init container ({ck}, {ak}: {citems})")
    wk, wp = arg(wcmd, "--curve-key"), arg(wcmd, "--curve-server-public")
    witems = key_volume(sts, conts["worker"], wk) if wk else None
    check(wk and wp and witems == {os.path.basename(wk), os.path.basename(wp)},
          f"k8s: workers get --curve-key and --curve-server-public, files of the Secret copied 0600 by their init "
          f"container, and not the coordinator's secret key ({witems})")

    kubectl = shutil.which("kubectl")
    if kubectl:
        r = sytest.run([kubectl, "kustomize", d], capture_output=True, text=True, timeout=60)
        kinds = sorted(re.findall(r"^kind: (\w+)", r.stdout, re.M))
        check(r.returncode == 0 and kinds == ["ConfigMap", "Deployment", "Service", "Service", "StatefulSet"],
              f"k8s: `kubectl kustomize deploy/k8s` builds {kinds} {r.stderr.strip()[-300:]}")
    else:
        print("skip: kubectl not found")


# --- container ---------------------------------------------------------------------------------

def install_deps_pkgs():
    text = open(os.path.join(DEPLOY, "install-deps.sh")).read()
    block = re.search(r"PKGS=\((.*?)\n\)", text, re.S).group(1)
    return {w for line in block.splitlines() for w in line.split("#")[0].split()}


def check_container(tmp):
    df = os.path.join(DEPLOY, "container", "Dockerfile")
    if not check(os.path.exists(df), "container: Dockerfile exists"):
        return
    text = re.sub(r"\\\n", " ", open(df).read())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    froms = [ln.split()[1] for ln in lines if ln.upper().startswith("FROM ")]
    check(len(froms) >= 2 and all(re.fullmatch(r"debian:12(-slim)?", f) for f in froms),
          f"container: a multi-stage build on Debian 12 ({froms})")
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    targets = cmake_targets()
    missing = []
    for ln in lines:
        if ln.upper().startswith("COPY ") and "--from=" not in ln:
            for s in shlex.split(ln)[1:-1]:
                if not s.startswith("--") and not glob.glob(os.path.join(SRC, s)):
                    missing.append(s)
    check(not missing, f"container: every COPY source exists in the repository {missing or ''}")
    copied = [os.path.basename(s) for ln in lines if "--from=" in ln for s in shlex.split(ln)[2:-1]]
    check(copied and set(copied) <= targets, f"container: the binaries copied from the build stage are CMake targets ({copied})")
    ep = [ln for ln in lines if ln.upper().startswith("ENTRYPOINT")]
    check(len(ep) == 1 and json.loads(ep[0].split(None, 1)[1]) == ["switchyard"] and "switchyard" in targets,
          f"container: ENTRYPOINT [\"switchyard\"], a CMake target ({ep})")
    users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
    check(users and users[-1] not in ("root", "0"), f"container: runs as a non-root user ({users})")

    def apt_pkgs(stage):
        m = re.search(r"apt-get install ([^&]*)", stage)
        return [w for w in (m.group(1).split() if m else []) if not w.startswith("-")]

    deps = install_deps_pkgs()
    build_pkgs = apt_pkgs(stages[0])
    check(build_pkgs and set(build_pkgs) <= deps,
          f"container: the build stage's packages are deploy/install-deps.sh's ({sorted(set(build_pkgs) - deps) or 'all'})")
    bs = open(os.path.join(DEPLOY, "build.sh")).read()
    conf = re.search(r"cmake -S \. -B build ([^>\n]*)", bs)
    check(conf and conf.group(0).strip() in stages[0], f"container: configured as deploy/build.sh does ({conf.group(0) if conf else None})")
    run_pkgs = set(apt_pkgs(stages[-1]))
    # every shared library the binaries load comes from a package of the runtime stage
    if shutil.which("readelf") and shutil.which("dpkg"):
        need = set()
        for b in sorted(copied):
            r = sytest.run(["readelf", "-d", os.path.join(BUILD, b)], capture_output=True, text=True)
            need |= set(re.findall(r"\(NEEDED\).*\[(.*)\]", r.stdout))
        # a sanitizer build (SY_SANITIZE=ON) links the sanitizer runtimes; the image never does
        need = {lib for lib in need if not re.match(r"lib(a|ub|t|l)san\.so", lib)}
        ldd = {}
        for b in sorted(copied):
            for m in re.finditer(r"^\s*(\S+) => (\S+)", sytest.run(["ldd", os.path.join(BUILD, b)],
                                 capture_output=True, text=True).stdout, re.M):
                ldd[m.group(1)] = m.group(2)
        lack = []
        for lib in sorted(need):
            path = ldd.get(lib)
            r = sytest.run(["dpkg", "-S", os.path.realpath(path) if path else lib], capture_output=True, text=True)
            if r.returncode != 0 and path:
                r = sytest.run(["dpkg", "-S", path], capture_output=True, text=True)
            pkg = r.stdout.split(":", 1)[0] if r.returncode == 0 else None
            if pkg != "libc6" and pkg not in run_pkgs:
                lack.append(f"{lib} ({pkg})")
        check(not lack, f"container: the runtime stage installs the package of each of the {len(need)} libraries "
              f"the binaries load {lack or ''}")
        r = sytest.run(["dpkg-query", "-W", "-f=${Package}\\n"] + sorted(run_pkgs), capture_output=True, text=True)
        check(r.returncode == 0, "container: every runtime package exists in Debian 12 (installed here by install-deps.sh)"
              + (f" {r.stderr.strip()}" if r.returncode else ""))
    else:
        print("skip: readelf/dpkg not found: runtime libraries not checked")
    ign = os.path.join(DEPLOY, "container", "Dockerfile.dockerignore")
    check(os.path.exists(ign) and "build" in open(ign).read().split(), "container: Dockerfile.dockerignore keeps build/ out")
    print("note: the image is not built here (no Docker daemon); see docs/deployment.md")


def check_docs():
    doc = os.path.join(SRC, "docs", "deployment.md")
    if not check(os.path.exists(doc), "docs/deployment.md exists"):
        return
    text = open(doc).read()
    files = sorted(os.path.relpath(f, SRC) for sub in ("systemd", "slurm", "k8s", "container")
                   for f in glob.glob(os.path.join(DEPLOY, sub, "*")))
    missing = [f for f in files if os.path.basename(f) not in text]
    check(not missing, f"docs/deployment.md names every deploy file ({len(files)}) {missing or ''}")


def main():
    t0 = time.time()
    tmp = sytest.make_tmp("sy-deploy-")
    try:
        make_corpus(tmp)
        for part in (check_systemd, check_slurm, check_k8s, check_container):
            try:
                part(tmp)
            except Exception as e:  # a broken file must fail its part, not hide the others
                check(False, f"{part.__name__}: {type(e).__name__}: {e}")
        check_docs()
    finally:
        kill_marked(tmp + "/systemd")
        for i in range(1, 5):
            kill_marked(tmp + f"/slurm{i}")
    print(f"{len(failures)} failed ({time.time() - t0:.1f} s)")
    if not failures:
        sytest.remove_tmp(tmp)
    else:
        print(f"files kept in {tmp}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
