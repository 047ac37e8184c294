#!/usr/bin/python3
"""The tables of bench/run.sh, from its RESULT lines (one file per family and round, each line
"SIDE name=... ms=... ..."; SIDE: sy, torch, torchP, pypi):
  bench/run_tables.py table FILE          one family's table of one round
  bench/run_tables.py summary BASE N      one family over rounds BASE-1 .. BASE-N: each ratio
                                          paired within its round, median, range, rounds
                                          meeting issue 8's targets"""
import statistics
import sys


def load(path):
    """{name: {side: {field: value}}}; "torch" = the faster of Debian torch's two OpenMP wait
    policies (torch: default, torchP: OMP_WAIT_POLICY=PASSIVE)."""
    rows = {}
    for line in open(path):
        side, *kv = line.split()
        d = dict(x.split("=", 1) for x in kv)
        rows.setdefault(d["name"], {})[side] = d
    for r in rows.values():
        tor = [k for k in ("torch", "torchP") if k in r]
        r["torch"] = min((r[k] for k in tor), key=lambda d: float(d["ms"]))
    return rows


def table(path):
    rows = load(path)
    pypi = all("pypi" in r for r in rows.values())
    sg = float(rows["sgemm"]["sy"]["gflops"])
    names = {"sgemm": "sgemm 2048^3", "switch": "Switch fwd+bwd", "switch_fwd": "...forward alone",
             "switch_skew": "Switch fwd+bwd, skewed", "skew_fwd": "...forward alone",
             "step": "tiny train step"}
    hdr = f"| {'case':<24} | {'switchyard ms':>13} | {'torch ms':>9} | {'ratio':>6} |"
    if pypi:
        hdr += f" {'PyPI torch ms':>13} | {'ratio':>6} |"
    hdr += f" {'GFLOP/s':>8} | {'% of sgemm':>10} |"
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    def line(label, s_ms, t_ms, p_ms, gf):
        out = f"| {label:<24} | {s_ms:13.2f} | {t_ms:9.2f} | {t_ms / s_ms:6.2f} |"
        if pypi:
            out += f" {p_ms:13.2f} | {p_ms / s_ms:6.2f} |"
        gfs = f"{gf:8.1f}" if gf else f"{'-':>8}"
        pct = f"{100 * gf / sg:9.1f}%" if gf else f"{'-':>10}"
        print(out + f" {gfs} | {pct} |")
    for n in ("sgemm", "switch", "switch_skew", "step"):
        s, t = rows[n]["sy"], rows[n]["torch"]
        p = rows[n].get("pypi", {})
        if n == "sgemm":
            line("sgemm 2048^3 (OpenBLAS)", float(s["ms"]), float(t["ms"]), float(p.get("ms", "nan")), float(s["gflops"]))
            line("sgemm via sy_sgemm tiles", float(s["tiled_ms"]), float(t["ms"]), float(p.get("ms", "nan")), float(s["tiled_gflops"]))
            continue
        line(names[n], float(s["ms"]), float(t["ms"]), float(p.get("ms", "nan")), float(s["gflops"]) if "gflops" in s else None)
        if n.startswith("switch"):
            line("...forward alone", float(s["fwd_ms"]), float(t["fwd_ms"]), float(p.get("fwd_ms", "nan")), None)
    print()
    print("ratio = torch ms / switchyard ms (> 1: switchyard faster); medians; Debian torch ms is the\n"
          "faster of its two OpenMP wait policies" + ("; PyPI torch: its own MKL/oneDNN" if pypi else ""))
    for n in ("switch", "switch_skew"):
        sw = rows[n]
        print(f"{names[n]}: kept {sw['sy']['kept']}/{sw['sy']['G']} (switchyard) vs "
              f"{sw['torch']['kept']}/{sw['torch']['G']} (torch), capacity {sw['sy']['capacity']}; "
              f"aux {float(sw['sy']['aux']):.4f}/{float(sw['torch']['aux']):.4f}; "
              f"fwd/bwd ms {float(sw['sy']['fwd_ms']):.2f}/{float(sw['sy']['bwd_ms']):.2f} vs "
              f"{float(sw['torch']['fwd_ms']):.2f}/{float(sw['torch']['bwd_ms']):.2f}")
    st = rows["step"]
    print(f"Step: tokens/s switchyard {float(st['sy']['tokens_per_s']):.0f}, torch "
          f"{float(st['torch']['tokens_per_s']):.0f}; loss {float(st['sy']['loss0']):.4f}->"
          f"{float(st['sy']['loss_last']):.4f} vs {float(st['torch']['loss0']):.4f}->"
          f"{float(st['torch']['loss_last']):.4f}")

def summary(base, rounds):
    R = [load(f"{base}-{i}") for i in range(1, rounds + 1)]
    pypi = all("pypi" in r for rows in R for r in rows.values())
    # (label, case, field, reference, target): issue 8's targets
    checks = [("Switch fwd+bwd / Debian torch", "switch", "ms", "torch", 1.5),
              ("...forward alone / Debian torch", "switch", "fwd_ms", "torch", 1.3),
              ("Switch skewed / Debian torch", "switch_skew", "ms", "torch", 1.5),
              ("...forward alone / Debian torch", "switch_skew", "fwd_ms", "torch", 1.3),
              ("tiny train step / Debian torch", "step", "ms", "torch", 1.5)]
    if pypi:
        checks += [("Switch fwd+bwd / PyPI torch", "switch", "ms", "pypi", 1.0),
                   ("Switch skewed / PyPI torch", "switch_skew", "ms", "pypi", 1.0),
                   ("tiny train step / PyPI torch", "step", "ms", "pypi", 1.0)]
    hdr = f"| {'case':<34} | {'target':>6} | {'median':>6} | {'range':>11} | {'rounds meeting':>14} |"
    print(hdr)
    print("|" + "|".join("-" * len(c) for c in hdr.split("|")[1:-1]) + "|")
    def row(label, vals, target, pct=False):
        med = statistics.median(vals)
        meet = sum(v >= target for v in vals)
        f = (lambda v: f"{v:.1f}") if pct else (lambda v: f"{v:.2f}")
        rng = f"{f(min(vals))}-{f(max(vals))}"
        print(f"| {label:<34} | {f(target):>6} | {f(med):>6} | {rng:>11} | {meet:>7} of {len(vals):<3} |")
    for label, case, field, ref, target in checks:
        row(label, [float(r[case][ref][field]) / float(r[case]["sy"][field]) for r in R], target)
    row("Switch fwd+bwd, % of sgemm", [100 * float(r["switch"]["sy"]["gflops"]) / float(r["sgemm"]["sy"]["gflops"]) for r in R], 75.0, True)
    row("Switch skewed, % of sgemm", [100 * float(r["switch_skew"]["sy"]["gflops"]) / float(r["sgemm"]["sy"]["gflops"]) for r in R], 75.0, True)
    print()
    print("ratio = torch ms / switchyard ms, both sides of one round (measured minutes apart, one\n"
          "process at a time); switchyard Switch fwd+bwd ms by round: " +
          ", ".join(f"{float(r['switch']['sy']['ms']):.1f}" for r in R) +
          "; Debian torch: " + ", ".join(f"{float(r['switch']['torch']['ms']):.1f}" for r in R))

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "table":
        table(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "summary":
        summary(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)
