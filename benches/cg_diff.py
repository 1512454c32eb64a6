#!/usr/bin/env python3
"""Per-function difference of two callgrind profiles, per request.

    python3 benches/cg_diff.py A.cg B.cg REQS [TOP] [SORT]

A and B are two windows of the same process kept by `CG_KEEP=dir bash
benches/tls_cost.sh` (A: the handshakes, B: the handshakes and REQS more
requests); B - A is REQS requests on established connections. Prints the
TOP (default 30) functions with the largest difference, sorted by SORT
(`ll`, the default: last-level misses, instruction + data; or `ir`, `d1`),
with instructions, L1 data misses and last-level misses per request
(self cost, not inclusive). Needs callgrind_annotate (valgrind).
"""
import subprocess
import sys

EVENTS = ["Ir", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw"]


def profile(path):
    out = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", "--auto=no", "--threshold=100",
         "--show=" + ",".join(EVENTS), "--sort=Ir", path],
        check=True, capture_output=True, text=True).stdout
    costs = {}
    total = None
    for line in out.splitlines():
        toks = line.split()
        nums, i = [], 0
        # "1,234 (5.6%)" or "." (zero) per event, then the function.
        while i < len(toks) and len(nums) < len(EVENTS):
            t = toks[i]
            if t == ".":
                nums.append(0)
            elif t.replace(",", "").isdigit():
                nums.append(int(t.replace(",", "")))
            elif not (t.startswith("(") or t.endswith("%)")):
                break
            i += 1
        while i < len(toks) and (toks[i].startswith("(") or toks[i].endswith("%)")):
            i += 1
        name = " ".join(toks[i:])
        if len(nums) != len(EVENTS) or not name:
            continue
        if name == "PROGRAM TOTALS":
            total = nums
            continue
        # Thread start and the runtime's loop show everything below them.
        if total and nums[0] >= 0.9 * total[0]:
            continue
        prev = costs.get(name, [0] * len(EVENTS))
        costs[name] = [a + b for a, b in zip(prev, nums)]
    return costs


def main():
    a, b, reqs = profile(sys.argv[1]), profile(sys.argv[2]), int(sys.argv[3])
    top = int(sys.argv[4]) if len(sys.argv) > 4 else 30
    key = sys.argv[5] if len(sys.argv) > 5 else "ll"
    rows = []
    for name in set(a) | set(b):
        d = [(y - x) / reqs for x, y in zip(a.get(name, [0] * 6), b.get(name, [0] * 6))]
        ir, d1, ll = d[0], d[1] + d[2], d[3] + d[4] + d[5]
        rows.append((name, ir, d1, ll))
    idx = {"ir": 1, "d1": 2, "ll": 3}[key]
    rows.sort(key=lambda r: -r[idx])
    tot = [sum(r[i] for r in rows) for i in (1, 2, 3)]
    print(f"{'Ir/req':>9} {'D1/req':>8} {'LL/req':>8}  function")
    print(f"{tot[0]:9.0f} {tot[1]:8.1f} {tot[2]:8.2f}  (all functions)")
    for name, ir, d1, ll in rows[:top]:
        print(f"{ir:9.0f} {d1:8.1f} {ll:8.2f}  {name[:140]}")


if __name__ == "__main__":
    main()
