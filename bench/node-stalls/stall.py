#!/usr/bin/env python3
"""Asks a node for /healthz every millisecond over one keep-alive connection and
prints the latency distribution: a node serves its sockets, HTTP and Redis links on
one thread, so a /healthz answer that comes late is time every socket waited.
    stall.py <node port> <seconds>"""
import http.client, sys, time

port, secs = int(sys.argv[1]), float(sys.argv[2])
c = http.client.HTTPConnection('127.0.0.1', port)
lat, slow = [], []
start = time.perf_counter()
end = time.time() + secs
while time.time() < end:
    t = time.perf_counter()
    c.request('GET', '/healthz')
    c.getresponse().read()
    ms = (time.perf_counter() - t) * 1e3
    lat.append(ms)
    if ms > 5:
        slow.append(f"{t - start:.1f}s:{ms:.0f}")
    time.sleep(0.001)
lat.sort()
n = len(lat)
print(f"requests={n} p50={lat[n // 2]:.3f} p99={lat[int(n * .99)]:.3f} p999={lat[int(n * .999)]:.3f} "
      f"max={lat[-1]:.2f} ms; over 5 ms: {sum(x > 5 for x in lat)}, over 10 ms: {sum(x > 10 for x in lat)}")
print('over 5 ms at (time into the run: ms):', ' '.join(slow) or 'none')
