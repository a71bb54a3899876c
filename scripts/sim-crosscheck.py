#!/usr/bin/env python3
"""Cross-check of ubcache's cache simulators against libCacheSim (PyPI `libcachesim`).

Usage: sim-crosscheck.py TRACE CAP[,CAP...]
TRACE holds one block number per line. Prints one JSON object: {policy: [hits per size]},
for lru, fifo, opt (libCacheSim's Belady), arc, s3fifo and sieve, every block of size 1.
"""
import json
import sys

import libcachesim as lcs


def main():
    trace = [int(x) for x in open(sys.argv[1]).read().split()]
    caps = [int(c) for c in sys.argv[2].split(',')]
    n = len(trace)
    never = 2**62
    nxt = [never] * n
    last = {}
    for i in range(n - 1, -1, -1):
        b = trace[i]
        if b in last:
            nxt[i] = last[b]
        last[b] = i
    policies = {'lru': lcs.LRU, 'fifo': lcs.FIFO, 'opt': lcs.Belady, 'arc': lcs.ARC, 's3fifo': lcs.S3FIFO, 'sieve': lcs.Sieve}
    out = {}
    for name, cls in policies.items():
        row = []
        for cap in caps:
            cache = cls(cap)
            hits = 0
            for i, b in enumerate(trace):
                if cache.get(lcs.Request(obj_size=1, obj_id=b, clock_time=i, next_access_vtime=nxt[i])):
                    hits += 1
            row.append(hits)
        out[name] = row
    print(json.dumps(out))


main()
