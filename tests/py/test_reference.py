"""switchyard against the independent PyTorch reference (tests/reference/model.py, model spec §1-2, §5, §7).

For three small configs (Switch layers with capacity drops, a 1-expert Switch layer, a dense
model) tests/sy_refdump trains K=3 steps and dumps config, init weights, the token batches, the
step-1 gradients, the final weights and the per-step losses. The reference (float64) loads the
same init and tokens and must reproduce:
  - every step's loss (and ce / aux / z, lr, grad norm) within 1e-5 relative,
  - the number of tokens dropped by capacity (and it must be > 0 in the Switch case),
  - every step-1 gradient tensor within 1e-4 relative (||a-b|| / ||b||, per tensor),
  - every parameter after 3 AdamW steps within 1e-4 relative per tensor. fp32 vs fp64 over
    3 Adam steps: Adam divides by sqrt(v), so per-element gradient noise turns into update noise
    of up to lr per element; relative to a whole tensor that stays well below 1e-4 here.
Then `switchyard train` with the Switch config writes a checkpoint at step 3; its
dense.safetensors + expert-NNNN.safetensors must load by spec name into the plain PyTorch module
(every parameter exactly once, shapes equal), equal sy_refdump's final.safetensors (same code
path: 1e-6), and its optimizer files must carry m./v. moments for every tensor, close to the
reference AdamW's exp_avg / exp_avg_sq.

Env: SY_BUILD (build dir), SY_SRC (source dir). Exit status non-zero on any failure.
"""
import glob
import os
import random
import sys
import tempfile
import time

import sytest
from sytest import SRC

sys.path.insert(0, os.path.join(SRC, "tests"))

import torch  # noqa: E402

from reference.model import RefConfig, SwitchLM, lr_at, make_optimizer, train_steps  # noqa: E402
from reference import safetensors_io as st  # noqa: E402
from refutil import (SUMMARY, fail, finish, load_dump, missing_tools, prepare_shards, rel,  # noqa: E402
                     rel_scalar, run)

REFDUMP = sytest.tool("sy_refdump")
DATAPREP = sytest.tool("sy_dataprep")
SWITCHYARD = sytest.SY
CONFIG = sytest.CFG
K = 3

TOL_LOSS = 1e-5      # relative, per step: loss, ce, lr, grad norm
TOL_AUXZ = 1e-5      # relative (aux, z carry their coefficients; abs floor 1e-12)
TOL_GRAD = 1e-4      # relative per tensor, step-1 gradients
TOL_FINAL = 1e-4     # relative per tensor, parameters after K AdamW steps
TOL_MOMENT = 1e-4    # relative per tensor, AdamW m and v after K steps
TOL_CKPT = 1e-6      # relative per tensor, checkpoint vs sy_refdump final (same code path)

def make_corpus(path):
    """A few KB of varied text (deterministic)."""
    words = ("the switch transformer routes every token to one expert; capacity is limited, so "
             "some tokens are dropped and the residual carries them. Load balancing keeps the "
             "experts busy. 0123456789 ALPHA beta Gamma delta, epsilon! zeta? eta: theta (iota) "
             "kappa [lambda] {mu} nu-xi omicron/pi rho_sigma tau+upsilon=phi chi*psi omega.").split()
    rng = random.Random(20240520)
    lines = []
    for i in range(160):
        n = rng.randint(4, 14)
        line = " ".join(rng.choice(words) for _ in range(n))
        if i % 7 == 0:
            line = line.upper()
        lines.append("%d. %s" % (i, line))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def common_sets(shards):
    return ["data.train=" + os.path.join(shards, "train_*.bin"), "data.val=" + os.path.join(shards, "val_*.bin"),
            "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.seq_len=32", "model.vocab_size=256",
            "train.micro_batch_seqs=2", "train.global_batch_seqs=4", "train.threads=2", "train.precision=fp32",
            "model.router_jitter=0", "model.expert_dropout=0", "run.steps=3"]


CASES = [
    # (name, extra --set, expect drops)
    ("switch", ["model.n_experts=8", "model.capacity_factor=1.0", "model.n_layers=3", "model.switch_every=2",
                "train.warmup_steps=1"], True),
    ("switch-E1", ["model.n_experts=1", "model.capacity_factor=1.0", "model.n_layers=2", "model.switch_every=2",
                   "train.grad_clip=0.05"], False),
    ("dense", ["model.n_experts=8", "model.n_layers=2", "model.switch_every=0"], False),
]


def sets_args(sets):
    out = []
    for s in sets:
        out += ["--set", s]
    return out


def strict_load(model, tensors, what):
    """load_state_dict with every name present exactly once and every shape equal."""
    sd = model.state_dict()
    missing = sorted(set(sd) - set(tensors))
    extra = sorted(set(tensors) - set(sd))
    if missing or extra:
        raise RuntimeError("%s: names differ from the reference module: missing %s, unexpected %s"
                           % (what, missing, extra))
    for n, t in tensors.items():
        if tuple(t.shape) != tuple(sd[n].shape):
            raise RuntimeError("%s: tensor %s has shape %s, reference module expects %s"
                               % (what, n, tuple(t.shape), tuple(sd[n].shape)))
    model.load_state_dict({n: t.to(sd[n].dtype) for n, t in tensors.items()}, strict=True)


def compare_tensors(label, got, want, tol, names):
    """got: switchyard tensors, want: reference. Per-tensor relative error; prints the worst."""
    errs = []
    for n in names:
        if n not in got:
            fail("%s: switchyard has no tensor %s" % (label, n))
            continue
        if tuple(got[n].shape) != tuple(want[n].shape):
            fail("%s: %s shape %s, reference %s" % (label, n, tuple(got[n].shape), tuple(want[n].shape)))
            continue
        errs.append((rel(got[n], want[n]), n))
    errs.sort(reverse=True)
    worst = ", ".join("%s %.2e" % (n, e) for e, n in errs[:3])
    print("  %s: worst relative errors: %s" % (label, worst))
    bad = [(e, n) for e, n in errs if not (e <= tol)]
    for e, n in bad:
        fail("%s: tensor %s differs from the reference: ||sy - ref|| / ||ref|| = %.3e > %.0e (||ref|| = %.4e)"
             % (label, n, e, tol, float(want[n].double().norm())))
    return errs[0][0] if errs else 0.0


def check_case(tmp, shards, name, extra, expect_drops):
    t0 = time.time()
    out = os.path.join(tmp, "dump-" + name)
    sets = common_sets(shards) + extra
    run([REFDUMP, CONFIG, "--out", out, "--steps", str(K)] + sets_args(sets))
    d = load_dump(out, K)
    cfgd, cfg, losses, tokens, init, grads1, final = (d[k] for k in ("cfgd", "cfg", "losses", "tokens", "init",
                                                                     "grads1", "final"))
    print("case %s: E=%d S=%d L=%d G=%d C=%d M=%d" % (name, cfg.n_experts, cfg.switch_every, cfg.n_layers,
                                                      cfg.micro_batch_seqs * cfg.seq_len,
                                                      cfg.capacity(cfg.micro_batch_seqs * cfg.seq_len,
                                                                   cfg.capacity_factor), cfg.n_micro))
    if len(losses) != K:
        fail("%s: losses.json has %d entries, expected %d" % (name, len(losses), K))
        return None
    torch.manual_seed(0)
    model = SwitchLM(cfg, dtype=torch.float64)
    strict_load(model, init, "%s/init.safetensors" % out)
    n_switch = sum(1 for l in range(cfg.n_layers) if cfg.is_switch(l))
    opt = make_optimizer(model, cfg)
    recs = train_steps(model, tokens, cfg, K, opt=opt, capture_grads=(1,))

    # --- losses, lr, grad norm, drops, per step
    for rec, ref in zip(recs, losses):
        s = rec["step"]
        if ref.get("step") != s:
            fail("%s: losses.json entry %d has step %r" % (name, s, ref.get("step")))
        for key, tol, floor in (("loss", TOL_LOSS, 1e-30), ("ce", TOL_LOSS, 1e-30), ("aux", TOL_AUXZ, 1e-12),
                                ("z", TOL_AUXZ, 1e-12), ("lr", TOL_LOSS, 1e-30), ("grad_norm", TOL_LOSS, 1e-30)):
            e = rel_scalar(float(ref[key]), rec[key], floor)
            if not e <= tol:
                fail("%s step %d: %s switchyard %.10g vs reference %.10g (relative error %.2e > %.0e)"
                     % (name, s, key, float(ref[key]), rec[key], e, tol))
        if int(ref["dropped"]) != rec["dropped"]:
            fail("%s step %d: switchyard dropped %d tokens, the reference dropped %d (per-group expert counts "
                 "before capacity: %s)" % (name, s, int(ref["dropped"]), rec["dropped"], rec["counts"]))
    r1 = recs[0]
    print("  step 1: loss %.8f (sy %.8f) ce %.8f aux %.3e z %.3e dropped %d/%d grad_norm %.5f lr %.2e"
          % (r1["loss"], float(losses[0]["loss"]), r1["ce"], r1["aux"], r1["z"], r1["dropped"], r1["routed"],
             r1["grad_norm"], r1["lr"]))
    print("  steps 2-3 loss: ref %s sy %s" % (["%.8f" % r["loss"] for r in recs[1:]],
                                              ["%.8f" % float(l["loss"]) for l in losses[1:]]))
    if expect_drops and r1["dropped"] <= 0:
        fail("%s: no token was dropped at step 1 (counts %s), so capacity dropping was not exercised"
             % (name, r1["counts"]))
    # --- independent invariants of the reference itself
    if n_switch == 0:
        if any(r["aux"] != 0 or r["z"] != 0 or r["routed"] != 0 for r in recs):
            fail("%s: dense model has nonzero aux/z/routed in the reference" % name)
        for l in losses:
            if float(l["aux"]) != 0 or float(l["z"]) != 0 or int(l["dropped"]) != 0:
                fail("%s step %d: dense model but switchyard reports aux %g z %g dropped %d"
                     % (name, l["step"], float(l["aux"]), float(l["z"]), int(l["dropped"])))
    if cfg.n_experts == 1 and n_switch > 0:
        want_aux = cfg.aux_loss_coef * n_switch
        for l in losses:
            if abs(float(l["aux"]) - want_aux) > 1e-7 * want_aux:
                fail("%s step %d: E=1 must give aux = aux_loss_coef x %d = %g exactly, switchyard %.10g"
                     % (name, l["step"], n_switch, want_aux, float(l["aux"])))
    for i, l in enumerate(losses):
        if abs(float(l["lr"]) - lr_at(cfg, i)) > 1e-12:
            fail("%s step %d: lr %.10g, schedule gives %.10g" % (name, i + 1, float(l["lr"]), lr_at(cfg, i)))

    names = [n for n, _ in model.named_parameters()]
    # --- step-1 gradients
    extra_g = sorted(set(grads1) - set(names))
    if extra_g:
        fail("%s: grads1.safetensors has tensors the model does not: %s" % (name, extra_g))
    gerr = compare_tensors("%s grads step 1" % name, grads1, recs[0]["grads"], TOL_GRAD, names)
    # --- parameters after K steps
    ref_final = {n: p.detach() for n, p in model.named_parameters()}
    ferr = compare_tensors("%s params after %d steps" % (name, K), final, ref_final, TOL_FINAL, names)
    SUMMARY.append("%-9s loss1 %.6f dropped1 %3d  max rel err: loss %.1e grad %.1e final %.1e  (%.1fs)"
                   % (name, r1["loss"], r1["dropped"],
                      max(rel_scalar(float(l["loss"]), r["loss"]) for l, r in zip(losses, recs)),
                      gerr, ferr, time.time() - t0))
    return {"sets": sets, "cfgd": cfgd, "final": final, "model": model, "opt": opt, "out": out}


def check_checkpoint(tmp, case):
    t0 = time.time()
    opt, cfgd = case["opt"], case["cfgd"]
    run_name = cfgd["run"]["name"]
    store = os.path.join(tmp, "store")
    sets = case["sets"] + ["run.steps=%d" % K, "checkpoint.every=%d" % K, "checkpoint.store=" + store,
                           "run.state_dir=" + os.path.join(tmp, "state")]
    run([SWITCHYARD, "train", CONFIG] + sets_args(sets) + ["--quiet"])
    d = os.path.join(store, run_name, "ckpt", "step-%09d" % K)
    if not os.path.isdir(d):
        fail("checkpoint: %s not written (store has %s)" % (d, sorted(glob.glob(os.path.join(store, "**"), recursive=True))))
        return
    files = [os.path.join(d, "dense.safetensors")] + sorted(glob.glob(os.path.join(d, "expert-[0-9][0-9][0-9][0-9].safetensors")))
    E = int(cfgd["model"]["n_experts"])
    if len(files) != 1 + E:
        fail("checkpoint: expected dense.safetensors + %d expert-NNNN.safetensors in %s, found %s"
             % (E, d, [os.path.basename(f) for f in files]))
    merged, origin = {}, {}
    for path in files:
        try:
            tensors, _ = st.load_file(path)
        except (st.SafetensorsError, OSError) as e:
            fail("checkpoint: cannot read %s: %s" % (path, e))
            return
        base = os.path.basename(path)
        for n, t in tensors.items():
            if n in merged:
                fail("checkpoint: tensor %s in both %s and %s" % (n, origin[n], base))
            if t.dtype != torch.float32:
                fail("checkpoint: %s/%s has dtype %s, expected F32" % (base, n, t.dtype))
            if base.startswith("expert-"):
                e = int(base[len("expert-"):len("expert-") + 4])
                if ".moe.experts.%d." % e not in n:
                    fail("checkpoint: %s holds %s, which is not a tensor of expert %d" % (base, n, e))
            elif ".moe.experts." in n:
                fail("checkpoint: dense.safetensors holds expert tensor %s" % n)
            merged[n], origin[n] = t, base
    ck_model = SwitchLM(RefConfig.from_dict(cfgd), dtype=torch.float32)
    try:
        strict_load(ck_model, merged, "checkpoint %s" % d)
    except RuntimeError as e:
        fail(str(e))
        return
    loaded = dict(ck_model.named_parameters())
    names = list(loaded)
    err = compare_tensors("checkpoint vs sy_refdump final", case["final"], {n: loaded[n].detach() for n in names},
                          TOL_CKPT, names)
    # optimizer moments: m.<name> / v.<name> for every tensor, dense ones in dense.optim.safetensors
    moments = {}
    for path in [os.path.join(d, "dense.optim.safetensors")] + \
            sorted(glob.glob(os.path.join(d, "expert-[0-9][0-9][0-9][0-9].optim.safetensors"))):
        try:
            tensors, _ = st.load_file(path)
        except (st.SafetensorsError, OSError) as e:
            fail("checkpoint: cannot read %s: %s" % (path, e))
            continue
        for n, t in tensors.items():
            if n in moments:
                fail("checkpoint: moment %s appears in more than one optim file" % n)
            moments[n] = t
            if os.path.basename(path) == "dense.optim.safetensors" and ".moe.experts." in n:
                fail("checkpoint: dense.optim.safetensors holds expert moment %s" % n)
    for n in names:
        where = ("expert-%04d.optim.safetensors" % int(n.split(".moe.experts.")[1].split(".")[0])
                 if ".moe.experts." in n else "dense.optim.safetensors")
        for pre in ("m.", "v."):
            if pre + n not in moments:
                fail("checkpoint: no AdamW moment %s%s (expected in %s)" % (pre, n, where))
            elif tuple(moments[pre + n].shape) != tuple(loaded[n].shape):
                fail("checkpoint: moment %s%s has shape %s, parameter %s"
                     % (pre, n, tuple(moments[pre + n].shape), tuple(loaded[n].shape)))
    want_m, want_v = {}, {}
    for n, p in case["model"].named_parameters():
        s = opt.state[p]
        want_m["m." + n], want_v["v." + n] = s["exp_avg"].detach(), s["exp_avg_sq"].detach()
    extra_m = sorted(set(moments) - set(want_m) - set(want_v))
    if extra_m:
        fail("checkpoint: optim files hold unexpected tensors %s" % extra_m[:5])
    merr = compare_tensors("checkpoint AdamW m", moments, want_m, TOL_MOMENT, [k for k in want_m if k in moments])
    verr = compare_tensors("checkpoint AdamW v", moments, want_v, TOL_MOMENT, [k for k in want_v if k in moments])
    SUMMARY.append("ckpt      %d files, %d tensors, %d moments; vs refdump final %.1e; m %.1e v %.1e  (%.1fs)"
                   % (len(files), len(merged), len(moments), err, merr, verr, time.time() - t0))


def check_safetensors_io():
    """The strict reader itself: a round trip, and refusals of malformed files."""
    t = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1.5, -2.0], dtype=torch.float64)}
    buf = st.dumps(t, {"k": "v"})
    back, meta = st.loads(buf)
    if set(back) != {"a", "b"} or not all(torch.equal(back[n], t[n]) for n in t) or meta != {"k": "v"}:
        fail("safetensors_io: round trip changed the tensors or metadata")
    bad = {"truncated data": buf[:-1], "trailing byte": buf + b"\0", "short header": buf[:5]}
    for what, b in bad.items():
        try:
            st.loads(b)
            fail("safetensors_io: %s was accepted" % what)
        except st.SafetensorsError:
            pass


def main():
    if missing_tools((REFDUMP, DATAPREP, SWITCHYARD)):
        return 1
    torch.set_num_threads(2)
    check_safetensors_io()
    with tempfile.TemporaryDirectory(prefix="sy_reftest_") as tmp:
        shards = prepare_shards(tmp, DATAPREP, make_corpus)
        if shards is None:
            return 1
        cases = {}
        for name, extra, drops in CASES:
            try:
                cases[name] = check_case(tmp, shards, name, extra, drops)
            except Exception as e:  # report and continue with the other cases
                fail("%s: %s: %s" % (name, type(e).__name__, e))
        if cases.get("switch"):
            try:
                check_checkpoint(tmp, cases["switch"])
            except Exception as e:
                fail("checkpoint: %s: %s" % (type(e).__name__, e))
    return finish("all reference checks passed")


if __name__ == "__main__":
    sys.exit(main())
