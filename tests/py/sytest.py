"""Helpers shared by the Python system tests (tests/py/test_*.py, run by ctest with SY_BUILD and
SY_SRC in the environment; see tests/CMakeLists.txt).

- Paths: BUILD, SRC, the binaries SY (`switchyard`), COORD, WORKER, tool(name) for a helper
  program of tests/tools/, and CFG (configs/tiny.yaml).
- check(cond, msg): prints "ok: msg" or "FAIL: msg", records failures in `failures` (the same
  list as check.failures) and returns cond.
- metrics(tmp, name) / metric_lines(tmp, name): a run's RUN.state_dir = tmp/state-<name>
  metrics.jsonl, by step (the last line of a step wins: re-runs after a restore append) or as
  the list of lines; jsonl(path) reads any such file.
- make_tmp(prefix) / remove_tmp(tmp): a fresh folder under $TMPDIR, and its removal.
- wait_exit(p, timeout, log=None): p's exit status, or None after timeout seconds; then it
  prints what the process was doing (the tail of its log file, each thread's backtrace when
  gdb is installed, else each thread's kernel wait channel) so that a hang seen only in CI
  leaves its cause in the CI output.
- Popen(...) and run(...): the protected spawn, the same arguments as subprocess.Popen and
  subprocess.run. Every process a test starts goes through them, so none outlives the test:
    * the child gets PR_SET_PDEATHSIG = SIGKILL (it dies when the test process dies, even by
      SIGKILL, e.g. a ctest time-out; the signal follows the thread that started the child, so
      start processes from the main thread);
    * it leads a process group of its own, which run() kills on a time-out or an error;
    * every child, and every process it starts, carries this test's SY_TEST_SPAWN mark in its
      environment;
    * at exit (normal, failure, uncaught exception, SIGTERM or SIGHUP) every child still
      running is killed with its process group (SIGCONT then SIGKILL), and so is every process
      that still carries the mark (grandchildren that left the group, like the workers of
      `switchyard run`, or lost their parent);
    * a reaper process, started at import, does the same once the test process is gone however
      it ended (also SIGKILL, where no exit handler runs).
"""
import atexit
import ctypes
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid

SRC = os.path.abspath(os.environ.get("SY_SRC", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")))
BUILD = os.path.abspath(os.environ.get("SY_BUILD", os.path.join(SRC, "build")))
SY = os.path.join(BUILD, "switchyard")
COORD = os.path.join(BUILD, "switchyard-coordinator")
WORKER = os.path.join(BUILD, "switchyard-worker")
CFG = os.path.join(SRC, "configs", "tiny.yaml")


def tool(name):
    """A helper program of tests/tools/ (built as BUILD/tests/<name>)."""
    return os.path.join(BUILD, "tests", name)


# -- check ----------------------------------------------------------------------------------------
class Checker:
    def __init__(self):
        self.failures = []

    def __call__(self, cond, msg):
        print(f"{'ok' if cond else 'FAIL'}: {msg}", flush=True)
        if not cond:
            self.failures.append(msg)
        return cond


check = Checker()
failures = check.failures


# -- run outputs ----------------------------------------------------------------------------------
def jsonl(path):
    """Every non-empty line of a JSON-lines file, parsed ([] if the file is missing)."""
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    out.append(json.loads(line))
    return out


def metric_lines(tmp, name):
    return jsonl(f"{tmp}/state-{name}/metrics.jsonl")


def metrics(tmp, name):
    """step → the last metrics line of that step."""
    return {m["step"]: m for m in metric_lines(tmp, name)}


# -- temporary folders ----------------------------------------------------------------------------
# Folders of make_tmp are removed when the test process ends without a failed check and without
# an uncaught exception (a cluster test leaves hundreds of MB behind); a failing test keeps them
# for a look, as does SY_KEEP_TMP=1.
_tmps = []
_crashed = []


def make_tmp(prefix):
    d = tempfile.mkdtemp(prefix=prefix)
    _tmps.append(d)
    return d


def remove_tmp(tmp):
    if os.environ.get("SY_KEEP_TMP") != "1":  # SY_KEEP_TMP=1 keeps every folder for a look
        shutil.rmtree(tmp, ignore_errors=True)


def _excepthook(tp, value, tb, _prev=sys.excepthook):
    if not issubclass(tp, SystemExit):
        _crashed.append(tp)
    _prev(tp, value, tb)


sys.excepthook = _excepthook


_bad_exit = []
_real_exit = sys.exit


def _exit(code=0):
    if code not in (0, None, 77):
        _bad_exit.append(code)
    _real_exit(code)


sys.exit = _exit


def _remove_tmps():
    if check.failures or _crashed or _bad_exit or os.environ.get("SY_KEEP_TMP") == "1":
        if _tmps:
            print(f"(kept for a look: {' '.join(_tmps)})", flush=True)
        return
    for d in _tmps:
        shutil.rmtree(d, ignore_errors=True)


# -- protected spawn ------------------------------------------------------------------------------
MARK = "SY_TEST_SPAWN"
_token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
os.environ[MARK] = _token  # inherited by every child, and by their children
_children = []
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent():
    _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def Popen(args, **kw):
    """subprocess.Popen whose child (and its process group) dies with the test."""
    env = kw.get("env")
    if env is not None:
        kw["env"] = dict(env, **{MARK: _token})
    user_fn = kw.pop("preexec_fn", None)

    def pre():
        _die_with_parent()
        if user_fn:
            user_fn()
    kw.setdefault("start_new_session", True)
    p = subprocess.Popen(args, preexec_fn=pre, **kw)
    _children.append(p)
    return p


def _kill_group(p):
    """SIGCONT + SIGKILL to p's process group while p is not reaped (its pid, hence its group id,
    cannot have been reused), else to p alone if it is still running."""
    if p.returncode is not None:
        return
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass


def wait_exit(p, timeout, log=None):
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    print(f"pid {p.pid} ({os.path.basename(str(p.args[0]))}) still running after {timeout} s", flush=True)
    if log and os.path.exists(log):
        with open(log, errors="replace") as f:
            tail = f.readlines()[-40:]
        print(f"--- the last {len(tail)} lines of {log}:\n" + "".join(tail) + "---", flush=True)
    gdb = shutil.which("gdb")
    if gdb:
        r = subprocess.run([gdb, "-batch", "-nx", "-p", str(p.pid), "-ex", "thread apply all bt"],
                           capture_output=True, text=True, timeout=60)
        print("--- its threads (gdb):\n" + "\n".join(l for l in r.stdout.splitlines()
                                                    if l.startswith(("Thread", "#"))) + "\n---", flush=True)
    else:
        try:
            for t in sorted(os.listdir(f"/proc/{p.pid}/task")):
                with open(f"/proc/{p.pid}/task/{t}/wchan") as f, open(f"/proc/{p.pid}/task/{t}/comm") as g:
                    print(f"thread {t} ({g.read().strip()}): waits in {f.read().strip() or '-'}", flush=True)
        except OSError:
            pass
    return None


def run(args, *, input=None, capture_output=False, timeout=None, check=False, **kw):
    """subprocess.run through Popen(): on a time-out (TimeoutExpired, as subprocess.run) or any
    other error the child's whole process group is killed."""
    if input is not None:
        kw["stdin"] = subprocess.PIPE
    if capture_output:
        kw["stdout"] = kw["stderr"] = subprocess.PIPE
    with Popen(args, **kw) as p:
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(p)
            p.wait()
            raise  # as subprocess.run on POSIX: .stdout/.stderr hold the bytes read so far
        except BaseException:
            _kill_group(p)
            raise
    r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    if check:
        r.check_returncode()
    return r


def kill_marked(mark):
    """SIGCONT + SIGKILL to every process (but this one) whose environment holds `mark`
    ("NAME=value"). Self-contained: the reaper runs its source."""
    import os
    import signal
    want = mark.encode()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if want not in f.read().split(b"\0"):
                    continue
            os.kill(int(d), signal.SIGCONT)
            os.kill(int(d), signal.SIGKILL)
        except OSError:
            pass


def kill_all():
    """Kills every child still running with its process group, then every marked process left."""
    for p in _children:
        if p.poll() is None:
            _kill_group(p)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
    kill_marked(f"{MARK}={_token}")


def _on_signal(sig, frame):
    kill_all()
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)  # die of the same signal, as before


def _start_reaper():
    """A process in a session of its own, without the mark, that waits for the test process to
    end however it ends (also SIGKILL, where no exit handler runs), then kills what still carries
    the mark. It holds the read end of a pipe whose only write end this process keeps open (not
    inherited by children): end of file means the test is gone."""
    r, w = os.pipe()
    env = {k: v for k, v in os.environ.items() if k != MARK}
    code = inspect.getsource(kill_marked) + ("import sys, time\n"
                                             "sys.stdin.buffer.read()\n"
                                             "kill_marked(sys.argv[1])\n"
                                             "time.sleep(1)\n"
                                             "kill_marked(sys.argv[1])\n")
    subprocess.Popen([sys.executable, "-c", code, f"{MARK}={_token}"], stdin=r, env=env, start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(r)
    return w


_reaper_pipe = _start_reaper()
atexit.register(_remove_tmps)  # runs after kill_all (atexit runs last-registered first)
atexit.register(kill_all)
for _sig in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(_sig, _on_signal)
