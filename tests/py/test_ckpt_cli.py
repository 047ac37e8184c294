"""End-to-end tests of asynchronous checkpoints and `switchyard ckpt ls | show | export`:
an async run commits steps 5 and 10; ls lists them (and debris as uncommitted); show verifies
every file and names a corrupted one (exit 1); --resume ignores debris; export writes one
safetensors file that the strict reference reader loads, with every model-spec name once, bf16
values equal to torch's rounding of the fp32 checkpoint, fp32 values bit-identical; a SIGKILL
in the middle of an async upload resumes from the last committed checkpoint and reproduces the
uninterrupted run's losses exactly.

kill_resume_check(store_url, tmp, name, ...) is store-agnostic (it watches the store through
`switchyard ckpt ls`), so the S3 tests can call it with an s3:// URL."""
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import torch

import sytest
from sytest import SRC, SY, CFG, check, failures, metric_lines
sys.path.insert(0, os.path.join(SRC, "tests", "reference"))
import safetensors_io  # noqa: E402



def run(args, env=None, **kw):
    e = dict(os.environ)
    e.update(env or {})
    return sytest.run([SY] + args, capture_output=True, text=True, timeout=600, env=e, **kw)


def make_data(tmp):
    rnd = random.Random(7)
    words = ["switch", "expert", "router", "token", "capacity", "the", "a", "of", "loss", "layer",
             "gradient", "batch", "worker", "shard", "fault", "checkpoint"]
    os.makedirs(f"{tmp}/text", exist_ok=True)
    with open(f"{tmp}/text/corpus.txt", "w") as f:
        for _ in range(3000):
            f.write(" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12))) + ".\n")
    r = run(["data", "prepare", "--input", f"{tmp}/text", "--out", f"{tmp}/data"])
    if r.returncode != 0:
        raise RuntimeError("data prepare failed: " + r.stderr)


def small(tmp, name, store, steps=10, every=5, extra=()):
    return ["--set", f"data.train={tmp}/data/train_*.bin", "--set", "data.val=", "--set", f"run.name={name}",
            "--set", f"run.state_dir={tmp}/state-{name}", "--set", f"checkpoint.store={store}",
            "--set", "model.n_layers=2", "--set", "model.d_model=64", "--set", "model.d_ff=128",
            "--set", "model.seq_len=64", "--set", "train.global_batch_seqs=8",
            "--set", "train.micro_batch_seqs=4", "--set", f"run.steps={steps}",
            "--set", "train.warmup_steps=5", "--set", f"checkpoint.every={every}",
            "--set", "checkpoint.async=true", "--set", "checkpoint.keep_last=3", "--quiet"] + list(extra)


def ls_steps(store_run, env=None):
    """{step: status} from `switchyard ckpt ls` (status: committed | uncommitted | corrupt)."""
    r = run(["ckpt", "ls", store_run], env=env)
    out = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^(\d+)\s+(committed|uncommitted|corrupt)\b", line)
        if m:
            out[int(m.group(1))] = m.group(2)
    return out, r


def spec_names(n_layers, n_experts, switch_every):
    """Model spec §7 names, computed from the spec (not from switchyard)."""
    names = ["wte", "wpe", "ln_f.weight"]
    for l in range(n_layers):
        p = f"blocks.{l}."
        names += [p + "ln1.weight", p + "attn.qkv.weight", p + "attn.proj.weight", p + "ln2.weight"]
        if switch_every > 0 and l % switch_every == switch_every - 1:
            names.append(p + "moe.router.weight")
            for e in range(n_experts):
                names += [p + f"moe.experts.{e}.fc.weight", p + f"moe.experts.{e}.proj.weight"]
        else:
            names += [p + "mlp.fc.weight", p + "mlp.proj.weight"]
    return names


def bits(t):
    """The raw bit pattern of a float tensor (so -0.0 != 0.0 and NaNs compare)."""
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def kill_resume_check(store_url, tmp, name, env=None, delay_ms=60, every=5, steps=20):
    """Trains `name` twice into store_url: straight through, and with the async upload slowed
    by SY_CKPT_TEST_DELAY_MS, SIGKILLed while a save is in flight after an earlier one was
    committed, then resumed. Checks that the resume starts from the last COMMITTED step and that
    metrics.jsonl (loss, grad_norm per step) equals the straight run's exactly. `env`: extra
    environment (e.g. AWS credentials) for every switchyard call."""
    env = dict(env or {})
    straight, killed = name + "-straight", name + "-killed"
    r = run(["train", CFG] + small(tmp, straight, store_url, steps=steps, every=every), env=env)
    check(r.returncode == 0, f"[{store_url}] uninterrupted async run ({r.stderr[-300:]})")
    slow = dict(os.environ)
    slow.update(env)
    slow["SY_CKPT_TEST_DELAY_MS"] = str(delay_ms)
    p = sytest.Popen([SY, "train", CFG] + small(tmp, killed, store_url, steps=steps, every=every),
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=slow)
    target = None
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        st, _ = ls_steps(f"{store_url}/{killed}", env=env)
        com = [s for s, v in st.items() if v == "committed"]
        deb = [s for s, v in st.items() if v == "uncommitted" and com and s > max(com)]
        if deb:
            target = (max(com), max(deb))
            break
        time.sleep(0.02)
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait()
    _, err = p.communicate()
    check(target is not None and p.returncode == -signal.SIGKILL,
          f"[{store_url}] killed (SIGKILL) while step {target and target[1]} was uploading, "
          f"step {target and target[0]} committed (rc {p.returncode})")
    if target is None:
        print(err[-1000:])
        return
    st, _ = ls_steps(f"{store_url}/{killed}", env=env)
    check(st.get(target[1]) == "uncommitted", f"[{store_url}] the interrupted step {target[1]} is debris: {st}")
    r = run(["train", CFG] + small(tmp, killed, store_url, steps=steps, every=every) + ["--resume"], env=env)
    check(r.returncode == 0 and f"resumed from checkpoint step {target[0]}" in r.stderr,
          f"[{store_url}] resume starts from the last committed step {target[0]} ({r.stderr[-400:]})")
    a, b = metric_lines(tmp, straight), metric_lines(tmp, killed)
    check([m["step"] for m in b] == list(range(1, steps + 1)), f"[{store_url}] resumed run logged every step once")
    same = len(a) == len(b) and all(x["loss"] == y["loss"] and x["grad_norm"] == y["grad_norm"]
                                    for x, y in zip(a, b))
    check(same, f"[{store_url}] kill -9 mid-upload + resume reproduces the straight run's losses exactly")
    st, _ = ls_steps(f"{store_url}/{killed}", env=env)
    check(st.get(steps) == "committed", f"[{store_url}] the final step {steps} is committed after the resume: {st}")


def main():
    tmp = sytest.make_tmp("sy-ckptcli-")
    make_data(tmp)
    store = f"{tmp}/store"
    sr = f"{store}/run"

    # --- an async run: 10 steps, checkpoints at 5 and 10 ------------------------------------
    r = run(["train", CFG] + small(tmp, "run", store))
    check(r.returncode == 0, f"async training run succeeds ({r.stderr[-300:]})")
    m = metric_lines(tmp, "run")
    check([x["step"] for x in m] == list(range(1, 11)), "10 metric lines")
    check(all("ckpt_stall_ms" in x for x in m), "every metrics line has ckpt_stall_ms")
    check(m[4]["ckpt_stall_ms"] > 0 and m[9]["ckpt_stall_ms"] > 0 and m[2]["ckpt_stall_ms"] == 0,
          "ckpt_stall_ms > 0 exactly at checkpoint steps")
    ups = {x["ckpt_step"]: x["ckpt_upload_ms"] for x in m if "ckpt_upload_ms" in x}
    check(set(ups) == {5, 10} and all(v > 0 for v in ups.values()),
          f"the background upload time of steps 5 and 10 is reported ({ups})")

    st, r = ls_steps(sr)
    check(r.returncode == 0 and st == {10: "committed", 5: "committed"}, f"ckpt ls lists steps 10 and 5 ({r.stdout})")
    lines = [l for l in r.stdout.splitlines() if re.match(r"^\d+\s", l)]
    check(len(lines) == 2 and lines[0].split()[0] == "10" and all(l.split()[2] == "18" for l in lines),
          "ckpt ls: newest first, 18 files each")
    total = sum(os.path.getsize(p) for p in glob.glob(f"{sr}/ckpt/step-000000010/*.safetensors"))
    check(str(total) in lines[0], f"ckpt ls reports the total bytes of step 10 ({total})")

    r = run(["ckpt", "show", sr])
    check(r.returncode == 0 and "verified" in r.stdout and "step 10" in r.stdout,
          f"ckpt show verifies the newest checkpoint ({r.stdout[-200:]}{r.stderr[-200:]})")
    man = json.load(open(f"{sr}/ckpt/step-000000010/MANIFEST.json"))
    check(all(f["sha256"] in r.stdout and str(f["size"]) in r.stdout for f in man["files"]),
          "ckpt show prints every file's size and checksum")
    r = run(["ckpt", "show", sr + "@5"])
    check(r.returncode == 0 and "step 5" in r.stdout and "verified" in r.stdout, "ckpt show RUN@5")
    r = run(["ckpt", "show", sr + "@7"])
    check(r.returncode == 1 and "7" in r.stderr and "10" in r.stderr,
          f"ckpt show of a missing step names it and the committed ones ({r.stderr.strip()})")
    r = run(["ckpt", "show", sr + "@x1"])
    check(r.returncode == 1 and "bad step" in r.stderr, f"bad step refused ({r.stderr.strip()})")
    r = run(["ckpt", "ls", f"{store}/nope"])
    check(r.returncode == 1 and "nope" in r.stderr, f"missing run named ({r.stderr.strip()})")
    for cmd in [["ckpt", "--help"], ["ckpt", "ls", "--help"], ["ckpt", "show", "--help"], ["ckpt", "export", "--help"]]:
        r = run(cmd)
        check(r.returncode == 0 and "usage" in r.stdout, f"{' '.join(cmd)} prints usage")
    r = run(["ckpt", "frob", sr])
    check(r.returncode == 2 and "frob" in r.stderr, "unknown ckpt subcommand refused")
    r = run(["ckpt", "export", sr])
    check(r.returncode == 2 and "--out" in r.stderr, "export without --out refused")
    r = run(["ckpt", "export", sr, "--out", f"{tmp}/x", "--dtype", "fp16"])
    check(r.returncode == 2 and "fp16" in r.stderr, "export --dtype fp16 refused")
    r = run(["ckpt", "ls", f"file://{sr}"])
    check(r.returncode == 0 and "committed" in r.stdout, "ckpt ls takes a file:// URL")

    # --- export -------------------------------------------------------------------------------
    cfg = man["config"]["model"]
    names = spec_names(cfg["n_layers"], cfg["n_experts"], cfg["switch_every"])
    ck = {}
    for p in sorted(glob.glob(f"{sr}/ckpt/step-000000010/*.safetensors")):
        if ".optim." in p:
            continue
        t, _ = safetensors_io.load_file(p)
        for k, v in t.items():
            if k in ck:
                check(False, f"{k} stored once in the checkpoint")
            ck[k] = v
    r16 = run(["ckpt", "export", sr, "--out", f"{tmp}/model.safetensors"])
    r32 = run(["ckpt", "export", sr + "@10", "--out", f"{tmp}/model32.safetensors", "--dtype", "fp32"])
    check(r16.returncode == 0 and r32.returncode == 0, f"export bf16 (default) and fp32 ({r16.stderr}{r32.stderr})")
    try:
        e16, meta16 = safetensors_io.load_file(f"{tmp}/model.safetensors")
        e32, meta32 = safetensors_io.load_file(f"{tmp}/model32.safetensors")
    except Exception as ex:  # noqa: BLE001
        check(False, f"the strict reader loads the exports ({ex})")
        e16 = e32 = {}
        meta16 = meta32 = {}
    check(sorted(e16) == sorted(names) and sorted(e32) == sorted(names),
          f"exports hold exactly the {len(names)} spec names (no moments)")
    check(meta16.get("format") == "pt" and meta32.get("format") == "pt", "metadata format=pt")
    check(sorted(ck) == sorted(names), "the checkpoint's parameter files hold the same names")
    check(all(e16[k].dtype == torch.bfloat16 for k in e16) and all(e32[k].dtype == torch.float32 for k in e32),
          "dtypes: BF16 / F32")
    ok16 = all(k in e16 and e16[k].shape == ck[k].shape and torch.equal(bits(e16[k]), bits(ck[k].to(torch.bfloat16)))
               for k in ck)
    check(ok16, "bf16 export == torch's bf16 rounding of the fp32 checkpoint, bit for bit")
    ok32 = all(k in e32 and torch.equal(bits(e32[k]), bits(ck[k])) for k in ck)
    check(ok32, "fp32 export is bit-identical to the checkpoint")
    check(not glob.glob(f"{tmp}/*.tmp*"), "no temporary file left next to the export")
    r = run(["ckpt", "export", sr + "@3", "--out", f"{tmp}/m3.safetensors"])
    check(r.returncode == 1 and "3" in r.stderr and not os.path.exists(f"{tmp}/m3.safetensors"),
          f"export of a missing step fails and writes nothing ({r.stderr.strip()})")

    # --- corruption: one byte of an expert file -------------------------------------------------
    cstore = f"{tmp}/cstore"
    shutil.copytree(store, cstore)
    victim = f"{cstore}/run/ckpt/step-000000010/expert-0003.safetensors"
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) - 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
    r = run(["ckpt", "show", f"{cstore}/run"])
    bad = [l for l in r.stdout.splitlines() if "FAILED" in l]
    check(r.returncode == 1 and any("expert-0003.safetensors" in l for l in bad) and "expert-0003" in r.stderr,
          f"ckpt show reports the corrupted expert file and exits 1 ({r.stderr.strip()})")
    check(all("ok" in l for l in r.stdout.splitlines() if re.match(r"^\s+(dense|expert-000[0-24-7])", l)),
          "the other files still verify")
    r = run(["ckpt", "show", f"{cstore}/run@5"])
    check(r.returncode == 0 and "verified" in r.stdout, "the older checkpoint still verifies")
    r = run(["ckpt", "export", f"{cstore}/run", "--out", f"{tmp}/bad.safetensors"])
    check(r.returncode == 1 and "expert-0003" in r.stderr and not os.path.exists(f"{tmp}/bad.safetensors"),
          f"export refuses the corrupted checkpoint naming the file ({r.stderr.strip()})")

    # --- debris: a step folder without a manifest ---------------------------------------------
    deb = f"{sr}/ckpt/step-000000015"
    os.makedirs(deb)
    shutil.copy(f"{sr}/ckpt/step-000000010/dense.safetensors", deb)
    st, r = ls_steps(sr)
    check(st == {15: "uncommitted", 10: "committed", 5: "committed"} and "debris" in r.stdout,
          f"ckpt ls marks the folder without manifest as uncommitted ({r.stdout})")
    r = run(["ckpt", "show", sr + "@15"])
    check(r.returncode == 1 and "not committed" in r.stderr, f"ckpt show of debris explains ({r.stderr.strip()})")
    r = run(["ckpt", "show", sr])
    check(r.returncode == 0 and "step 10" in r.stdout, "ckpt show without @STEP skips the debris")
    r = run(["train", CFG] + small(tmp, "run", store, steps=20) + ["--resume"])
    check(r.returncode == 0 and "resumed from checkpoint step 10" in r.stderr,
          f"--resume ignores the debris at 15 and resumes from 10 ({r.stderr[-300:]})")
    st, _ = ls_steps(sr)
    check(st == {20: "committed", 15: "committed", 10: "committed"},
          f"the resumed run committed 15 over the debris and 20; keep_last=3 removed 5 ({st})")
    r = run(["ckpt", "show", sr + "@15"])
    check(r.returncode == 0 and "verified" in r.stdout, "the re-saved step 15 verifies")

    # --- SIGKILL during an async upload (file store) --------------------------------------------
    kill_resume_check(f"{tmp}/kstore", tmp, "k")

    sytest.remove_tmp(tmp)
    print(f"{len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
