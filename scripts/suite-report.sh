#!/usr/bin/env bash
# Prints the totals of the attack, chaos and load suites from
# target/suite-report.jsonl (written by the tests, see tests/src/report.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
file="${1:-target/suite-report.jsonl}"
[ -s "$file" ] || { echo "suite report: no suite ran"; exit 0; }
python3 - "$file" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
suites = {}
print("\n== Suite report ==")
print(f"{'suite':<8} {'test':<58} {'tried':>6} {'refused':>8} {'inspected':>9}  ok")
for r in rows:
    s = suites.setdefault(r["suite"], [0, 0, 0, 0])
    s[0] += r["tried"]; s[1] += r["refused"]; s[2] += r["inspected"]; s[3] += 0 if r["passed"] else 1
    print(f"{r['suite']:<8} {r['test'][:58]:<58} {r['tried']:>6} {r['refused']:>8} {r['inspected']:>9}  {'yes' if r['passed'] else 'NO'}")
    for k, v in r.get("notes", {}).items():
        print(f"{'':<8}   {k}: {v}")
print()
for name, (t, rf, i, failed) in sorted(suites.items()):
    print(f"{name}: {t} cases tried, {rf} refused, {i} containers inspected, {failed} failed tests")
PY
