"""Merges fig2.json files of the same sweep run at different depths into one fig2.json and redraws its PNGs.

    python docs/results/merge_fig2.py OUT_DIR A/fig2.json B/fig2.json [...]

The inputs must agree on everything but the depths (config, schemes, seeds, a) and must not share a
depth; the runs are concatenated in the order run_fig2 writes them (scheme, then L, then seed), each
input's machine, wall time and commit are kept under "parts", and "seconds" is their sum. Nothing is
recomputed: every run is the JSON record its own launch wrote.
"""
import json
import os
import sys


def merge(datas):
    first = datas[0]
    for key in ("figure", "quick", "config", "schemes", "seeds", "a"):
        for d in datas[1:]:
            if d.get(key) != first.get(key):
                raise ValueError("the inputs differ in %r: %r vs %r" % (key, first.get(key), d.get(key)))
    if first.get("figure") != "fig2":
        raise ValueError("not a fig2.json (figure = %r)" % (first.get("figure"),))
    depths = [L for d in datas for L in d["depths"]]
    if len(set(depths)) != len(depths):
        raise ValueError("the inputs share a depth: %s" % depths)
    depths = sorted(depths)
    schemes, seeds = first["schemes"], first["seeds"]
    runs = sorted((r for d in datas for r in d["runs"]),
                  key=lambda r: (schemes.index(r["scheme"]), r["L"], seeds.index(r["seed"])))
    out = {k: v for k, v in first.items() if k not in ("depths", "runs", "test_mse", "seconds", "machine", "files")}
    out.update(depths=depths, runs=runs, seconds=sum(d["seconds"] for d in datas), machine=first["machine"],
               parts=[{"depths": d["depths"], "seconds": d["seconds"], "machine": d["machine"]} for d in datas],
               test_mse={s: [[r["final"]["test_mse"] for r in runs if r["scheme"] == s and r["L"] == L]
                             for L in depths] for s in schemes})
    return out


def main(argv):
    if len(argv) < 3:
        sys.exit("usage: python docs/results/merge_fig2.py OUT_DIR A/fig2.json B/fig2.json [...]")
    try:
        datas = []
        for path in argv[1:]:
            with open(path) as f:
                datas.append(json.load(f))
        data = merge(datas)
    except (OSError, ValueError) as e:
        sys.exit("merge_fig2.py: %s" % e)
    from leakycuda.experiments import file_names, plot_fig2

    out = argv[0]
    os.makedirs(out, exist_ok=True)
    files = plot_fig2(data, out)
    files["json"] = os.path.join(out, "fig2.json")
    data["files"] = file_names(files)
    with open(files["json"], "w") as f:
        json.dump(data, f, indent=1)
    print("wrote", ", ".join(files.values()))


if __name__ == "__main__":
    main(sys.argv[1:])
