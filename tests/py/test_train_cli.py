"""End-to-end tests of `switchyard train` / `eval` / `data prepare` as a user runs them:
resume equality (20 steps straight == 10 + resume + 10), metrics.jsonl fields, checkpoint
layout, eval output, --help on every command, clear refusals of bad configs, flags and data."""
import glob
import json
import os
import random
import sys

import sytest
from sytest import SY, CFG, check, failures, metric_lines


def run(args, **kw):
    return sytest.run([SY] + args, capture_output=True, text=True, timeout=600, **kw)


def small(tmp, name):
    return ["--set", f"data.train={tmp}/data/train_*.bin", "--set", "data.val=", "--set", f"run.name={name}",
            "--set", f"run.state_dir={tmp}/state-{name}", "--set", f"checkpoint.store={tmp}/store",
            "--set", "model.n_layers=2", "--set", "model.d_model=64", "--set", "model.d_ff=128",
            "--set", "model.seq_len=64", "--set", "train.global_batch_seqs=8",
            "--set", "train.micro_batch_seqs=4", "--set", "run.steps=20",
            "--set", "train.warmup_steps=5", "--set", "checkpoint.every=10", "--quiet"]


def main():
    tmp = sytest.make_tmp("sy-train-")
    rnd = random.Random(5)
    words = ["switch", "expert", "router", "token", "capacity", "the", "a", "of", "loss", "layer",
             "gradient", "batch", "worker", "shard", "fault", "checkpoint"]
    os.makedirs(f"{tmp}/text")
    with open(f"{tmp}/text/corpus.txt", "w") as f:
        for _ in range(3000):
            f.write(" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12))) + ".\n")
    r = run(["data", "prepare", "--input", f"{tmp}/text", "--out", f"{tmp}/data"])
    check(r.returncode == 0, f"data prepare succeeds ({r.stderr.strip()[-200:]})")

    # --- resume equality ---------------------------------------------------------------
    r = run(["train", CFG] + small(tmp, "straight"))
    check(r.returncode == 0, f"20 straight steps run ({r.stderr[-300:]})")
    r = run(["train", CFG] + small(tmp, "split") + ["--stop-after", "10"])
    check(r.returncode == 0, f"first 10 steps run ({r.stderr[-300:]})")
    first = metric_lines(tmp, "split")
    check(len(first) == 10, f"stop-after 10 wrote 10 metric lines (got {len(first)})")
    check(os.path.exists(f"{tmp}/store/split/ckpt/step-000000010/MANIFEST.json"),
          "checkpoint at step 10 committed with its manifest")
    r = run(["train", CFG] + small(tmp, "split") + ["--resume"])
    check(r.returncode == 0 and "resumed from checkpoint step 10" in r.stderr,
          f"resume picks up step 10 ({r.stderr[-300:]})")
    a, b = metric_lines(tmp, "straight"), metric_lines(tmp, "split")
    check([m["step"] for m in a] == list(range(1, 21)), "straight run logged steps 1..20")
    check([m["step"] for m in b] == list(range(1, 21)), "split run logged steps 1..20 once each")
    same = all(x["loss"] == y["loss"] and x["grad_norm"] == y["grad_norm"] for x, y in zip(a, b))
    check(same, "10 + resume + 10 gives exactly the losses and grad norms of 20 straight steps")
    if not same:
        for x, y in zip(a, b):
            print("   step", x["step"], x["loss"], y["loss"])
    for key in ["step", "loss", "ce", "aux", "z", "lr", "grad_norm", "tokens_per_s", "dropped_frac"]:
        check(all(key in m for m in a), f"metrics.jsonl lines carry '{key}'")
    check(all(abs(m["loss"] - (m["ce"] + m["aux"] + m["z"])) < 1e-9 for m in a), "loss = ce + aux + z")
    check(a[-1]["ce"] < a[0]["ce"] - 0.5, f"loss falls ({a[0]['ce']:.3f} -> {a[-1]['ce']:.3f})")
    ck = f"{tmp}/store/straight/ckpt/step-000000020"
    names = sorted(os.path.basename(p) for p in glob.glob(ck + "/*"))
    expected = ["MANIFEST.json", "dense.optim.safetensors", "dense.safetensors"] + sorted(
        f"expert-{e:04d}{s}.safetensors" for e in range(8) for s in ["", ".optim"])
    check(names == sorted(expected), f"checkpoint layout of spec §5 ({names})")
    man = json.load(open(ck + "/MANIFEST.json"))
    check(man.get("step") == 20 and man.get("optimizer_step") == 20 and "config" in man
          and len(man.get("files", [])) == 18, "manifest: step, optimizer step, config, 18 files")
    # a straight run over the same store again refuses nothing and changes nothing committed
    r = run(["train", CFG] + small(tmp, "straight") + ["--resume"])
    check(r.returncode == 0 and "already complete" in r.stderr, "resuming a finished run is a no-op")

    # --- eval -----------------------------------------------------------------------------
    r = run(["eval", "--checkpoint", f"{tmp}/store/straight", "--data", f"{tmp}/data/val_*.bin",
             "--batches", "3"])
    check(r.returncode == 0, f"eval runs ({r.stderr[-300:]})")
    try:
        out = json.loads(r.stdout.strip().splitlines()[-1])
    except Exception:
        out = {}
    check(out.get("tokens") == 3 * 4 * 64 and out.get("step") == 20 and 0 < out.get("loss", 0) < 10,
          f"eval prints loss and tokens as JSON ({r.stdout.strip()})")
    r2 = run(["eval", "--checkpoint", ck, "--data", f"{tmp}/data/val_*.bin", "--batches", "3"])
    check(r2.returncode == 0 and r2.stdout == r.stdout, "eval of the step folder equals eval of the run (latest)")
    r3 = run(["eval", "--checkpoint", f"{tmp}/store/split/ckpt/step-000000010", "--data",
              f"{tmp}/data/val_*.bin", "--batches", "3"])
    l10 = json.loads(r3.stdout.strip().splitlines()[-1])["loss"] if r3.returncode == 0 else None
    check(l10 is not None and l10 > out.get("loss", 1e9), f"eval loss at step 10 ({l10}) > at step 20 ({out.get('loss')})")

    # --- OpenBLAS kernels: picked by switchyard itself on AVX-512, the user's choice respected ---
    flags = open("/proc/cpuinfo").read()
    avx512 = all(f in flags for f in ["avx512f", "avx512bw", "avx512dq", "avx512vl"])
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "SY_NO_REEXEC")}
    one = small(tmp, "blas") + ["--set", "run.steps=2"]
    r = run(["train", CFG] + one, env=env)
    if avx512:
        check(r.returncode == 0 and "OpenBLAS SkylakeX" in r.stderr,
              "AVX-512 CPU: the AVX-512 (SkylakeX) OpenBLAS kernels are selected without OPENBLAS_CORETYPE")
    else:
        check(r.returncode == 0, "CPU without AVX-512: training runs with OpenBLAS's own kernel choice")
    env["OPENBLAS_CORETYPE"] = "Haswell"
    r = run(["train", CFG] + one + ["--overwrite"], env=env)
    check(r.returncode == 0 and "OpenBLAS Haswell" in r.stderr, "OPENBLAS_CORETYPE set by the user is respected")

    # --- help and refusals ------------------------------------------------------------------
    for cmd in [["--help"], ["train", "--help"], ["eval", "--help"], ["data", "prepare", "--help"],
                ["config", "--help"]]:
        r = run(cmd)
        check(r.returncode == 0 and "usage" in (r.stdout + r.stderr).lower(), f"{' '.join(cmd)} prints usage")
    r = run(["train", CFG, "--set", "model.d_model=130"])
    check(r.returncode != 0 and "model.d_model" in r.stderr and "130" in r.stderr,
          f"invalid config refused naming field and value ({r.stderr.strip()})")
    r = run(["train", CFG, "--bogus"])
    check(r.returncode == 2 and "bogus" in r.stderr, "unknown flag refused")
    r = run(["train", f"{tmp}/nope.yaml"])
    check(r.returncode != 0 and "nope.yaml" in r.stderr, "missing config file named")
    bad = f"{tmp}/bad"
    os.makedirs(bad)
    with open(f"{bad}/train_000000.bin", "wb") as f:
        f.write(b"\0" * 1024 + b"\1\2")
    r = run(["train", CFG] + small(tmp, "bad")[:0] + ["--set", f"data.train={bad}/train_*.bin", "--quiet"])
    check(r.returncode != 0 and "train_000000.bin" in r.stderr, f"bad shard refused naming the file ({r.stderr.strip()[-200:]})")
    r = run(["eval", "--checkpoint", f"{tmp}/store/none", "--data", f"{tmp}/data/val_*.bin"])
    check(r.returncode != 0 and "none" in r.stderr, f"eval of a missing checkpoint explains ({r.stderr.strip()})")

    print(f"{len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
