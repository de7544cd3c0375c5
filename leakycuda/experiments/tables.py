"""Markdown tables of a fig1.json or fig2.json written by `leakycuda reproduce fig1|fig2` (the tables of docs/results.md).

    python -m leakycuda.experiments.tables docs/results/fig1/fig1.json
    python -m leakycuda.experiments.tables docs/results/fig2/fig2.json

Per-seed values are listed in seed order, separated by " / ". Nothing is recomputed: every number is read
from the JSON (the targets are checked against the numbers as they are). Strict JSON (non-finite numbers as null)
and the older files with NaN / Infinity tokens both read (leakycuda._json).
"""
import statistics
import sys
from collections import defaultdict

from .. import _json


def _seeds(values, fmt="%.2f"):
    return " / ".join(fmt % v for v in values)


def _spread(values, fmt="%.3g"):
    return (fmt + " [" + fmt + ", " + fmt + "]") % (statistics.median(values), min(values), max(values))


def fig1_table(data):
    rows = defaultdict(list)
    for run in data["runs"]:
        rows[run["Lt"]].append(run)
    seeds = data["seeds"]
    out = ["Seeds %s; per-seed values in that order. Target (Lt >= 4): median -2H/Lt <= 3 <= min COI_gamma; "
           "Lt 6..16: both within 0.5 of 3; centred count = 3; stationarity <= 1e-2." % _seeds(seeds, "%d"), "",
           "| Lt | start | test MSE median [min, max] | median -2H/Lt | min COI_gamma | bracket holds | "
           "centred sv > 10% (X_mid) | mean share (X_mid) | stationarity (max over layers) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for Lt in sorted(rows):
        runs = sorted(rows[Lt], key=lambda r: r["seed"])
        s = [r["summary"] for r in runs]
        med, coi = [x["rank_median"] for x in s], [x["coi_min"] for x in s]
        holds = sum(m <= 3.0 <= c for m, c in zip(med, coi))
        start = "warm" if any(r.get("warm_start") for r in runs) else runs[0]["init"]
        out.append("| %g | %s | %s | %s | %s | %d of %d | %s | %s | %s |" % (
            Lt, start, _spread([r["final"]["test_mse"] for r in runs]), _seeds(med), _seeds(coi), holds, len(runs),
            _seeds([x["centred_count_mid"] for x in s], "%d"), _seeds([x["mean_share_mid"] for x in s]),
            _seeds([r["convergence"]["stationarity_max"] for r in runs])))
    return "\n".join(out)


def fig2_table(data):
    cells = defaultdict(list)
    for run in data["runs"]:
        cells[(run["scheme"], run["L"])].append(run)
    depths = sorted({d for _, d in cells})
    schemes = list(dict.fromkeys(s for s, _ in cells))
    out = ["Test MSE, median [min, max] over seeds %s." % _seeds(data["seeds"], "%d"), "",
           "| scheme | " + " | ".join("L = %d" % d for d in depths) + " |", "|---|" + "---|" * len(depths)]
    for sc in schemes:
        out.append("| %s | " % sc + " | ".join(
            _spread([r["final"]["test_mse"] for r in cells[(sc, d)]]) if (sc, d) in cells else "-" for d in depths)
            + " |")
    out += ["", "Train MSE and stationarity (max over layers), median over seeds:", "",
            "| scheme | " + " | ".join("L = %d" % d for d in depths) + " |", "|---|" + "---|" * len(depths)]
    for sc in schemes:
        out.append("| %s | " % sc + " | ".join(
            "%.3g, %.2g" % (statistics.median(r["final"]["train_mse"] for r in cells[(sc, d)]),
                            statistics.median(r["convergence"]["stationarity_max"] for r in cells[(sc, d)]))
            if (sc, d) in cells else "-" for d in depths) + " |")
    return "\n".join(out)


def main(argv):
    if len(argv) != 1:
        sys.exit("usage: python -m leakycuda.experiments.tables <fig1.json | fig2.json>")
    try:
        data = _json.load(argv[0])
    except (OSError, ValueError) as e:
        sys.exit("tables.py: cannot read %s: %s" % (argv[0], e))
    table = {"fig1": fig1_table, "fig2": fig2_table}.get(data.get("figure"))
    if table is None:
        sys.exit("tables.py: %s is not a fig1.json or fig2.json (figure = %r)" % (argv[0], data.get("figure")))
    print(table(data))
    print("\n%d runs, %.0f s in the sweep (%s, torch %s, commit %s)" % (
        len(data["runs"]), data["seconds"], data["machine"].get("cpu"), data["machine"].get("torch"),
        str(data["machine"].get("git_commit"))[:12]))


if __name__ == "__main__":
    main(sys.argv[1:])
