#!/usr/bin/env python3
"""mailgate vs Dovecot: Markdown tables from result lines (key=value, as written by
bench/mailgate/run.sh and the shared kit's run-bench.sh).

  bench/mailgate/compare.py MAILGATE_RESULTS_DIR [DOVECOT_RESULTS_DIR]

DOVECOT_RESULTS_DIR defaults to /work/shared/bench/results/dovecot-2.3.19.1-2026-11-26.
As in the kit's table.py, a later line for the same (label, scenario, mode, conc)
replaces an earlier one (re-runs), and DISCARDED lines are skipped.
"""
import os
import sys

DOVECOT = "/work/shared/bench/results/dovecot-2.3.19.1-2026-11-26"


def load(path):
    """(scenario, mode, conc) -> key/value dict, last line wins."""
    out = {}
    if not os.path.exists(path):
        return out
    for line in open(path):
        if line.startswith("DISCARDED") or " idle_" in line or "sessions_per_s" not in line:
            continue
        kv = dict(t.split("=", 1) for t in line.split() if "=" in t)
        out[(kv["scenario"], kv["mode"], kv["conc"])] = kv
    return out


def idle_lines(path):
    """mode -> per-connection deltas line, and the held/baseline lines."""
    out = {}
    if not os.path.exists(path):
        return out
    for line in open(path):
        kv = dict(t.split("=", 1) for t in line.split() if "=" in t)
        if "idle_conns" in kv:
            out[kv["mode"]] = kv
    return out


def f(kv, key, fmt="%.1f"):
    if not kv or key not in kv:
        return "-"
    try:
        return fmt % float(kv[key])
    except ValueError:
        return kv[key]


def lat(kv):
    if not kv:
        return "-"
    return "%s / %s" % (f(kv, "p50_ms", "%.2f" if float(kv["p50_ms"]) < 10 else "%.0f"),
                        f(kv, "p99_ms", "%.2f" if float(kv["p99_ms"]) < 10 else "%.0f"))


def noise(kv):
    if not kv:
        return "-"
    return "%s / %s" % (kv.get("pre_run_host_busy_pct", "-"), f(kv, "foreign_cpu_pct"))


def errors(kv):
    if not kv:
        return "-"
    return kv["errors"] if kv["errors"] == "0" else "%s (%s)" % (kv["errors"], kv.get("error_kinds"))


def main():
    mg_dir = sys.argv[1]
    dv_dir = sys.argv[2] if len(sys.argv) > 2 else DOVECOT
    mg = load(os.path.join(mg_dir, "matrix.txt"))
    dv = load(os.path.join(dv_dir, "plainpw.txt"))
    dvp = load(os.path.join(dv_dir, "perf-plainpw-matrix.txt"))
    for scen in ("login", "retr-all"):
        print("\n#### %s\n" % scen)
        mb = scen == "retr-all"
        print("| mode | conc | mailgate sess/s | mailgate p50 / p99 ms | mailgate srv CPU ms/sess |"
              + (" mailgate MB/s |" if mb else "")
              + " errors | pre-run busy % / foreign CPU % | Dovecot default sess/s | Dovecot default srv CPU ms/sess | Dovecot perf sess/s | Dovecot perf srv CPU ms/sess | mailgate / Dovecot default |")
        print("|---|---:|---:|---:|---:|" + ("---:|" if mb else "") + "---:|---:|---:|---:|---:|---:|---:|")
        for mode in ("plain", "stls", "tls"):
            for conc in ("1", "16", "128"):
                k = (scen, mode, conc)
                m, d, p = mg.get(k), dv.get(k), dvp.get(k)
                ratio = "-"
                if m and d:
                    ratio = "%.0fx" % (float(m["sessions_per_s"]) / float(d["sessions_per_s"]))
                print("| %s | %s | %s | %s | %s |%s %s | %s | %s | %s | %s | %s | %s |" % (
                    mode, conc, f(m, "sessions_per_s"), lat(m), f(m, "server_cpu_ms_per_session", "%.2f"),
                    (" %s |" % f(m, "mb_per_s")) if mb else "", errors(m), noise(m),
                    f(d, "sessions_per_s"), f(d, "server_cpu_ms_per_session"),
                    f(p, "sessions_per_s"), f(p, "server_cpu_ms_per_session"), ratio))

    nc = load(os.path.join(mg_dir, "nocache.txt"))
    da = load(os.path.join(dv_dir, "argon2id.txt"))
    if nc:
        print("\n#### argon2id on every login (mailgate `auth.cache_ttl_secs = 0`, m=19456 KiB t=2; Dovecot argon2id m=65536 KiB t=3)\n")
        print("| scenario | mode | conc | mailgate sess/s | mailgate p50 / p99 ms | mailgate srv CPU ms/sess | errors | pre-run busy % / foreign CPU % | Dovecot argon2id sess/s | Dovecot p50 / p99 ms | Dovecot srv CPU ms/sess |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for k in sorted(nc, key=lambda k: (k[0], ["plain", "stls", "tls"].index(k[1]), int(k[2]))):
            m, d = nc[k], da.get(k)
            print("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                k[0], k[1], k[2], f(m, "sessions_per_s"), lat(m), f(m, "server_cpu_ms_per_session", "%.2f"),
                errors(m), noise(m), f(d, "sessions_per_s"), lat(d), f(d, "server_cpu_ms_per_session")))

    bg = load(os.path.join(mg_dir, "big.txt"))
    db = load(os.path.join(dv_dir, "big-plainpw.txt"))
    if bg:
        print("\n#### 5 MiB messages (big@example.com, 5 x ~5 MiB, retr-all)\n")
        print("| mode | conc | mailgate MB/s | mailgate sess/s | mailgate p50 / p99 ms | mailgate srv CPU ms/sess | client CPU % of a core | errors | Dovecot MB/s | Dovecot srv CPU ms/sess |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for mode in ("plain", "stls", "tls"):
            for conc in ("1", "4"):
                k = ("retr-all", mode, conc)
                m, d = bg.get(k), db.get(k)
                cli = "-"
                if m:
                    cli = "%.0f" % (100 * float(m["client_cpu_s"]) / float(m["elapsed_s"]))
                print("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                    mode, conc, f(m, "mb_per_s"), f(m, "sessions_per_s", "%.2f"), lat(m),
                    f(m, "server_cpu_ms_per_session"), cli, errors(m), f(d, "mb_per_s"),
                    f(d, "server_cpu_ms_per_session")))

    di = idle_lines(os.path.join(dv_dir, "idle-plainpw.txt"))
    dp = idle_lines(os.path.join(dv_dir, "idle-perf-plainpw.txt"))
    variants = [("idle", "as shipped"), ("idle-mmapthr", "MALLOC_MMAP_THRESHOLD_=131072 (diagnostic)")]
    if any(idle_lines(os.path.join(mg_dir, v + ".txt")) for v, _ in variants):
        print("\n#### 1000 idle logged-in sessions (server RSS/PSS while held minus before, / 1000)\n")
        print("| mode | mailgate allocator | mailgate RSS KiB/session | mailgate PSS KiB/session | Dovecot default RSS / PSS KiB/session | Dovecot perf RSS / PSS KiB/session |")
        print("|---|---|---:|---:|---:|---:|")
        for v, what in variants:
            mi = idle_lines(os.path.join(mg_dir, v + ".txt"))
            for mode in ("plain", "tls"):
                m = mi.get(mode)
                if not m:
                    continue
                d, p = di.get(mode), dp.get(mode)
                print("| %s | %s | %s | %s | %s | %s |" % (
                    mode, what, m["rss_kb_per_conn"], m["pss_kb_per_conn"],
                    "%s / %s" % (d["rss_kb_per_conn"], d["pss_kb_per_conn"]) if d else "-",
                    "%s / %s" % (p["rss_kb_per_conn"], p["pss_kb_per_conn"]) if p else "-"))

if __name__ == "__main__":
    main()
