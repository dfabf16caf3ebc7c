#!/usr/bin/env python3
"""Judges one fault-suite scenario and prints the suite's table (used by deploy/faults/run.sh).

  judge.py scenario --name N --dir D --loadtest-rc RC --secs S   -> one JSON line (the result)
  judge.py show --line JSON                                      -> that result, for humans
  judge.py table --results results.jsonl --secs S                -> the Markdown table
  judge.py verdict --results results.jsonl                       -> exit 1 if any failed
"""

import argparse
import glob
import json
import os
import re
import sys

# What shows that each fault really hit the system, beyond "nothing was lost": [(what, test)].
EXPECT = {
    "kill-node": [("clients resumed after the kill (resumes > 0)", lambda r, m: r["resumes"] > 0)],
    "rolling-restart": [
        (
            "clients got `reconnect` frames (reconnect_requests > 0)",
            lambda r, m: r["reconnect_requests"] > 0,
        )
    ],
    "pubsub-kill": [
        (
            "nodes reconnected their pub/sub (ferry_pubsub_reconnects_total > 0)",
            lambda r, m: m["pubsub_reconnects"] > 0,
        )
    ],
    "redis-restart": [
        ("no inbox lost its data: no `reset` (resets = 0)", lambda r, m: r["resets"] == 0)
    ],
    "redis-pause": [
        (
            "senders got `unavailable` (ferry_sends_total{outcome=unavailable} > 0)",
            lambda r, m: m["unavailable"] > 0,
        )
    ],
    "node-cut": [
        ("gw-3's clients resumed elsewhere (resumes > 0)", lambda r, m: r["resumes"] > 0)
    ],
    "redis-amnesia": [
        ("clients learned `reset` (resets > 0)", lambda r, m: r["resets"] > 0),
        (
            "Redis lost messages answered `sent`, each reported (lost_reported > 0)",
            lambda r, m: r["lost_reported"] > 0,
        ),
        (
            "the nodes' audit counted the appends Redis lost (ferry_store_lost_appends_total > 0)",
            lambda r, m: m["store_lost_appends"] > 0,
        ),
    ],
    "redis-aof-rollback": [
        ("clients learned `reset` (resets > 0)", lambda r, m: r["resets"] > 0),
        (
            "the nodes ended epochs that went back (ferry_epochs_replaced_total > 0)",
            lambda r, m: m["epochs_replaced"] > 0,
        ),
        (
            "the audit found appends Redis lost (ferry_epochs_replaced_total{reason=append_lost} > 0)",
            lambda r, m: m["append_lost"] > 0,
        ),
    ],
    "replica-promote": [
        ("clients learned `reset` (resets > 0)", lambda r, m: r["resets"] > 0),
        (
            "the nodes ended epochs that went back (ferry_epochs_replaced_total > 0)",
            lambda r, m: m["epochs_replaced"] > 0,
        ),
        (
            "the audit found appends Redis lost (ferry_epochs_replaced_total{reason=append_lost} > 0)",
            lambda r, m: m["append_lost"] > 0,
        ),
    ],
    # On a Redis Cluster (run.sh --cluster; the fault script checks the cluster's side itself).
    "cluster-primary-kill": [
        (
            "sends to the shard failed while it had no primary "
            "(ferry_sends_total{outcome=unavailable} > 0)",
            lambda r, m: m["unavailable"] > 0,
        )
    ],
    "cluster-reshard": [
        (
            "Redis dropped the moved slots' subscriptions and the nodes made them again "
            "(ferry_live_lost_subscriptions_total > 0)",
            lambda r, m: m["live_lost_subscriptions"] > 0,
        )
    ],
    "cluster-pubsub-kill": [
        (
            "nodes reconnected their pub/sub (ferry_pubsub_reconnects_total > 0)",
            lambda r, m: m["pubsub_reconnects"] > 0,
        )
    ],
    "cluster-async-loss-acked": [
        (
            "appends went unanswered while the replica was cut: `unavailable` "
            "(ferry_sends_total{outcome=unavailable} > 0)",
            lambda r, m: m["unavailable"] > 0,
        )
    ],
}
EXPECT["cluster-async-loss"] = EXPECT["replica-promote"]

# Scenarios where Redis loses data: the load generator runs with --allow-reported-loss, and a
# message answered `sent` before the incident may be lost if its recipient got `reset` after it.
DATA_LOSS = {"redis-amnesia", "redis-aof-rollback", "replica-promote", "cluster-async-loss"}
# Of those, the ones where Redis goes back in time under the same epochs: what an offline user's
# inbox lost can only be found by the nodes' audit (reason append_lost).
AUDITED = {"redis-aof-rollback", "replica-promote", "cluster-async-loss"}

# What Redis keeps of its last writes is known to the fault script only within this: the
# replica's lag behind the primary, a page of AOF, the AOF size sampler's timing.
LOSS_SLACK_SECS = 0.2

# The columns of samples.txt after time, node and pid (run.sh's sample()).
COLUMNS = [
    "server_delivered",
    "connections_open",
    "unavailable",
    "server_duplicate_sends",
    "pubsub_reconnects",
    "epochs_replaced",
    "head_behind",
    "seq_reused",
    "resume_beyond_head",
    "append_lost",
    "meta_lost",
    "store_audits",
    "store_lost_appends",
    "live_resyncs",
    "live_topology_changes",
    "live_lost_subscriptions",
]


def metrics(path):
    """Per node incarnation (node, pid): the last sample; summed over incarnations."""
    last = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                p = line.split()
                if len(p) != 3 + len(COLUMNS):
                    continue
                key = (p[1], p[2])
                vals = [int(x) for x in p[3:]]
                prev = last.get(key)
                # Counters only grow within one process: keep the largest seen.
                last[key] = vals if prev is None else [max(a, b) for a, b in zip(prev, vals)]
    tot = {c: sum(v[i] for v in last.values()) for i, c in enumerate(COLUMNS)}
    del tot["connections_open"]  # a gauge: its sum over incarnations means nothing
    tot["incarnations"] = len(last)
    return tot


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
            delivered=r["delivered"],
            # Delivered although the send was never answered `sent` (e.g. `unavailable`, then no
            # retry got through): stored after all. Allowed; nothing was promised for them.
            unconfirmed=r["unconfirmed_delivered"],
            sent_duplicate=r["sent_duplicate"],
            send_errors=r["send_errors"],
            # Sends that ended without `sent` (by reason), and scheduled ones never handed to a
            # client: not accepted, so never counted as lost, but shown.
            not_answered=sum(r["send_errors"].values()),
            not_dispatched=r["not_dispatched"],
            # `rate_limited` answers, every attempt's: how often the nodes pushed sends back.
            rate_limited=r["rate_limited"],
            lost=r["lost"],
            lost_reported=r["lost_reported"],
            lost_unreported=r["lost_unreported"],
            out_of_order=r["out_of_order"],
            duplicates=r["duplicates"],
            duplicates_within_epoch=r["duplicates_within_epoch"],
            duplicates_across_reset=r["duplicates_across_reset"],
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
            users_reset=r["users_reset"],
        )
        ok = lambda cond, what: checks.append(("ok   " if cond else "FAIL ") + what)
        ok(a.loadtest_rc == 0, f"the load generator's verdict passes (exit {a.loadtest_rc})")
        ok(r["connect_failed"] == 0, f"every client connected ({r['connect_failed']} failed)")
        ok(r["sent"] > 0, f"messages answered `sent`: {r['sent']}")
        if a.name in DATA_LOSS:
            data_loss_checks(ok, r, notes)
            offline_checks(ok, r, a.dir, a.name in AUDITED)
        else:
            ok(r["lost"] == 0, f"lost: {r['lost']}")
            ok(r["out_of_order"] == 0, f"out of order: {r['out_of_order']}")
            ok(
                r["duplicates"] == 0,
                f"stored twice / duplicates after dropping by seq: {r['duplicates']}",
            )
            # Redis loses nothing here, so no position may be void: a reset would also let the
            # order check start anew (the first seq after a reset may be any).
            ok(r["resets"] == 0, f"no client got `reset` (Redis lost nothing): {r['resets']}")
        ok(r["seq_mismatch"] == 0, f"seq mismatch: {r['seq_mismatch']}")
        ok(r["foreign"] == 0, f"foreign (wrong user): {r['foreign']}")
        ok(r["drained"], drain_check(r))
        for what, test in EXPECT.get(a.name, []):
            ok(test(r, m), "the fault took effect: " + what)
    res["checks"] = checks
    res["passed"] = all(c.startswith("ok") for c in checks) and bool(checks)
    print(json.dumps(res))


def drain_check(r):
    """What the drain says: a drain that timed out is told apart by its cause, messages answered
    `sent` not yet delivered (lost, if they never come) or sends still waiting for an answer."""
    what = f"every client caught up within the drain ({r['drain_secs']:.1f} s)"
    if r["drained"]:
        return what
    why = [f"{r['lost']} messages answered `sent` had not arrived"] if r["lost"] else []
    held = r["send_errors"].get("stopped", 0)
    if held:
        # Held by their client (after `rate_limited`, or while it reconnected) until the run
        # stopped it: never answered, so never accepted and not lost, but the senders were
        # stuck for the whole drain.
        why.append(
            f"{held} sends were still held by their clients, never answered (`stopped`: not "
            f"accepted, so not counted as lost)"
        )
    return what + ": " + ("; ".join(why) or "timed out")


def data_loss_checks(ok, r, notes):
    """Where Redis lost data: nothing lost in silence, nothing answered after the incident lost,
    nothing twice or out of order within an epoch."""
    silent = r["lost_unreported"]
    examples = ", ".join(
        f"{x['id']} {x['from']}->{x['to']} seq {x['seq']} at {x['answered_ms']} ms"
        for x in r["lost_unreported_examples"]
    )
    ok(
        silent == 0,
        f"lost in silence (no `reset` of the recipient after `sent`): {silent}"
        + (f" (e.g. {examples})" if examples else ""),
    )
    end = notes.get("incident_end_unix_ms")
    last = r["lost_last_answered_ms"]
    if end is None:
        ok(False, "the fault script noted when the incident was over")
    elif last is None:
        ok(True, "nothing answered `sent` was lost, before or after the incident")
    else:
        margin = (int(end) - (r["t0_unix_ms"] + last)) / 1000
        ok(
            margin > 0,
            f"every message answered `sent` after the incident was delivered: the last lost one "
            f"was answered {abs(margin):.2f} s {'before' if margin > 0 else 'AFTER'} Redis "
            f"served the nodes again ({r['lost']} lost, {r['lost_reported']} reported through "
            f"`reset` to {r['users_reset']} users)",
        )
    start = notes.get("loss_from_unix_ms")
    first = r["lost_first_answered_ms"]
    if start is not None and first is not None:
        # Redis kept what it had answered before `start`; a message answered before it (less
        # the replication or page-cache slack) that never arrived was not lost by Redis.
        early = (r["t0_unix_ms"] + first - int(start)) / 1000
        ok(
            early > -LOSS_SLACK_SECS,
            f"only what Redis lost was lost: the first lost message was answered {early:+.2f} s "
            f"from the last write Redis kept (no earlier than -{LOSS_SLACK_SECS} s: a page of "
            f"AOF, the replica's lag)",
        )
    ok(r["out_of_order"] == 0, f"out of order within an epoch: {r['out_of_order']}")
    ok(
        r["duplicates_within_epoch"] == 0,
        f"duplicates within an epoch: {r['duplicates_within_epoch']} "
        f"(after a `reset`, allowed: {r['duplicates_across_reset']})",
    )


def audited_users(state_dir):
    """The users whose epoch a node's audit ended (reason append_lost), from the nodes' logs."""
    users = set()
    for path in glob.glob(os.path.join(state_dir, "logs", "gw-*.log")):
        with open(path, errors="replace") as f:
            for line in f:
                if 'reason="append_lost"' in line:
                    m = re.search(r"\buser=(\S+)", line)
                    if m:
                        users.add(m.group(1).strip('"'))
    return users


def offline_checks(ok, r, state_dir, audited):
    """The offline users missed messages across the incident, and what Redis lost of their
    inboxes was reported, by the audit where only the audit can see it."""
    offline = r["lost_offline_users"]
    ok(
        r["lost_offline"] > 0,
        f"users offline across the incident lost messages, each reported on their return: "
        f"{r['lost_offline']} messages of {len(offline)} of the {r['offline_users']} offline users",
    )
    if audited and offline:
        missing = sorted(set(offline) - audited_users(state_dir))
        ok(
            not missing,
            f"the nodes' audit ended the epoch (append_lost) of every offline user that lost "
            f"messages ({len(offline) - len(missing)} of {len(offline)}"
            + (f"; not: {', '.join(missing[:5])}" if missing else "")
            + ")",
        )


def show(a):
    r = json.loads(a.line)
    print(f"--- {r['name']}: {'PASS' if r['passed'] else 'FAIL'} ({r['secs']} s)")
    for c in r["checks"]:
        print("    " + c)
    if "sent" in r:
        print(
            f"    sent {r['sent']} (duplicate {r['sent_duplicate']}), delivered {r['delivered']}, "
            f"unconfirmed {r['unconfirmed']}, not answered `sent` {r['not_answered']} "
            f"{r['send_errors']}, not dispatched {r['not_dispatched']}, "
            f"`rate_limited` answers {r['rate_limited']}, "
            f"lost {r['lost']} ({r['lost_reported']} reported, {r['lost_unreported']} silent), "
            f"resets {r['resets']} ({r['users_reset']} users), "
            f"resumes {r['resumes']}, reconnect frames {r['reconnect_requests']}, "
            f"redelivered {r['redelivered']}, drain {r['drain_secs']} s, "
            f"max delivery {r['max_delivery_ms']} ms, metrics {r['metrics']}, notes {r['notes']}"
        )
    sys.stdout.flush()


def either(total, *parts):
    """`0`, or the total and its parts: `7 (5 / 2)`."""
    return "0" if total == 0 else f"{total} ({' / '.join(str(p) for p in parts)})"


def not_answered(r):
    """`0`, or the sends that ended without `sent` by reason (and those never sent)."""
    parts = [f"{k} {v}" for k, v in sorted(r.get("send_errors", {}).items()) if v]
    if r.get("not_dispatched"):
        parts.append(f"never sent {r['not_dispatched']}")
    total = r.get("not_answered", 0) + r.get("not_dispatched", 0)
    return "0" if total == 0 else f"{total} ({', '.join(parts)})"


def table(a):
    rows = [json.loads(l) for l in lines(a.results)]
    head = (
        "| scenario | result | sent | delivered | lost (reported through `reset` / silent) "
        "| out of order | duplicates before drop by seq (server redeliveries) | duplicates after "
        "(within an epoch / after a `reset`) | `sent` on retry (duplicate: true) | unconfirmed "
        "(delivered, never answered `sent`) | not answered `sent` (by reason) | resumes | resets "
        "(users) | epochs replaced (by the audit) | catch-up: drain after sending (s) | "
        "longest delivery (ms) | time (s) |"
    )
    print()
    print(head)
    print("|" + " --- |" * head.count(" | ") + " --- |")
    for r in rows:
        res = "PASS" if r["passed"] else "**FAIL**"
        if "sent" not in r:
            print(f"| {r['name']} | {res} |" + " — |" * (head.count(" | ") - 2) + f" {r['secs']} |")
            continue
        m = r["metrics"]
        epochs = m.get("epochs_replaced", 0)
        print(
            f"| {r['name']} | {res} | {r['sent']} | {r.get('delivered', '—')} | "
            f"{either(r['lost'], r['lost_reported'], r['lost_unreported'])} | "
            f"{r['out_of_order']} | "
            f"{'' if r.get('redelivered_exact', True) else '≥'}{r['redelivered']} | "
            f"{either(r['duplicates'], r['duplicates_within_epoch'], r['duplicates_across_reset'])} | "
            f"{r['sent_duplicate']} | {r.get('unconfirmed', '—')} | {not_answered(r)} | "
            f"{r['resumes']} | {either(r['resets'], r['users_reset'])} | "
            f"{either(epochs, m.get('append_lost', 0))} | "
            f"{r['drain_secs']:.2f} | {r['max_delivery_ms']} | {r['secs']} |"
        )
    faults = [r for r in rows if r["notes"].get("summary")]
    if faults:
        print()
        print("| scenario | the fault, as the fault script saw it |")
        print("| --- | --- |")
        for r in faults:
            print(f"| {r['name']} | {r['notes']['summary']} |")
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
