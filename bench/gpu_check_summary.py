"""Summary of a bench/gpu_check.sh run: the stage table and the key numbers of every JSON it wrote, as text (stdout)
and JSON. Standard library only, and every part optional, so it runs whatever the stages left behind.

Usage: python bench/gpu_check_summary.py WORK_DIR SUMMARY_JSON
"""
import glob
import json
import os
import sys
import xml.etree.ElementTree as ET



def _strict(v):
    """v with every non-finite float as None (the project's strict-JSON convention, docs/DESIGN.md §3.4)."""
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return None
    if isinstance(v, dict):
        return {k: _strict(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_strict(x) for x in v]
    return v

def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_meta(work):
    meta = {}
    try:
        with open(os.path.join(work, "meta.txt")) as f:
            for line in f:
                if "=" in line:
                    k, v = line.rstrip("\n").split("=", 1)
                    meta[k] = v
    except OSError:
        pass
    return meta


def read_stages(work):
    rows = []
    try:
        with open(os.path.join(work, "stages.tsv")) as f:
            header = f.readline().rstrip("\n").split("\t")
            for line in f:
                rows.append(dict(zip(header, line.rstrip("\n").split("\t"))))
    except OSError:
        pass
    return rows


def fmt(v, spec="%.3f"):
    return "-" if v is None else spec % v


def selftest_part(work):
    d = load_json(os.path.join(work, "json", "selftest.json"))
    if d is None:
        return None, ["selftest: no selftest.json"]
    failed = [r for r in d.get("results", []) if r.get("status") == "FAIL"]
    lines = ["selftest --device %s: %d passed, %d failed, %d skipped in %.1f s"
             % (d.get("device"), d.get("passed", 0), d.get("failed", 0), d.get("skipped", 0), d.get("seconds", 0))]
    lines += ["  FAIL %s: %s" % (r["name"], r["detail"][:300]) for r in failed]
    part = {k: d.get(k) for k in ("device", "passed", "failed", "skipped", "seconds")}
    part["failed_checks"] = [{"name": r["name"], "detail": r["detail"]} for r in failed]
    return part, lines


def pytest_part(work):
    path = os.path.join(work, "json", "pytest_cuda.xml")
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None, ["pytest -m cuda: no junit XML (see logs/pytest.log)"]
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    seconds = sum(float(s.get("time", 0)) for s in suites)
    bad = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            bad.append("%s::%s" % (case.get("classname", ""), case.get("name", "")))
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    lines = ["pytest -m cuda: %d passed, %d failed, %d errors, %d skipped in %.0f s"
             % (passed, count["failures"], count["errors"], count["skipped"], seconds)]
    lines += ["  FAILED %s" % name for name in bad[:20]]
    if len(bad) > 20:
        lines.append("  ... and %d more" % (len(bad) - 20))
    return dict(count, passed=passed, seconds=seconds, failed_tests=bad), lines


def stack_part(work):
    d = load_json(os.path.join(work, "json", "bench_stack_cuda.json"))
    if d is None:
        return None, ["bench-stack: no bench_stack_cuda.json"]
    lines = ["stack forward+backward (ms; x = how many times faster the fused op is):",
             "  %-18s %5s %5s %5s %9s %9s %9s %9s %8s %8s %8s" % (
                 "row", "N", "w", "L", "fused", "eager", "graph-eag", "JAX scan", "x eager", "x graph", "x JAX")]
    keep = []
    for r in d.get("results", []):
        if "error" in r:
            lines.append("  %-18s error: %s" % (r.get("name"), r["error"][:200]))
        elif "batched_ms" in r:
            lines.append("  %s: %d models batched %s ms (graph %s), %d calls %s ms (%sx), JAX vmap %s ms (%sx)" % (
                r["name"], r["B"], fmt(r["batched_ms"]), fmt(r.get("batched_graph_ms")), r["B"],
                fmt(r.get("separate_ms")), fmt(r.get("speedup_vs_separate"), "%.1f"), fmt(r.get("jax_vmap_ms")),
                fmt(r.get("speedup_vs_jax_vmap"), "%.1f")))
        else:
            lines.append("  %-18s %5d %5d %5d %9s %9s %9s %9s %8s %8s %8s" % (
                r["name"], r["N"], r["w"], r["L"], fmt(r.get("fused_ms")), fmt(r.get("eager_ms")),
                fmt(r.get("eager_graph_ms")), fmt(r.get("jax_ms")), fmt(r.get("speedup_vs_eager"), "%.1f"),
                fmt(r.get("speedup_vs_eager_graph"), "%.1f"), fmt(r.get("speedup_vs_jax"), "%.1f")))
            if "jax_error" in r:
                lines.append("    JAX error: %s" % r["jax_error"][:200])
        keep.append({k: v for k, v in r.items() if not isinstance(v, (list, dict))})
    return keep, lines


def energies_part(work):
    d = load_json(os.path.join(work, "json", "bench_energies.json"))
    if d is None:
        return None, ["bench-energies: no bench_energies.json"]
    lines = ["energies + COI gradient (ms, median):"]
    for r in d.get("rows", []):
        if "error" in r:
            lines.append("  L=%d N=%d w=%d %-15s error: %s" % (r["L"], r["N"], r["w"], r["variant"], r["error"][:200]))
            continue
        lines.append("  L=%d N=%d w=%d %-15s ran %-14s %9s ms  x floor %s  x reference %s" % (
            r["L"], r["N"], r["w"], r["variant"], r.get("ran"), fmt(r.get("median_ms")),
            fmt(r.get("x_floor"), "%.1f"), fmt(r.get("speedup_vs_reference"), "%.1f")))
    return d.get("rows"), lines


def ensemble_part(work):
    d = load_json(os.path.join(work, "json", "bench_ensemble.json"))
    if d is None:
        return None, ["bench-ensemble: no bench_ensemble.json"]
    lines = ["ensemble rows:"]
    for r in d.get("results", []):
        lines.append("  %s | %s: %s" % (r.get("row"), r.get("variant"), r["error"][:200] if "error" in r else ", ".join(
            "%s %s" % (k, fmt(r[k], "%.3f")) for k in ("ms", "ms_per_model", "speedup") if r.get(k) is not None)))
    return d.get("results"), lines


def machine(work):
    for name in ("selftest.json", "bench_stack_cuda.json", "bench_energies.json", "bench_ensemble.json"):
        d = load_json(os.path.join(work, "json", name))
        if d:
            m = d.get("machine") or d.get("environment")
            if m:
                return m
    return None


def main():
    work, out_json = sys.argv[1], sys.argv[2]
    meta, stages = read_meta(work), read_stages(work)
    m = machine(work)
    lines = ["gpu_check: device %s, commit %s, fingerprint %s, budget %s s, stages run %d" % (
        meta.get("device"), meta.get("commit"), meta.get("fingerprint"), meta.get("budget_s"), len(stages))]
    if m:
        lines.append("machine: %s, driver %s, torch %s, CUDA %s, python %s" % (
            m.get("gpu") or m.get("cpu"), m.get("driver"), m.get("torch"), m.get("cuda"), m.get("python")))
    lines.append("%-15s %-8s %4s %8s %7s  %s" % ("stage", "status", "rc", "seconds", "limit", "note"))
    for s in stages:
        lines.append("%-15s %-8s %4s %8s %7s  %s" % (s.get("stage"), s.get("status"), s.get("rc"), s.get("seconds"),
                                                    s.get("limit_s"), s.get("note", "")))
    summary = {"meta": meta, "machine": m, "stages": stages}
    done = {s.get("stage") for s in stages}
    for key, stage, fn in (("selftest", "selftest", selftest_part), ("pytest", "pytest", pytest_part),
                           ("bench_stack", "bench-stack", stack_part), ("bench_energies", "bench-energies",
                                                                         energies_part),
                           ("bench_ensemble", "bench-ensemble", ensemble_part)):
        if stage not in done:
            continue
        try:
            part, text = fn(work)
        except Exception as e:  # one unreadable part must not hide the others
            part, text = None, ["%s: could not summarise (%r)" % (stage, e)]
        summary[key] = part
        lines += text
    demo = next((s for s in stages if s.get("stage") == "demo"), None)
    if demo is not None:
        summary["demo_wall_s"] = float(demo["seconds"]) if demo.get("status") == "ok" else None
        lines.append("demo --device %s: %s in %s s (wall, Python start included)"
                     % (meta.get("device"), demo.get("status"), demo.get("seconds")))
    summary["files"] = sorted(os.path.relpath(p, work) for p in glob.glob(os.path.join(work, "*", "*")))
    with open(out_json, "w") as f:
        json.dump(_strict(summary), f, indent=1, allow_nan=False)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
