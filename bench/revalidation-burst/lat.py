#!/usr/bin/env python3
"""PINGs Redis every millisecond for a while and prints the latency distribution:
    lat.py <redis port> <seconds>"""
import redis, sys, time
r = redis.Redis(port=int(sys.argv[1])); secs = float(sys.argv[2])
lat = []; end = time.time() + secs
while time.time() < end:
    t = time.perf_counter(); r.ping(); lat.append((time.perf_counter() - t) * 1e3)
    time.sleep(0.001)
lat.sort(); n = len(lat)
print(f"pings={n} p50={lat[n//2]:.3f} p99={lat[int(n*.99)]:.3f} p999={lat[int(n*.999)]:.3f} max={lat[-1]:.2f} ms; over 1 ms: {sum(x>1 for x in lat)}, over 2 ms: {sum(x>2 for x in lat)}")
