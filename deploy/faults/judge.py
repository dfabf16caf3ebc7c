#!/usr/bin/env python3
"""Judges one fault-suite scenario and prints the suite's table (used by deploy/faults/run.sh).

  judge.py scenario --name N --dir D --loadtest-rc RC --secs S   -> one JSON line (the result)
  judge.py show --line JSON                                      -> that result, for humans
  judge.py table --results results.jsonl --secs S                -> the Markdown table
  judge.py verdict --results results.jsonl                       -> exit 1 if any failed
"""

import argparse
import json
import os
import sys

# What shows that each fault really hit the system, beyond "nothing was lost": (what, test).
EXPECT = {
    "kill-node": ("clients resumed after the kill (resumes > 0)", lambda r, m: r["resumes"] > 0),
    "rolling-restart": (
        "clients got `reconnect` frames (reconnect_requests > 0)",
        lambda r, m: r["reconnect_requests"] > 0,
    ),
    "pubsub-kill": (
        "nodes reconnected their pub/sub (ferry_pubsub_reconnects_total > 0)",
        lambda r, m: m["pubsub_reconnects"] > 0,
    ),
    "redis-restart": (
        "no inbox lost its data: no `reset` (resets = 0)",
        lambda r, m: r["resets"] == 0,
    ),
    "redis-pause": (
        "senders got `unavailable` (ferry_sends_total{outcome=unavailable} > 0)",
        lambda r, m: m["unavailable"] > 0,
    ),
    "node-cut": ("gw-3's clients resumed elsewhere (resumes > 0)", lambda r, m: r["resumes"] > 0),
}


def metrics(path):
    """Per node incarnation (node, pid): the last sample; summed over incarnations."""
    last = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                p = line.split()
                if len(p) != 8:
                    continue
                key = (p[1], p[2])
                vals = [int(x) for x in p[3:]]
                prev = last.get(key)
                # Counters only grow within one process: keep the largest seen.
                last[key] = vals if prev is None else [max(a, b) for a, b in zip(prev, vals)]
    tot = [sum(v[i] for v in last.values()) for i in range(5)]
    return {
        "server_delivered": tot[0],
        "unavailable": tot[2],
        "server_duplicate_sends": tot[3],
        "pubsub_reconnects": tot[4],
        "incarnations": len(last),
    }


def lines(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [l.rstrip("\n") for l in f if l.strip()]


def scenario(a):
    checks = lines(os.path.join(a.dir, "checks.txt"))
    notes = dict(l.split("=", 1) for l in lines(os.path.join(a.dir, "notes.txt")) if "=" in l)
    m = metrics(os.path.join(a.dir, "samples.txt"))
    report = None
    try:
        with open(os.path.join(a.dir, "report.json")) as f:
            report = json.loads(f.read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        pass
    res = {"name": a.name, "secs": a.secs, "loadtest_rc": a.loadtest_rc, "notes": notes, "metrics": m}
    if report is None:
        checks.append("FAIL the load generator produced a report (see loadtest.log)")
    else:
        r = report
        unique = r["delivered"] + r["unconfirmed_delivered"]
        res.update(
            sent=r["sent"],
            sent_duplicate=r["sent_duplicate"],
            send_errors=r["send_errors"],
            lost=r["lost"],
            out_of_order=r["out_of_order"],
            duplicates=r["duplicates"],
            seq_mismatch=r["seq_mismatch"],
            # Deliveries the nodes wrote beyond the distinct messages received: what the client
            # dropped by seq (plus writes lost with a killed socket). Sampled every 0.25 s, so a
            # node killed with SIGKILL may have delivered a few more than counted.
            redelivered=max(0, m["server_delivered"] - unique),
            # False when the samples missed some of a node's last writes (counts below the
            # distinct deliveries): then `redelivered` is a lower bound.
            redelivered_exact=m["server_delivered"] >= unique,
            drained=r["drained"],
            drain_secs=round(r["drain_secs"], 2),
            max_delivery_ms=round(r["latency_delivery"]["max_ms"]),
            p99_delivery_ms=round(r["latency_delivery"]["p99_ms"]),
            resumes=r["resumes"],
            reconnect_requests=r["reconnect_requests"],
            resets=r["resets"],
        )
        ok = lambda cond, what: checks.append(("ok   " if cond else "FAIL ") + what)
        ok(a.loadtest_rc == 0, f"the load generator's verdict passes (exit {a.loadtest_rc})")
        ok(r["connect_failed"] == 0, f"every client connected ({r['connect_failed']} failed)")
        ok(r["sent"] > 0, f"messages answered `sent`: {r['sent']}")
        ok(r["lost"] == 0, f"lost: {r['lost']}")
        ok(r["out_of_order"] == 0, f"out of order: {r['out_of_order']}")
        ok(r["duplicates"] == 0, f"stored twice / duplicates after dropping by seq: {r['duplicates']}")
        ok(r["seq_mismatch"] == 0, f"seq mismatch: {r['seq_mismatch']}")
        ok(r["foreign"] == 0, f"foreign (wrong user): {r['foreign']}")
        ok(r["drained"], f"every client caught up within the drain ({r['drain_secs']:.1f} s)")
        if a.name in EXPECT:
            what, test = EXPECT[a.name]
            ok(test(r, m), "the fault took effect: " + what)
    res["checks"] = checks
    res["passed"] = all(c.startswith("ok") for c in checks) and bool(checks)
    print(json.dumps(res))


def show(a):
    r = json.loads(a.line)
    print(f"--- {r['name']}: {'PASS' if r['passed'] else 'FAIL'} ({r['secs']} s)")
    for c in r["checks"]:
        print("    " + c)
    if "sent" in r:
        print(
            f"    sent {r['sent']} (duplicate {r['sent_duplicate']}), send errors {r['send_errors']}, "
            f"resumes {r['resumes']}, reconnect frames {r['reconnect_requests']}, "
            f"redelivered {r['redelivered']}, drain {r['drain_secs']} s, "
            f"max delivery {r['max_delivery_ms']} ms, metrics {r['metrics']}, notes {r['notes']}"
        )
    sys.stdout.flush()


def table(a):
    rows = [json.loads(l) for l in lines(a.results)]
    head = (
        "| scenario | result | sent | lost | out of order | duplicates before drop by seq "
        "(server redeliveries) | duplicates after | `sent` on retry (duplicate: true) | "
        "resumes | catch-up: drain after sending (s) | longest delivery (ms) | time (s) |"
    )
    print()
    print(head)
    print("|" + " --- |" * head.count(" | ") + " --- |")
    for r in rows:
        res = "PASS" if r["passed"] else "**FAIL**"
        if "sent" not in r:
            print(f"| {r['name']} | {res} | — | — | — | — | — | — | — | — | — | {r['secs']} |")
            continue
        print(
            f"| {r['name']} | {res} | {r['sent']} | {r['lost']} | {r['out_of_order']} | "
            f"{'' if r.get('redelivered_exact', True) else '≥'}{r['redelivered']} | {r['duplicates']} | {r['sent_duplicate']} | {r['resumes']} | "
            f"{r['drain_secs']:.2f} | {r['max_delivery_ms']} | {r['secs']} |"
        )
    passed = sum(r["passed"] for r in rows)
    print()
    print(f"{passed} of {len(rows)} scenarios passed in {a.secs} s.")


def verdict(a):
    rows = [json.loads(l) for l in lines(a.results)]
    failed = [r["name"] for r in rows if not r["passed"]]
    if failed or not rows:
        print(f"FAILED: {' '.join(failed) or 'no scenario ran'}")
        sys.exit(1)
    print("all scenarios passed")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scenario")
    s.add_argument("--name", required=True)
    s.add_argument("--dir", required=True)
    s.add_argument("--loadtest-rc", type=int, required=True)
    s.add_argument("--secs", type=int, required=True)
    s = sub.add_parser("show")
    s.add_argument("--line", required=True)
    s = sub.add_parser("table")
    s.add_argument("--results", required=True)
    s.add_argument("--secs", type=int, required=True)
    s = sub.add_parser("verdict")
    s.add_argument("--results", required=True)
    a = ap.parse_args()
    {"scenario": scenario, "show": show, "table": table, "verdict": verdict}[a.cmd](a)


if __name__ == "__main__":
    main()
