#!/usr/bin/env python3
"""The Switch Transformer paper in miniature, on the default corpus (issue 15 part 4).

Trains the tiny model with `switchyard train` several ways and writes docs/model-quality.md
with its plots (docs/model-quality/*.png):

  scaling    dense (configs/tiny-dense.yaml) against Switch with 8, 16 and 32 experts at equal
             FLOPs per token (top-1 routing: each token runs one expert MLP of the dense MLP's
             size): validation loss against steps and against training time, and the speed-up
             in steps (and in time) to reach the dense model's final loss (paper Figure 1,
             Table 1 in small);
  precision  bf16 emulation with the router in bf16 (model.router_precision=bf16, an ablation
             only) against the selective-precision recipe (fp32 router) (paper Table 2);
  init       init_scale 0.1 against 1.0 over 3 seeds (paper Table 3);
  defaults   the tiny configs' previous defaults against the current ones (loss and drop rate).

Every run: `switchyard train configs/tiny.yaml` (or tiny-dense.yaml) with --set overrides, the
same data order and seed unless stated; validation every EVAL_EVERY steps over EVAL_BATCHES
micro-batches of data.val (train.eval_every / train.eval_batches), and the final checkpoint
evaluated over the whole of data.val with `switchyard eval`. Training time is the sum of the
steps' step_ms (validation excluded). About 23 minutes on 2 idle cores.

usage: /usr/bin/python3 bench/model_quality.py [--build build] [--steps 600] [--only scaling,...]
                                       [--work DIR] [--no-doc]
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_EVERY = 50
EVAL_BATCHES = 32
# The tiny configs' defaults before issue 15 part 5 (they spiked after warm-up).
OLD_DEFAULTS = {"train.lr": "3e-3", "train.lr_min": "3e-4", "train.warmup_steps": "20"}


def sh(args, **kw):
    return subprocess.run(args, check=False, text=True, capture_output=True, **kw)


class Runner:
    def __init__(self, build, work, steps):
        self.sy = os.path.join(build, "switchyard")
        self.work = work
        self.steps = steps
        self.results = {}
        self.date = time.strftime('%Y-%m-%d', time.gmtime())

    def train(self, name, config="configs/tiny.yaml", sets=None):
        """One training run; returns its record (metrics lines, final full-validation loss)."""
        if name in self.results:
            return self.results[name]
        state = os.path.join(self.work, name)
        shutil.rmtree(state, ignore_errors=True)
        os.makedirs(state)
        s = {"run.name": name, "run.steps": str(self.steps), "run.state_dir": state,
             "checkpoint.store": os.path.join(state, "store"), "checkpoint.every": "0",
             "train.eval_every": str(EVAL_EVERY), "train.eval_batches": str(EVAL_BATCHES)}
        s.update(sets or {})
        args = [self.sy, "train", os.path.join(ROOT, config), "--quiet"]
        for k, v in s.items():
            args += ["--set", f"{k}={v}"]
        t0 = time.time()
        r = sh(args, cwd=ROOT)
        wall = time.time() - t0
        lines = []
        if os.path.exists(f"{state}/metrics.jsonl"):
            with open(f"{state}/metrics.jsonl") as f:
                lines = [json.loads(l) for l in f if l.strip()]
        rec = {"name": name, "config": config, "sets": s, "ok": r.returncode == 0, "wall_s": wall,
               "lines": lines, "stderr": r.stderr[-2000:], "log_head": r.stderr[:2000], "final_val": None}
        if r.returncode == 0:
            e = sh([self.sy, "eval", "--checkpoint", f"{state}/store/{name}", "--data",
                    os.path.join(ROOT, "data/fortunes/val_*.bin")], cwd=ROOT)
            if e.returncode == 0:
                rec["final_val"] = json.loads(e.stdout)["loss"]
        status = "ok" if rec["ok"] else "FAILED: " + r.stderr.strip().splitlines()[-1][:200] if r.stderr.strip() else "FAILED"
        print(f"  {name}: {len(lines)} steps, {wall:.0f} s, final val {rec['final_val']}, {status}", flush=True)
        self.results[name] = rec
        return rec


# -- derived numbers ------------------------------------------------------------------------------
def series(rec, key):
    return [(l["step"], l[key]) for l in rec["lines"] if key in l]


def moving_avg(vals, n=25):
    out, acc = [], 0.0
    for i, v in enumerate(vals):
        acc += v
        if i >= n:
            acc -= vals[i - n]
        out.append(acc / min(i + 1, n))
    return out


def train_ma(rec):
    steps = [l["step"] for l in rec["lines"]]
    return steps, moving_avg([l["ce"] for l in rec["lines"]])


def cum_time(rec):
    """step -> seconds of training up to and including it (sum of step_ms)."""
    t, out = 0.0, {}
    for l in rec["lines"]:
        t += l["step_ms"] / 1e3
        out[l["step"]] = t
    return out


def first_reach(steps, vals, target):
    for s, v in zip(steps, vals):
        if v <= target:
            return s
    return None


def spike(rec):
    """Largest rise of the training loss above its running minimum, after step 5."""
    lo, worst = float("inf"), 0.0
    for l in rec["lines"]:
        if l["step"] > 5:
            worst = max(worst, l["loss"] - lo)
        lo = min(lo, l["loss"])
    return worst


def mean_drop(rec, a, b):
    d = [l["dropped_frac"] for l in rec["lines"] if a <= l["step"] <= b]
    return sum(d) / len(d) if d else float("nan")


def ms_per_step(rec):
    ms = [l["step_ms"] for l in rec["lines"][10:]]
    return statistics.median(ms) if ms else float("nan")


# -- experiments ------------------------------------------------------------------------------------
def scaling(R):
    out = {"dense": R.train("dense", "configs/tiny-dense.yaml")}
    for e in (8, 16, 32):
        out[f"switch-{e}"] = R.train(f"switch-{e}", sets={"model.n_experts": str(e)})
    return out


def precision(R):
    return {"bf16 selective (fp32 router)": R.train("bf16-selective", sets={"train.precision": "bf16"}),
            "bf16 router": R.train("bf16-router", sets={"train.precision": "bf16", "model.router_precision": "bf16"})}


def init(R):
    out = {}
    for scale in ("0.1", "1.0"):
        for seed in (1, 2, 3):
            out[(scale, seed)] = R.train(f"init-{scale}-s{seed}", sets={"model.init_scale": scale, "run.seed": str(seed)})
    return out


def defaults(R):
    return {"previous": R.train("defaults-previous", sets=OLD_DEFAULTS),
            "current": R.train("switch-8", sets={"model.n_experts": "8"})}


# -- plots ---------------------------------------------------------------------------------------------
def plots(figdir, S, P, I, D):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(figdir, exist_ok=True)
    made = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(figdir, name), dpi=90)
        plt.close(fig)
        made.append(name)

    if S:
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        for name, rec in S.items():
            v = series(rec, "val_loss")
            ct = cum_time(rec)
            if not v:
                continue
            ax[0].plot([s for s, _ in v], [x for _, x in v], marker="o", ms=3, label=name)
            ax[1].plot([ct[s] for s, _ in v], [x for _, x in v], marker="o", ms=3, label=name)
        ax[0].set_xlabel("step"), ax[1].set_xlabel("training time (s, 2 cores)")
        for a in ax:
            a.set_ylabel("validation loss"), a.grid(alpha=0.3), a.legend()
            a.set_ylim(top=min(4.0, a.get_ylim()[1]))
        ax[0].set_title("Switch vs dense at equal FLOPs per token")
        ax[1].set_title("... against wall time")
        save(fig, "scaling.png")
    if P:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, rec in P.items():
            st, ma = train_ma(rec)
            ax.plot(st, ma, label=name + " (train, 25-step mean)")
            v = series(rec, "val_loss")
            ax.plot([s for s, _ in v], [x for _, x in v], "o", ms=3, color=ax.lines[-1].get_color())
        ax.set_xlabel("step"), ax.set_ylabel("cross-entropy"), ax.grid(alpha=0.3), ax.legend()
        ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
        ax.set_title("bf16: selective precision vs a bf16 router")
        save(fig, "precision.png")
    if I:
        fig, ax = plt.subplots(figsize=(6, 4))
        colors = {"0.1": "tab:blue", "1.0": "tab:red"}
        for (scale, seed), rec in I.items():
            v = series(rec, "val_loss")
            ax.plot([s for s, _ in v], [x for _, x in v], color=colors[scale], alpha=0.7,
                    label=f"init_scale {scale}" if seed == 1 else None)
        ax.set_xlabel("step"), ax.set_ylabel("validation loss"), ax.grid(alpha=0.3), ax.legend()
        ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
        ax.set_title("init scale, 3 seeds each")
        save(fig, "init.png")
    if D:
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        for name, rec in D.items():
            st = [l["step"] for l in rec["lines"]]
            ax[0].plot(st, [l["loss"] for l in rec["lines"]], lw=0.8, label=name)
            ax[1].plot(st, moving_avg([100 * l["dropped_frac"] for l in rec["lines"]], 5), lw=0.8, label=name)
        ax[0].set_ylabel("training loss"), ax[1].set_ylabel("tokens dropped (%, 5-step mean)")
        for a in ax:
            a.set_xlabel("step"), a.grid(alpha=0.3), a.legend()
        ax[0].set_title("tiny.yaml: previous vs current defaults")
        save(fig, "defaults.png")
    return made


# -- the document ----------------------------------------------------------------------------------
def fmt(v, p=3):
    return "–" if v is None else f"{v:.{p}f}"


def commit_now():
    commit = sh(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT).stdout.strip()
    dirty = sh(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT).stdout.strip()
    return commit + (" (with local changes)" if dirty else "")


def write_doc(path, R, S, P, I, D, made, elapsed, commit):
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    L = []
    w = L.append
    w("# Model quality: the Switch Transformer paper in miniature")
    w("")
    w("Written by `python3 bench/model_quality.py` (do not edit by hand: rerun it). "
      f"Commit {commit}, {R.date}, "
      f"{cpu or platform.machine()}, {os.cpu_count()} cores; {R.steps} steps per run, "
      f"{len(R.results)} runs, {elapsed / 60:.1f} minutes in all.")
    w("")
    w("Every run is `switchyard train configs/tiny.yaml` (the dense runs `configs/tiny-dense.yaml`) on "
      "the default corpus (`data/fortunes`, made by `deploy/main-job.sh`), with `--set` overrides named "
      f"below. Validation every {EVAL_EVERY} steps over the first {EVAL_BATCHES} micro-batches of `data.val` "
      "(`train.eval_every`, `train.eval_batches`); the *final* validation loss is `switchyard eval` of the "
      "last checkpoint over all of `data.val`. Training time is the sum of the steps' `step_ms` "
      "(validation excluded). The model is tiny (d_model 128, 4 layers, 2 of them Switch layers) and "
      "trains for minutes: these are the paper's experiments in shape, not in scale.")
    w("")
    if S:
        d = S["dense"]
        st_d, ma_d = train_ma(d)
        target = ma_d[-1] if ma_d else None
        dense_val = d["final_val"]
        ct_d = cum_time(d)
        w("## Switch against dense at equal FLOPs per token (paper Figure 1, Table 1)")
        w("")
        w("Top-1 routing runs one expert MLP per token and every expert has the dense MLP's `d_ff`, so "
          "the Switch models cost the dense model's FLOPs per token (plus the router's, E x d_model per "
          "token) while holding E times the MLP parameters of their Switch layers. *Steps to dense* is the "
          "first step whose 25-step mean training cross-entropy is at or below the dense model's final "
          "one (the mean wanders, so the dense model itself gets there before its last step); the "
          "speed-up is the dense model's such step over the model's, and the same in training time.")
        w("")
        w("| model | parameters | final validation loss | ms/step (median) | steps to dense | speed-up (steps) | speed-up (time) | peak drop % (steps 1-50) | drop % (last 100) |")
        w("|---|---|---|---|---|---|---|---|---|")
        reach_d = first_reach(st_d, ma_d, target) if target is not None else None
        for name, rec in S.items():
            st, ma = train_ma(rec)
            reach = first_reach(st, ma, target) if target is not None else None
            ct = cum_time(rec)
            params = parse_params(rec)
            sp_steps = (reach_d / reach) if reach and reach_d else None
            sp_time = (ct_d[reach_d] / ct[reach]) if reach and reach_d else None
            w(f"| {name} | {params} | {fmt(rec['final_val'])} | {ms_per_step(rec):.0f} | "
              f"{reach if reach else 'not reached'} | {fmt(sp_steps, 2) + 'x' if sp_steps else '–'} | "
              f"{fmt(sp_time, 2) + 'x' if sp_time else '–'} | {100 * max_drop(rec, 1, 50):.1f} | {100 * mean_drop(rec, R.steps - 99, R.steps):.1f} |")
        w("")
        if "scaling.png" in made:
            w("![validation loss against steps and time](model-quality/scaling.png)")
            w("")
        w(scaling_words(S, dense_val))
        w("")
    if P:
        w("## bf16: selective precision against a bf16 router (paper Table 2)")
        w("")
        w("Both runs emulate bf16 (`train.precision: bf16`: bf16 GEMM inputs and activations, fp32 "
          "master weights, model spec §4). *Selective* keeps the router in fp32 as the spec pins it; "
          "*bf16 router* (`model.router_precision: bf16`, an ablation switch only) also rounds the "
          "router's weights, logits, probabilities, gates and logit gradients to bf16. E = 8.")
        w("")
        w("| recipe | completed | final validation loss | largest loss spike | ms/step (median) |")
        w("|---|---|---|---|---|")
        for name, rec in P.items():
            w(f"| {name} | {'yes' if rec['ok'] else 'no (' + last_err(rec) + ')'} | {fmt(rec['final_val'])} | "
              f"{spike(rec):.2f} | {ms_per_step(rec):.0f} |")
        w("")
        if "precision.png" in made:
            w("![bf16 router ablation](model-quality/precision.png)")
            w("")
        w(precision_words(P))
        w("")
    if I:
        w("## Initialisation scale (paper Table 3)")
        w("")
        w("`model.init_scale` 0.1 (the paper's reduced scale, our default) against 1.0 (the usual "
          "truncated normal with variance 1/fan_in), seeds 1, 2, 3 (`run.seed`: init, data order), E = 8.")
        w("")
        w("| init_scale | final validation loss (seeds 1, 2, 3) | mean | std | largest loss spike |")
        w("|---|---|---|---|---|")
        for scale in ("0.1", "1.0"):
            recs = [I[(scale, s)] for s in (1, 2, 3)]
            vals = [r["final_val"] for r in recs]
            ok = [v for v in vals if v is not None]
            w(f"| {scale} | {', '.join(fmt(v) for v in vals)} | {fmt(statistics.mean(ok)) if ok else '–'} | "
              f"{fmt(statistics.stdev(ok)) if len(ok) > 1 else '–'} | {max(spike(r) for r in recs):.2f} |")
        w("")
        if "init.png" in made:
            w("![init scale](model-quality/init.png)")
            w("")
        w(init_words(I))
        w("")
    if D:
        w("## Defaults of the tiny configs (issue 15 part 5)")
        w("")
        w("*Previous*: " + ", ".join(f"`{k}: {v}`" for k, v in OLD_DEFAULTS.items()) + "; *current*: the "
          "defaults of `configs/tiny.yaml` now (see docs/configuration.md). Same seed and data.")
        w("")
        w("| defaults | largest loss spike | peak loss, steps 10-60 | peak drop % (steps 1-50) | mean drop % (steps 1-50) | drop % (last 100) | final validation loss |")
        w("|---|---|---|---|---|---|---|")
        for name, rec in D.items():
            peak = max((l["loss"] for l in rec["lines"] if 10 <= l["step"] <= 60), default=float("nan"))
            w(f"| {name} | {spike(rec):.2f} | {peak:.2f} | {100 * max_drop(rec, 1, 50):.1f} | {100 * mean_drop(rec, 1, 50):.1f} | "
              f"{100 * mean_drop(rec, R.steps - 99, R.steps):.1f} | {fmt(rec['final_val'])} |")
        w("")
        if "defaults.png" in made:
            w("![previous vs current defaults](model-quality/defaults.png)")
            w("")
    w("## Reproduce")
    w("")
    w("```\nbash deploy/main-job.sh            # builds, prepares data/fortunes\n"
      "/usr/bin/python3 bench/model_quality.py   # about 23 minutes on 2 idle cores; rewrites this file\n```")
    w("")
    w("`--only scaling,precision,init,defaults` runs a subset (the document then holds only those "
      "sections); `--steps N` changes the run length; `--from-results FILE` rewrites the document and "
      "plots from a results.json of an earlier run without training (each run keeps one in its "
      "`--work` folder).")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


def parse_params(rec):
    import re
    m = re.search(r"model: (\d+) parameters", rec.get("log_head", ""))
    return f"{int(m.group(1)) / 1e6:.2f} M" if m else "–"


def max_drop(rec, a, b):
    d = [l["dropped_frac"] for l in rec["lines"] if a <= l["step"] <= b]
    return max(d) if d else float("nan")


def last_err(rec):
    lines = rec["stderr"].strip().splitlines()
    return lines[-1][:120] if lines else "?"


def scaling_words(S, dense_val):
    """What the table says, in words: facts of this run only."""
    parts, gains = [], []
    d = S.get("dense")
    if not d or dense_val is None:
        return ""
    st_d, ma_d = train_ma(d)
    for name, rec in S.items():
        if name == "dense" or rec["final_val"] is None:
            continue
        st, ma = train_ma(rec)
        reach = first_reach(st, ma, ma_d[-1]) if ma_d else None
        reach_d = first_reach(st_d, ma_d, ma_d[-1]) if ma_d else None
        parts.append(f"{name} {rec['final_val'] - dense_val:+.3f}")
        gains.append((name, reach_d / reach if reach and reach_d else None))
    words = "Final validation loss against the dense model's: " + ", ".join(parts) + "."
    sp = [g for _, g in gains]
    if all(g is not None for g in sp) and len(sp) > 1:
        mono = all(b >= a for a, b in zip(sp, sp[1:]))
        words += (f" Speed-up in steps {', '.join(f'{n} {g:.2f}x' for n, g in gains)}: "
                  + ("more experts reached the dense loss sooner here, as in the paper's Figure 1."
                     if mono else "more experts did not always reach it sooner here (the paper's Figure 1 has the "
                     "speed-up grow with the experts)."))
    words += (" The paper reports 7x in steps for Switch-Base with 128 experts over T5-Base, at a "
              "scale these runs do not approach.")
    return words


def precision_words(P):
    a, b = P.get("bf16 selective (fp32 router)"), P.get("bf16 router")
    if not a or not b or a["final_val"] is None:
        return ""
    if b["final_val"] is None:
        return "The bf16 router did not finish (it diverged), as the paper's Table 2 reports of bf16 routers."
    d = b["final_val"] - a["final_val"]
    return (f"The bf16 router ends {abs(d):.3f} {'above' if d > 0 else 'below'} the selective recipe and did "
            f"not diverge in {len(b['lines'])} steps (the paper's Table 2: the bf16 router diverged).")


def init_words(I):
    def m(scale):
        v = [I[(scale, s)]["final_val"] for s in (1, 2, 3) if I[(scale, s)]["final_val"] is not None]
        return statistics.mean(v) if v else None
    a, b = m("0.1"), m("1.0")
    if a is None or b is None:
        return ""
    return (f"Mean final validation loss {a:.3f} at 0.1 against {b:.3f} at 1.0 "
            f"({'the reduced scale is better' if a < b else 'the reduced scale is not better here'}).")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--only", default="scaling,precision,init,defaults")
    ap.add_argument("--work", default=None, help="folder for the runs (default: a fresh one under /tmp)")
    ap.add_argument("--no-doc", action="store_true", help="print the results, leave docs/ alone")
    ap.add_argument("--from-results", default=None,
                    help="results.json of an earlier run: redo the document and plots without training")
    a = ap.parse_args()
    try:
        import matplotlib  # noqa: F401  (the plots; checked before 15 minutes of training)
    except ImportError:
        sys.exit(f"{sys.executable} has no matplotlib: apt-get install python3-matplotlib "
                 "(and run this with /usr/bin/python3)")
    if not os.path.exists(os.path.join(a.build, "switchyard")):
        sys.exit(f"no {a.build}/switchyard: build first (bash deploy/main-job.sh)")
    fortunes = os.path.join(ROOT, "data/fortunes")
    if not os.path.isdir(fortunes) or not any(p.startswith("val_") for p in os.listdir(fortunes)):
        sys.exit("no data/fortunes: run bash deploy/main-job.sh first (it prepares the corpus)")
    only = set(a.only.split(","))
    bad = only - {"scaling", "precision", "init", "defaults"}
    if bad:
        sys.exit(f"--only: unknown part(s) {', '.join(sorted(bad))}")
    work = a.work or f"/tmp/sy-quality-{os.getpid()}"
    os.makedirs(work, exist_ok=True)
    R = Runner(a.build, work, a.steps)
    t0 = time.time()
    prior_elapsed = None
    commit = commit_now()
    if a.from_results:
        with open(a.from_results) as f:
            saved = json.load(f)
        R.results = saved.get("runs", saved)
        prior_elapsed = saved.get("elapsed_s")
        commit = saved.get("commit", "unknown")
        R.date = saved.get("date", R.date)
        R.steps = max((len(r["lines"]) for r in R.results.values()), default=a.steps)
    S = scaling(R) if "scaling" in only else {}
    P = precision(R) if "precision" in only else {}
    I = init(R) if "init" in only else {}
    D = defaults(R) if "defaults" in only else {}
    elapsed = prior_elapsed if prior_elapsed is not None else time.time() - t0
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump({"elapsed_s": elapsed, "commit": commit, "date": R.date, "runs": R.results}, f)
    print(f"{len(R.results)} runs in {elapsed / 60:.1f} min; raw results in {work}/results.json")
    if a.no_doc:
        return
    made = plots(os.path.join(ROOT, "docs/model-quality"), S, P, I, D)
    write_doc(os.path.join(ROOT, "docs/model-quality.md"), R, S, P, I, D, made, elapsed, commit)
    print("wrote docs/model-quality.md and", ", ".join(f"docs/model-quality/{m}" for m in made))
    if not all(r["ok"] for r in R.results.values() if not r["name"].startswith("bf16-router")):
        sys.exit(1)


if __name__ == "__main__":
    main()
