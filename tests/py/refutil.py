"""Helpers shared by the two reference tests, tests/py/test_reference.py (fp32) and
tests/py/test_reference_bf16.py (bf16): failures gathered and reported at the end, relative
errors, running the build's tools, reading what tests/sy_refdump wrote, and the shards both
train on. Not a test itself. Needs torch and tests/reference (callers put SRC/tests on sys.path
first).
"""
import glob
import json
import os
import subprocess

import sytest  # noqa: E402
from sytest import BUILD  # noqa: E402

import torch  # noqa: E402

from reference.model import RefConfig  # noqa: E402
from reference import safetensors_io as st  # noqa: E402

FAILURES = []  # every fail() message, in order
SUMMARY = []   # one line per case, printed by finish()


def fail(msg):
    FAILURES.append(msg)
    print("FAIL: " + msg, flush=True)


def rel(a, b):
    """||a - b|| / ||b|| of two tensors, in fp64."""
    a = a.detach().double()
    b = b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def rel_scalar(a, b, floor=1e-30):
    return abs(a - b) / max(abs(b), floor)


def run(cmd, **kw):
    """Runs cmd; its output (stdout and stderr together), or RuntimeError with it on a nonzero exit."""
    r = sytest.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, **kw)
    if r.returncode != 0:
        raise RuntimeError("command failed (exit %d): %s\n%s" % (r.returncode, " ".join(cmd), r.stdout))
    return r.stdout


def missing_tools(exes):
    """Prints a FAIL line and returns True when one of exes is not built."""
    for exe in exes:
        if not os.access(exe, os.X_OK):
            print("FAIL: %s not built (SY_BUILD=%s)" % (exe, BUILD))
            return True
    return False


def prepare_shards(tmp, dataprep, make_corpus):
    """make_corpus(path) into tmp, `sy_dataprep prepare` of it into tmp/shards: that folder, or
    None (with a FAIL line) when no train shard was written."""
    corpus = os.path.join(tmp, "corpus.txt")
    make_corpus(corpus)
    shards = os.path.join(tmp, "shards")
    run([dataprep, "prepare", "--input", corpus, "--out", shards])
    if not glob.glob(os.path.join(shards, "train_*.bin")):
        print("FAIL: sy_dataprep wrote no train shard in %s" % shards)
        return None
    return shards


def load_dump(out, K):
    """What sy_refdump --steps K wrote to out: a dict of cfgd (its config.json), cfg (RefConfig),
    losses (losses.json), tokens (int32 [K, M, b, T+1]) and the init, grads1 and final tensors."""
    with open(os.path.join(out, "config.json")) as f:
        cfgd = json.load(f)
    with open(os.path.join(out, "losses.json")) as f:
        losses = json.load(f)
    cfg = RefConfig.from_dict(cfgd)
    b, T, M = cfg.micro_batch_seqs, cfg.seq_len, cfg.n_micro
    raw = open(os.path.join(out, "tokens.bin"), "rb").read()
    expect = K * M * b * (T + 1) * 4
    if len(raw) != expect:
        raise RuntimeError("%s/tokens.bin: %d bytes, expected %d for int32 [K=%d, M=%d, b=%d, T+1=%d]"
                           % (out, len(raw), expect, K, M, b, T + 1))
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.int32).reshape(K, M, b, T + 1).clone()
    return {"cfgd": cfgd, "cfg": cfg, "losses": losses, "tokens": tokens,
            "init": st.load_file(os.path.join(out, "init.safetensors"))[0],
            "grads1": st.load_file(os.path.join(out, "grads1.safetensors"))[0],
            "final": st.load_file(os.path.join(out, "final.safetensors"))[0]}


def finish(ok_msg):
    """Prints the summary and the failures; the exit status (1 if any fail())."""
    print("\nsummary:")
    for line in SUMMARY:
        print("  " + line)
    if FAILURES:
        print("\n%d failure(s); first: %s" % (len(FAILURES), FAILURES[0]))
        return 1
    print(ok_msg)
    return 0
