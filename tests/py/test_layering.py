"""The layers of src/ and the way their dependencies run (docs/architecture.md "Layers") are
enforced by the build, not by convention. For every layer L this test takes the compiler command
the build uses for one of L's own files (compile_commands.json) and compiles a one-line probe
that includes one public header of every layer M:
  - it must compile when M is L or a layer L depends on (directly or through another layer);
  - it must fail ("No such file") when M is above L or beside it;
  - a private header (*_internal.h) of any folder must fail from every layer, its own included
    (a private header is included by bare name from beside it, never through the layer's name).
It also reads every #include of src/ so that a wrong-way include is named with its file and line.
The graph below is the design; changing it is a design change (update docs/architecture.md)."""
import glob
import json
import os
import re
import shlex
import sys

import sytest
from sytest import BUILD, SRC, check, failures

# layer -> the layers it builds on directly (CMakeLists.txt sy_layer DEPS)
DEPS = {
    "base": [],
    "proto": ["base"],
    "storage": ["base"],
    "data": ["storage"],
    "backend": ["base"],
    "comm": ["base"],
    "model": ["backend", "comm", "storage"],
    "worker": ["model", "data", "proto"],
    "coordinator": ["proto", "storage"],
    "cli": ["worker"],
}
def closure(layer):
    seen, todo = set(), [layer]
    while todo:
        x = todo.pop()
        if x not in seen:
            seen.add(x)
            todo.extend(DEPS[x])
    return seen


def compile_probe(args, directory, tmp, line):
    probe = os.path.join(tmp, "probe.c")
    with open(probe, "w") as f:
        f.write(line + "\nint sy_probe;\n")
    r = sytest.run(args + ["-fsyntax-only", probe], cwd=directory, capture_output=True, text=True)
    return r.returncode, r.stderr


def command_for(entries, layer):
    """The compiler arguments of one of the layer's own files, minus -c/-o/source."""
    for e in entries:
        path = os.path.realpath(e["file"])
        if os.path.dirname(path) == os.path.realpath(os.path.join(SRC, "src", layer)) and \
                not os.path.basename(path).startswith("main_"):
            args = e.get("arguments") or shlex.split(e["command"])
            out, skip = [], False
            for a in args:
                if skip:
                    skip = False
                    continue
                if a in ("-o", "-MF", "-MT", "-MQ"):
                    skip = True
                    continue
                if a in ("-c", "-MD", "-MMD") or os.path.realpath(os.path.join(e["directory"], a)) == path:
                    continue
                out.append(a)
            return out, e["directory"]
    return None, None


def main():
    cc_json = os.path.join(BUILD, "compile_commands.json")
    check(os.path.exists(cc_json), f"{cc_json} exists (CMAKE_EXPORT_COMPILE_COMMANDS)")
    if failures:
        return 1
    entries = json.load(open(cc_json))
    layers = sorted(d for d in os.listdir(os.path.join(SRC, "src"))
                    if os.path.isdir(os.path.join(SRC, "src", d)))
    check(sorted(DEPS) == layers, f"the folders of src/ are the layers of the design: {layers}")
    public, private = {}, []
    for layer in layers:
        hs = sorted(os.path.basename(h) for h in glob.glob(os.path.join(SRC, "src", layer, "*.h")))
        pub = [h for h in hs if not h.endswith("_internal.h")]
        private += [f"{layer}/{h}" for h in hs if h.endswith("_internal.h")]
        if pub:
            public[layer] = f"{layer}/{pub[0]}"
    check(len(private) > 0, f"private headers exist to probe: {private}")

    tmp = sytest.make_tmp("sy-layering-")
    for layer in layers:
        args, directory = command_for(entries, layer)
        check(args is not None, f"{layer}: a compile command for one of its files")
        if args is None:
            continue
        allowed = closure(layer)
        for other, header in sorted(public.items()):
            rc, err = compile_probe(args, directory, tmp, f'#include "{header}"')
            if other in allowed:
                check(rc == 0, f"{layer} may include {header}" + ("" if rc == 0 else f": {err.strip()[:300]}"))
            else:
                check(rc != 0 and "No such file" in err, f"{layer} cannot include {header} (layer {other})")
        for header in private:
            rc, err = compile_probe(args, directory, tmp, f'#include "{header}"')
            check(rc != 0 and "No such file" in err, f"{layer} cannot include the private {header}")

    # Every include in src/ names an allowed layer, or is a private header beside the file.
    bad = []
    for path in sorted(glob.glob(os.path.join(SRC, "src", "**", "*.[ch]"), recursive=True)):
        rel = os.path.relpath(path, os.path.join(SRC, "src"))
        layer = rel.split(os.sep)[0]
        here = os.path.dirname(path)
        for n, text in enumerate(open(path, encoding="utf-8"), 1):
            m = re.match(r'\s*#\s*include\s+"([^"]+)"', text)
            if not m:
                continue
            inc = m.group(1)
            if "/" in inc:
                ok = inc.split("/")[0] in closure(layer) and not inc.endswith("_internal.h")
            else:
                ok = inc.endswith("_internal.h") and os.path.exists(os.path.join(here, inc))
            if not ok:
                bad.append(f"src/{rel}:{n}: #include \"{inc}\"")
    check(not bad, "every #include in src/ names its layer and runs downwards" +
          ("" if not bad else ":\n  " + "\n  ".join(bad)))

    sytest.remove_tmp(tmp)
    if failures:
        print(f"{len(failures)} failure(s)")
        return 1
    print("all layering checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
