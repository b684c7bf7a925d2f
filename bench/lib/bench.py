#!/usr/bin/env python3
"""Helpers of bench/run: recording figures, fragmenting an image, pgbench logs, the report.

  bench.py record FILE KEY=VALUE…          append one JSON object to FILE (numbers stay numbers)
  bench.py checkpoint FILE JSON STDERR RC WALL KEY=VALUE…
                                           record one `quiesce checkpoint --json` run
  bench.py fragment PATH SIZE COUNT SEED   random 4 KiB writes (COUNT of them) into PATH (sparse, SIZE bytes)
  bench.py pgbench-log PREFIX              "transactions p50_ms p99_ms max_ms" from pgbench -l logs PREFIX.*
  bench.py report JSONL OUT_JSON RUN_DIR   the table (stdout) and the JSON file
"""
import glob
import json
import os
import platform
import random
import statistics
import subprocess
import sys


def typed(v):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def append(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def cmd_record(path, *pairs):
    row = {}
    for p in pairs:
        k, v = p.split("=", 1)
        row[k] = typed(v)
    append(path, row)


def cmd_checkpoint(path, out_json, stderr_file, rc, wall, *pairs):
    row = {"kind": "checkpoint", "rc": int(rc), "wallSeconds": float(wall)}
    for p in pairs:
        k, v = p.split("=", 1)
        row[k] = typed(v)
    try:
        r = json.load(open(out_json))
        row.update(id=r.get("id"), outcome=r.get("outcome"), freezeWindowMs=r.get("freezeWindowMs"),
                   holdWindowMs=r.get("holdWindowMs"))
    except Exception as e:  # a failed checkpoint may print no JSON
        row.update(outcome="no-json", error=str(e))
    err = open(stderr_file, errors="replace").read().splitlines()
    warnings = list(dict.fromkeys(l.strip() for l in err if "warning" in l.lower()))
    if warnings:
        row["warnings"] = warnings[:4]
    # The extent-count warning (the hold window at risk), apart from the others.
    extent = [l.strip() for l in err if "warning" in l.lower() and "extents" in l]
    if extent:
        row["extentWarning"] = extent[0]
    if row.get("outcome") != "completed":
        row["stderrTail"] = err[-5:]
    append(path, row)
    print(f"{row.get('outcome')} freeze {row.get('freezeWindowMs') or 0:.1f} ms hold {row.get('holdWindowMs') or 0:.1f} ms"
          + (" (extent warning)" if extent else ""))


def cmd_fragment(path, size, count, seed):
    size, count = int(size), int(count)
    blocks = size // 4096
    rng = random.Random(int(seed))
    chosen = sorted(rng.sample(range(blocks), count))
    rng.shuffle(chosen)  # random order, as a guest would write them
    payload = os.urandom(4096)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    for i, b in enumerate(chosen):
        os.pwrite(fd, payload, b * 4096)
        if i % 20000 == 19999:
            os.fdatasync(fd)  # write back in batches, so that delayed allocation cannot merge them all
    os.fsync(fd)
    os.close(fd)


def cmd_pgbench_log(prefix):
    lat = []
    for f in glob.glob(prefix + ".*"):
        for line in open(f):
            parts = line.split()
            if len(parts) >= 3:
                lat.append(int(parts[2]) / 1000.0)
    if not lat:
        print("0 0 0 0")
        return
    lat.sort()
    print(len(lat), f"{pct(lat, 50):.3f}", f"{pct(lat, 99):.3f}", f"{lat[-1]:.3f}")


def pct(values, p):
    v = sorted(values)
    if not v:
        return None
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def summary(values):
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    return {"n": len(v), "median": statistics.median(v), "p99": pct(v, 99), "min": v[0], "max": v[-1]}


def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:
        return ""


def machine(run_dir):
    mem = next((int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal")), None)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), None)
    try:
        lsblk = json.loads(sh("lsblk", "-J", "-o", "NAME,SIZE,TYPE,FSTYPE,ROTA,MOUNTPOINT") or "{}")
    except ValueError:
        lsblk = {}
    return {
        "hostname": platform.node(), "nproc": os.cpu_count(), "cpu": cpu, "memoryBytes": mem,
        "kernel": platform.release(), "os": sh("sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"),
        "runDirFilesystem": sh("findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T", run_dir),
        "filesystems": "labs: XFS datastore (reflink=1) and XFS DR store in loop devices on sparse files, ext4 guest "
                       "image in a loop device on the datastore; bench/delta adds a btrfs datastore",
        "lsblk": lsblk,
        "xfsprogs": sh("sh", "-c", "mkfs.xfs -V 2>&1 | head -1"),
        "swift": sh("sh", "-c", "swift --version 2>&1 | head -1"),
    }


def span(s):
    return "-" if not s else f"{s['min']:.1f}-{s['max']:.1f}"


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def ratio(a, b, digits=2):
    return None if a is None or not b else round(a / b, digits + 2)


def cmd_report(jsonl, out_json, run_dir):
    rows = [json.loads(l) for l in open(jsonl)] if os.path.exists(jsonl) else []
    meta = next((r for r in rows if r.get("kind") == "meta"), {})
    report = {"generatedBy": "bench/run", "options": meta, "machine": machine(run_dir), "scenarios": {}}
    lines = []
    m = report["machine"]
    lines.append(f"machine: {m['hostname']}, {m['nproc']} cores, {(m['memoryBytes'] or 0) / (1 << 30):.0f} GiB, "
                 f"kernel {m['kernel']}; run dir on {m['runDirFilesystem']}")
    S = report["scenarios"]

    # 1. windows (per image size, and the fragmented volume)
    cps = [r for r in rows if r.get("kind") == "checkpoint" and r.get("scenario") in ("windows", "windows-fragmented")]
    if cps:
        groups = {}
        for r in cps:
            groups.setdefault((r["scenario"], r["case"]), []).append(r)
        out = []
        lines.append("")
        lines.append("1. hold and freeze windows under load (pgbench + SQLite inserters + dovecot-lda), ms")
        lines.append(f"{'case':26} {'extents':>8} {'ok/n':>6} {'freeze med':>10} {'p99':>8} {'range':>15} "
                     f"{'hold med':>9} {'p99':>8} {'range':>15} {'ext.warn':>8}")
        info = {(r["scenario"], r["case"]): r for r in rows if r.get("kind") == "windows-case"}
        base_hold = None
        for (scenario, case), rs in groups.items():
            done = [r for r in rs if r.get("outcome") == "completed"]
            f = summary([r.get("freezeWindowMs") for r in done])
            h = summary([r.get("holdWindowMs") for r in done])
            w = summary([r.get("wallSeconds") for r in rs])
            warned = sum(1 for r in rs if r.get("extentWarning"))
            extra = info.get((scenario, case), {})
            if base_hold is None and h:
                base_hold = h["median"]
            entry = {"scenario": scenario, "case": case, "checkpoints": len(rs), "completed": len(done),
                     "freezeWindowMs": f, "holdWindowMs": h, "wallSeconds": w, "warned": warned,
                     "extentWarning": next((r["extentWarning"] for r in rs if r.get("extentWarning")), None),
                     "otherWarnings": sorted({w for r in rs for w in r.get("warnings", []) if "extents" not in w})[:3],
                     "holdMedianVsFirstCase": ratio(h and h["median"], base_hold),
                     "failures": [r.get("stderrTail") for r in rs if r.get("outcome") != "completed"][:3]}
            entry.update({k: v for k, v in extra.items() if k not in ("kind", "scenario", "case")})
            out.append(entry)
            lines.append(f"{case:26} {str(extra.get('extents', '-')):>8} {len(done):>3}/{len(rs):<2} "
                         f"{fmt(f and f['median']):>10} {fmt(f and f['p99']):>8} {span(f):>15} "
                         f"{fmt(h and h['median']):>9} {fmt(h and h['p99']):>8} {span(h):>15} {warned:>8}")
        S["windows"] = out
        for e in out:
            if e["extentWarning"]:
                lines.append(f"  extent warning ({e['case']}): {e['extentWarning'][:300]}")
        for e in out:
            if e.get("cloneSecondsFragmented") is not None:
                lines.append(f"  one FICLONE (cp --reflink=always) of the fragmented volume alone: {e['cloneSecondsFragmented']:.3f} s "
                             f"for {e.get('extents')} extents ({e['cloneSecondsFragmented'] * 1e6 / max(1, e.get('extents') or 1):.1f} us per extent)")

    # 2. pgbench
    pg = [r for r in rows if r.get("kind") == "pgbench"]
    if pg:
        out = {}
        for mode in ("none", "every"):
            rs = [r for r in pg if r["mode"] == mode]
            out[mode] = {"runs": rs, "tps": summary([r["tps"] for r in rs]), "p99Ms": summary([r["p99Ms"] for r in rs]),
                         "maxMs": summary([r["maxMs"] for r in rs]), "checkpoints": sum(r.get("checkpoints", 0) for r in rs)}
        none, every = out["none"], out["every"]
        out["tpsRatio"] = ratio(every["tps"] and every["tps"]["median"], none["tps"] and none["tps"]["median"])
        out["p99Ratio"] = ratio(every["p99Ms"] and every["p99Ms"]["median"], none["p99Ms"] and none["p99Ms"]["median"])
        S["pgbench"] = out
        interval = pg[0].get("interval")
        lines.append("")
        lines.append(f"2. pgbench (2 clients, scale 1, {pg[0].get('seconds')} s runs): no checkpoints vs one every {interval} s")
        lines.append(f"{'mode':22} {'runs':>4} {'TPS med':>9} {'TPS range':>17} {'p99 ms med':>10} {'max ms med':>10} {'ckpts':>5}")
        for mode, label in (("none", "no checkpoints"), ("every", f"checkpoint every {interval}s")):
            o = out[mode]
            if not o["tps"]:
                continue
            lines.append(f"{label:22} {o['tps']['n']:>4} {o['tps']['median']:9.1f} {o['tps']['min']:8.1f}-{o['tps']['max']:<8.1f} "
                         f"{o['p99Ms']['median']:10.2f} {o['maxMs']['median']:10.1f} {o['checkpoints']:>5}")
        lines.append(f"TPS with / without: {fmt(out['tpsRatio'], 3)}   p99 with / without: {fmt(out['p99Ratio'], 3)}")

    # 3 and 4: merged from bench/delta and bench/replicate
    for name, title in (("delta", "3. delta extraction (bench/delta)"), ("replicate", "4. replication (bench/replicate)")):
        r = next((r for r in rows if r.get("kind") == "merged" and r.get("scenario") == name), None)
        if not r:
            continue
        entry = {"exitStatus": r.get("rc"), "command": r.get("command"), "seconds": r.get("seconds")}
        try:
            entry["result"] = json.load(open(r["json"]))
        except Exception as e:
            entry["error"] = f"no JSON from bench/{name}: {e}"
        S[name] = entry
        lines.append("")
        lines.append(f"{title}: exit {r.get('rc')}, {r.get('seconds')} s; its table: {r.get('text')}")
        res = entry.get("result")
        if name == "delta" and res:
            lines.append(f"{'changed %':>9} {'method':22} {'seconds':>9} {'vs quiesce':>10}")
            for x in res.get("measurements", []):
                lines.append(f"{x['percent']:>9} {x['method']:22} {x['seconds']:9.3f} {fmt(x.get('ratioVsQuiesceExtraction'), 2):>9}x")
        if name == "replicate" and res:
            lines.append(f"{'phase':6} {'target':10} {'seconds':>8} {'MB/s chg':>9} {'wire/chg':>9} {'vs seq rd':>9}")
            for x in res.get("replications", []):
                lines.append(f"{x['phase']:6} {x['target']:10} {x['seconds']:8.2f} {x.get('changedMBps', 0):9.1f} "
                             f"{fmt(x.get('wirePerChangedByte'), 4):>9} {fmt(x.get('fractionOfSequentialRead'), 3):>9}")
        if entry.get("error"):
            lines.append("  " + entry["error"])

    # 5. scale
    ws = [r for r in rows if r.get("kind") == "checkpoint" and r.get("scenario") == "scale-writers"]
    if ws:
        out = []
        base = None
        lines.append("")
        lines.append("5a. freeze time vs number of writers (no-op exec writers), ms")
        lines.append(f"{'writers':>7} {'ok/n':>6} {'freeze med':>10} {'range':>15} {'hold med':>9} {'wall s med':>10} {'freeze vs 1':>11}")
        for n in sorted({r["writers"] for r in ws}):
            rs = [r for r in ws if r["writers"] == n]
            done = [r for r in rs if r.get("outcome") == "completed"]
            f = summary([r.get("freezeWindowMs") for r in done])
            h = summary([r.get("holdWindowMs") for r in done])
            w = summary([r["wallSeconds"] for r in rs])
            if base is None and f:
                base = f["median"]
            e = {"writers": n, "checkpoints": len(rs), "completed": len(done), "freezeWindowMs": f, "holdWindowMs": h,
                 "wallSeconds": w, "freezeVsOneWriter": ratio(f and f["median"], base)}
            out.append(e)
            lines.append(f"{n:>7} {len(done):>3}/{len(rs):<2} {fmt(f and f['median']):>10} "
                         f"{span(f):>15} "
                         f"{fmt(h and h['median']):>9} {fmt(w and w['median'], 2):>10} {fmt(e['freezeVsOneWriter'], 2):>11}")
        S["scale-writers"] = out
    mb = [r for r in rows if r.get("kind") == "mailbox"]
    if mb:
        out = []
        lines.append("")
        lines.append("5b. mailbox writer freeze vs folder count (bench/mailbox-freeze), ms")
        lines.append(f"{'folders':>8} {'runs':>4} {'writer med':>10} {'freeze med':>10} {'range':>15} {'hold med':>9}")
        for n in sorted({r["folders"] for r in mb}):
            rs = [r for r in mb if r["folders"] == n]
            f = summary([r["freezeMs"] for r in rs])
            e = {"folders": n, "runs": rs, "writerMs": summary([r["writerMs"] for r in rs if isinstance(r["writerMs"], (int, float))]),
                 "freezeWindowMs": f, "holdWindowMs": summary([r["holdMs"] for r in rs])}
            out.append(e)
            lines.append(f"{n:>8} {len(rs):>4} {fmt(e['writerMs'] and e['writerMs']['median']):>10} {f['median']:10.1f} "
                         f"{f['min']:7.1f}-{f['max']:<7.1f} {e['holdWindowMs']['median']:9.1f}")
        lat = [r for r in rows if r.get("kind") == "mailbox-latency"]
        for r in lat:
            lines.append(f"  {r['text']}")
        S["scale-mailbox"] = {"sizes": out, "deliveryLatency": lat}
    cat = [r for r in rows if r.get("kind") == "catalog"]
    if cat:
        out = {"checkpoints": cat[0].get("checkpoints"), "catalogBytes": cat[0].get("catalogBytes"), "operations": {}}
        lines.append("")
        lines.append(f"5c. catalog with {cat[0].get('checkpoints')} checkpoints ({(cat[0].get('catalogBytes') or 0) / 1e6:.0f} MB), seconds")
        lines.append(f"{'operation':44} {'runs':>4} {'median':>8} {'range':>17} {'rows':>8}")
        ops = [r for r in cat if r.get("op")]
        for op in dict.fromkeys(r["op"] for r in ops):
            rs = [r for r in ops if r["op"] == op]
            s = summary([r["seconds"] for r in rs])
            out["operations"][op] = {"seconds": s, "runs": rs}
            lines.append(f"{op:44} {s['n']:>4} {s['median']:8.3f} {s['min']:8.3f}-{s['max']:<8.3f} {str(rs[0].get('rows', '-')):>8}")
        S["scale-catalog"] = out

    mm = [r for r in rows if r.get("kind") == "mail-marker"]
    if mm:
        S.setdefault("scale-catalog", {})["mailMarker"] = mm[0]
        lines.append(f"  (left out of the template: the lab's mail writer marker, {mm[0]['markerBytes']} bytes at "
                     f"{mm[0]['messages']} messages: per-folder state and up to 256 message names)")

    # The headline: ratios against the baselines (absolute times move with the machine's load).
    head = {}
    w = S.get("windows") or []
    if len(w) > 1 and w[0].get("holdWindowMs"):
        for e in w[1:]:
            if e.get("holdWindowMs"):
                head[f"hold median, {e['case']} / {w[0]['case']}"] = e["holdMedianVsFirstCase"]
    if S.get("pgbench"):
        head["pgbench TPS, checkpoint every 10 s / none"] = S["pgbench"]["tpsRatio"]
        head["pgbench p99 latency, checkpoint every 10 s / none"] = S["pgbench"]["p99Ratio"]
    d = ((S.get("delta") or {}).get("result") or {}).get("measurements") or []
    for p in dict.fromkeys(x["percent"] for x in d):
        for method in ("quiesce-full-compare", "rsync", "btrfs-send", "floor"):
            x = next((x for x in d if x["percent"] == p and x["method"] == method), None)
            if x and x.get("ratioVsQuiesceExtraction") is not None:
                head[f"delta {p} %: {method} time / quiesce send"] = x["ratioVsQuiesceExtraction"]
    for x in ((S.get("replicate") or {}).get("result") or {}).get("replications") or []:
        if x["target"] in ("file-none", "tls-none", "ssh-none"):
            head[f"replicate {x['phase']} to {x['target']}: throughput / disk sequential read"] = x.get("fractionOfSequentialRead")
    sw = S.get("scale-writers") or []
    if len(sw) > 1:
        head[f"freeze window, {sw[-1]['writers']} writers / 1"] = sw[-1]["freezeVsOneWriter"]
    ops = (S.get("scale-catalog") or {}).get("operations") or {}
    if "checkpoints list --json" in ops and "checkpoints list --last 20 --json" in ops:
        head[f"catalog of {S['scale-catalog'].get('checkpoints')}: list --json / list --last 20 --json"] = ratio(
            ops["checkpoints list --json"]["seconds"]["median"], ops["checkpoints list --last 20 --json"]["seconds"]["median"])
    if head:
        report["headline"] = head
        width = max(len(k) for k in head)
        lines[1:1] = ["", "headline (ratios):"] + [f"  {k:{width}}  {fmt(v, 3)}" for k, v in head.items()]

    fails = [r for r in rows if r.get("kind") == "failure"]
    if fails:
        report["failures"] = fails
        lines.append("")
        for r in fails:
            lines.append(f"FAILED: {r.get('scenario')}: {r.get('error')}")
    json.dump(report, open(out_json, "w"), indent=2)
    lines.append("")
    lines.append(f"JSON: {out_json}")
    print("\n".join(lines))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"record": cmd_record, "checkpoint": cmd_checkpoint, "fragment": cmd_fragment, "pgbench-log": cmd_pgbench_log,
     "report": cmd_report}[cmd](*args)
