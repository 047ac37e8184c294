"""Sample order and `data prepare`, checked against an independent Python model (model spec §6).

The PRNG of src/base/rng.h (SplitMix64, FNV-1a keys, rejection sampling) and both pinned
permutations of src/data/data.h (data.order: the keyed Feistel network with cycle walking, the
default, and the Fisher-Yates table of older runs) are re-implemented here from their
documentation; tests/sy_dataorder must produce the same window ids and first tokens, in both
orders, including across epoch boundaries. tests/sy_dataprep (which runs sy_data_cli) must write shards whose tokens are the
concatenated input bytes, split at the documented point. Corrupt shards must be refused with the
file named. Env: SY_BUILD (build dir).
"""
import glob
import os
import random
import struct
import sys
import tempfile

import sytest
from sytest import SY

DATAORDER = sytest.tool("sy_dataorder")
DATAPREP = sytest.tool("sy_dataprep")
MASK = (1 << 64) - 1
MAGIC = 20240520

# ---- rng.h in Python ------------------------------------------------------------------------


def mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def fnv1a64(s):
    h = 0xCBF29CE484222325
    for c in s.encode():
        h = ((h ^ c) * 0x100000001B3) & MASK
    return h


class Rng:
    def __init__(self, seed, tag, a=0, b=0, c=0):
        z = mix64(seed ^ fnv1a64(tag))
        z = mix64(z ^ a)
        z = mix64(z ^ b)
        self.state = mix64(z ^ c)

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        return mix64(self.state)

    def below(self, n):
        limit = (MASK // n) * n
        while True:
            x = self.next()
            if x < limit:
                return x % n


def perm(seed, epoch, n):
    r = Rng(seed, "data.perm", epoch)
    p = list(range(n))
    for i in range(n - 1, 0, -1):
        k = r.below(i + 1)
        p[i], p[k] = p[k], p[i]
    return p


def feistel(seed, epoch, n):
    """perm[i] as a function (model spec §6, data.order = feistel)."""
    h = 1
    while h < 32 and (1 << (2 * h)) < n:
        h += 1
    mask = (1 << h) - 1
    r = Rng(seed, "data.order", epoch)
    keys = [r.next() for _ in range(6)]

    def F(x):
        L, R = x >> h, x & mask
        for k in keys:
            L, R = R, L ^ (mix64(R ^ k) & mask)
        return (L << h) | R

    def at(i):
        x = F(i)
        while x >= n:
            x = F(x)
        return x
    return at


# ---- shards ---------------------------------------------------------------------------------


def write_shard(path, tokens, magic=MAGIC, version=1, count=None, trunc=0):
    hdr = [0] * 256
    hdr[0], hdr[1], hdr[2] = magic, version, len(tokens) if count is None else count
    data = struct.pack("<256i", *hdr) + struct.pack("<%dH" % len(tokens), *tokens)
    with open(path, "wb") as f:
        f.write(data[: len(data) - trunc])


def read_shard(path):
    with open(path, "rb") as f:
        data = f.read()
    hdr = struct.unpack("<256i", data[:1024])
    assert hdr[0] == MAGIC and hdr[1] == 1, (path, hdr[:3])
    assert len(data) == 1024 + 2 * hdr[2], (path, len(data), hdr[2])
    return list(struct.unpack("<%dH" % hdr[2], data[1024:]))


def expected_order(shards, seed, T, M, b, steps, order="feistel"):
    """Lines 's m j window first_token' from spec §6, computed independently."""
    windows = []  # (shard tokens, start offset) in index order
    for toks in shards:
        nw = (len(toks) - 1) // T if len(toks) >= T + 1 else 0
        windows += [(toks, k * T) for k in range(nw)]
    n = len(windows)
    perms = {}
    out = []
    for s in range(steps):
        for m in range(M):
            for j in range(b):
                idx = s * M * b + m * b + j
                ep = idx // n
                if ep not in perms:
                    perms[ep] = feistel(seed, ep, n) if order == "feistel" else perm(seed, ep, n).__getitem__
                w = perms[ep](idx % n)
                toks, off = windows[w]
                out.append("%d %d %d %d %d" % (s, m, j, w, toks[off]))
    return out, n


def run(cmd):
    return sytest.run(cmd, capture_output=True, text=True, timeout=120)


def check_order(tmp):
    rnd = random.Random(7)
    sizes = [30, 3, 9, 17]  # T=4: 7 + 0 + 2 + 4 = 13 windows; the 3-token shard has none
    paths, shards = [], []
    for i, n in enumerate(sizes):
        toks = [rnd.randrange(65536) for _ in range(n)]
        p = os.path.join(tmp, "shard_%02d.bin" % i)
        write_shard(p, toks)
        paths.append(p)
        shards.append(toks)
    big = [rnd.randrange(65536) for _ in range(5000)]
    pbig = os.path.join(tmp, "big.bin")
    write_shard(pbig, big)

    cases = [
        # seed, T, M, b, steps, shard args, shard token lists (in the order opened)
        (1, 4, 2, 3, 5, paths, shards),                    # 30 samples over N=13: 3 epochs
        (12345678901234567890, 4, 1, 5, 7, paths, shards),  # b=5 straddles epochs mid-batch
        (0, 3, 3, 2, 4, paths, shards),                    # T=3: N = 9 + 0 + 2 + 5 = 16
        (MASK, 1, 2, 2, 9, paths, shards),                 # T=1: every token starts a window
        (42, 4, 2, 3, 5, [os.path.join(tmp, "shard_*.bin")], shards),  # glob, sorted
        (42, 4, 2, 3, 5, [paths[3], paths[0]], [shards[3], shards[0]]),  # given order
        (99, 7, 4, 8, 30, [pbig] + paths, [big] + shards),  # N > 700, ~1.3 epochs
    ]
    for order, flag in (("feistel", []), ("feistel", ["--order", "feistel"]), ("fisher-yates", ["--order", "fisher-yates"])):
        for seed, T, M, b, steps, args, toks in cases:
            want, n = expected_order(toks, seed, T, M, b, steps, order)
            r = run([DATAORDER] + flag + [str(seed), str(T), str(M), str(b), str(steps)] + args)
            assert r.returncode == 0, (seed, T, r.stderr)
            got = r.stdout.split("\n")[:-1]
            assert got == want, "%s order differs for seed=%d T=%d M=%d b=%d (N=%d): first diff %s" % (
                order, seed, T, M, b, n, next((g, w) for g, w in zip(got + [""] * len(want), want) if g != w))
        # Different seeds give different orders; a permutation per epoch.
        a = run([DATAORDER] + flag + ["1", "4", "1", "13", "1"] + paths).stdout.split("\n")[:-1]
        c = run([DATAORDER] + flag + ["2", "4", "1", "13", "1"] + paths).stdout.split("\n")[:-1]
        wa = [int(x.split()[3]) for x in a]
        assert sorted(wa) == list(range(13)), wa
        assert wa != [int(x.split()[3]) for x in c]
        print("order %s %s: %d cases ok" % (order, " ".join(flag) or "(default)", len(cases)))
    # the two orders differ (the default is not the old table under another name)
    a = run([DATAORDER, "1", "4", "1", "13", "1"] + paths).stdout
    c = run([DATAORDER, "--order", "fisher-yates", "1", "4", "1", "13", "1"] + paths).stdout
    assert a != c
    r = run([DATAORDER, "--order", "shuffle", "1", "4", "1", "13", "1"] + paths)
    assert r.returncode == 2 and "shuffle" in r.stderr, r.stderr
    # the feistel order at corpus sizes no test shard reaches (h up to 32), against the model
    rnd = random.Random(3)
    for n in [1, 2, 3, 4, 5, 17, 1 << 20, (1 << 32) - 1, 1 << 32, (1 << 32) + 1, 10**12 + 39, (1 << 64) - 1]:
        seed, ep = rnd.randrange(1 << 64), rnd.randrange(4)
        idx = sorted({rnd.randrange(n) for _ in range(20)} | {0, n - 1})
        r = run([DATAORDER, "--feistel", str(seed), str(ep), str(n)] + [str(i) for i in idx])
        f = feistel(seed, ep, n)
        got = [int(x) for x in r.stdout.split()]
        assert r.returncode == 0 and got == [f(i) for i in idx], (n, got[:4], [f(i) for i in idx][:4])
        assert all(0 <= g < n for g in got) and len(set(got)) == len(got), (n, got)
    # a bijection of [0, N) for every small N
    for n in range(1, 70):
        f = feistel(12345, 1, n)
        assert sorted(f(i) for i in range(n)) == list(range(n)), n
    print("feistel at N up to 2^64-1 ok")


def check_open_errors(tmp):
    good = os.path.join(tmp, "good.bin")
    write_shard(good, list(range(100)))
    bad = {
        "badmagic.bin": dict(magic=12345),
        "badversion.bin": dict(version=2),
        "truncated.bin": dict(trunc=3),
        "overcount.bin": dict(count=101),
    }
    for name, kw in bad.items():
        p = os.path.join(tmp, name)
        write_shard(p, list(range(100)), **kw)
        r = run([DATAORDER, "1", "4", "1", "2", "3", good, p])
        assert r.returncode != 0, name
        assert p in r.stderr, (name, r.stderr)
    short = os.path.join(tmp, "short.bin")
    with open(short, "wb") as f:
        f.write(b"\x58\xd8\x34\x01" + b"\0" * 100)
    r = run([DATAORDER, "1", "4", "1", "2", "3", short])
    assert r.returncode != 0 and short in r.stderr, r.stderr
    missing = os.path.join(tmp, "nope.bin")
    r = run([DATAORDER, "1", "4", "1", "2", "3", good, missing])
    assert r.returncode != 0 and missing in r.stderr, r.stderr
    nomatch = os.path.join(tmp, "zzz_*.bin")
    r = run([DATAORDER, "1", "4", "1", "2", "3", nomatch])
    assert r.returncode != 0 and nomatch in r.stderr, r.stderr
    tiny = os.path.join(tmp, "tiny.bin")  # 4 tokens < T+1 = 5: no window at all
    write_shard(tiny, [1, 2, 3, 4])
    r = run([DATAORDER, "1", "4", "1", "2", "3", tiny])
    assert r.returncode != 0 and "window" in r.stderr, r.stderr
    # token >= vocab: a shard input to prepare with --vocab-size 256
    hi = os.path.join(tmp, "hi", "hi.bin")
    os.makedirs(os.path.dirname(hi))
    toks = list(range(250, 260)) * 3
    write_shard(hi, toks)
    r = run([DATAPREP, "prepare", "--input", hi, "--out", os.path.join(tmp, "hi_out"),
             "--vocab-size", "256"])
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert hi in r.stderr and "token 256 at index 6 >= vocab_size 256" in r.stderr, r.stderr
    print("open errors ok")


def check_shards(out, prefix, stream, shard_tokens):
    paths = sorted(glob.glob(os.path.join(out, prefix + "_*.bin")))
    want_n = (len(stream) + shard_tokens - 1) // shard_tokens
    assert len(paths) == want_n, (prefix, paths, len(stream))
    for i, p in enumerate(paths):
        assert os.path.basename(p) == "%s_%06d.bin" % (prefix, i), p
        toks = read_shard(p)
        assert toks == stream[i * shard_tokens:(i + 1) * shard_tokens], (p, len(toks))


def check_prepare(tmp):
    src = os.path.join(tmp, "corpus")
    rnd = random.Random(3)
    printable = [c for c in range(1, 256) if c != 0]

    def text(n, nl_end):
        b = bytes(rnd.choice(printable) for _ in range(n))
        return b.rstrip(b"\n") + (b"\n" if nl_end else b"x")

    files = {  # path -> bytes; which ones count is written down by hand below
        "b.txt": text(120, True),
        "a": text(95, False),
        "a.txt": text(40, False),
        "sub/z.txt": text(200, True),
        "sub/deep/m": text(33, False),
        "idx.dat": text(50, True),           # skipped: .dat
        ".hidden": text(50, True),           # skipped: hidden
        ".git/config": text(50, True),       # skipped: hidden directory
        "bin.img": b"abc\0def" * 10,          # skipped: NUL bytes
        "empty": b"",                        # contributes nothing
    }
    for rel, data in files.items():
        p = os.path.join(src, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    os.symlink("..", os.path.join(src, "sub", "loop"))        # symlink loop
    os.symlink("b.txt", os.path.join(src, "b.txt.u8"))        # fortune-style duplicate
    extra = os.path.join(tmp, "extra.txt")
    with open(extra, "wb") as f:
        f.write(b"tail file\n")
    order = ["a", "a.txt", "b.txt", "sub/deep/m", "sub/z.txt"]  # sorted full paths
    stream = b""
    for rel in order:
        d = files[rel]
        stream += d + (b"" if d.endswith(b"\n") else b"\n")
    stream += b"tail file\n"  # inputs are taken in the order given
    stream = list(stream)

    out = os.path.join(tmp, "out", "nested")
    st = 64
    for vf in (0.1, 0.0, 0.5):
        r = run([DATAPREP, "prepare", "--input", src, extra, "--out", out,
                 "--val-fraction", str(vf), "--shard-tokens", str(st)])
        assert r.returncode == 0, r.stderr
        assert "bin.img" in r.stderr, r.stderr  # warned about
        n_val = int(len(stream) * vf)
        n_train = len(stream) - n_val
        check_shards(out, "train", stream[:n_train], st)
        check_shards(out, "val", stream[n_train:], st)
        assert "train %d tokens" % n_train in r.stdout, r.stdout
    assert not [f for f in os.listdir(out) if ".tmp" in f], os.listdir(out)

    # llm.c shards pass through unchanged (GPT-2 vocab), concatenated in the given order.
    s1, s2 = os.path.join(tmp, "g1.bin"), os.path.join(tmp, "g2.bin")
    t1 = [rnd.randrange(50257) for _ in range(300)]
    t2 = [rnd.randrange(50257) for _ in range(77)] + [50256]
    write_shard(s1, t1)
    write_shard(s2, t2)
    gout = os.path.join(tmp, "gout")
    r = run([DATAPREP, "prepare", "--input=" + s2, "--input", s1, "--out", gout,
             "--vocab-size", "50257", "--val-fraction", "0.25", "--shard-tokens", "100"])
    assert r.returncode == 0, r.stderr
    g = t2 + t1
    nv = int(len(g) * 0.25)
    check_shards(gout, "train", g[:len(g) - nv], 100)
    check_shards(gout, "val", g[len(g) - nv:], 100)

    # Refusals.
    r = run([DATAPREP, "prepare", "--input", extra, s1, "--out", os.path.join(tmp, "mix")])
    assert r.returncode == 1 and "mix" in r.stderr and extra in r.stderr, r.stderr
    r = run([DATAPREP, "prepare", "--input", extra, "--out", out, "--val-fraction", "0.6"])
    assert r.returncode == 2 and "--val-fraction" in r.stderr, r.stderr
    r = run([DATAPREP, "prepare", "--input", extra, "--out", out, "--frobnicate"])
    assert r.returncode == 2 and "--frobnicate" in r.stderr, r.stderr
    one = os.path.join(tmp, "one.txt")
    with open(one, "wb") as f:
        f.write(b"\n")
    r = run([DATAPREP, "prepare", "--input", one, "--out", os.path.join(tmp, "one_out"),
             "--val-fraction", "0"])
    assert r.returncode == 1 and "train" in r.stderr, r.stderr
    r = run([DATAPREP, "prepare", "--input", os.path.join(tmp, "absent"), "--out", out])
    assert r.returncode == 1 and "absent" in r.stderr, r.stderr
    r = run([DATAPREP, "prepare", "--help"])
    assert r.returncode == 0
    for opt in ("--input", "--out", "--val-fraction", "--shard-tokens", "--vocab-size"):
        assert opt in r.stdout, (opt, r.stdout)

    # The real CLI, when the lead's dispatcher is there.
    sy = SY
    if os.path.exists(sy):
        h = run([sy, "data", "prepare", "--help"])
        if h.returncode == 0 and "--shard-tokens" in h.stdout:
            o2 = os.path.join(tmp, "out_cli")
            r = run([sy, "data", "prepare", "--input", extra, "--out", o2, "--val-fraction",
                     "0"])
            assert r.returncode == 0, r.stderr
            assert read_shard(os.path.join(o2, "train_000000.bin")) == list(b"tail file\n")
            print("switchyard data prepare ok")
    print("prepare ok")


def main():
    for tool in (DATAORDER, DATAPREP):
        if not os.path.exists(tool):
            print("missing %s (build the test tools first)" % tool)
            return 1
    with tempfile.TemporaryDirectory() as tmp:
        for name, check in (("order", check_order), ("err", check_open_errors),
                            ("prep", check_prepare)):
            os.mkdir(os.path.join(tmp, name))
            check(os.path.join(tmp, name))
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
