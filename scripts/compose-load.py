#!/usr/bin/env python3
"""Load and exact-count checks for the compose test (scripts/test-compose.sh).

  compose-load.py load   URL PREFIX OUT [--rate N] [--users N] [--stop-file F] [--seconds S]
  compose-load.py verify URL OUT [--timeout S] [--slack N]

`load` sends POST /api {"user_id": PREFIX-<n>} over keep-alive connections at a steady
rate until the stop file appears (or S seconds pass): a quarter of the requests go to 20 hot
users (they get refused), the rest round-robin over every user. It writes OUT: for each user
what the client saw (200 = allowed, 429 rate_limited = blocked, anything else = a failure,
which may or may not have been decided), and a per-second timeline (answers by status,
degraded answers, slowest answer, failures) to set beside the faults' times.

`verify` reads OUT and polls GET /analytics/{user} for every user until the counts equal
what the client saw (up to --timeout seconds). A user whose requests failed may have had
them decided and counted: for those, analytics may be above the client's count by at most
the failures. --slack N lets the total be short by N at most (the check then says by how
much): for faults where the README says events may be lost.
Standard library only.
"""
import argparse
import asyncio
import json
import os
import sys
import time
from collections import defaultdict
from urllib.parse import urlsplit


class Conn:
    def __init__(self, host, port):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def request(self, method, path, body=None):
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = b"" if body is None else body.encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
        if body is not None:
            head += "Content-Type: application/json\r\n"
        head += f"Content-Length: {len(data)}\r\n\r\n"
        try:
            self.writer.write(head.encode() + data)
            await self.writer.drain()
            status_line = await self.reader.readline()
            if not status_line:
                raise ConnectionError("connection closed")
            status = int(status_line.split()[1])
            headers = {}
            while True:
                line = await self.reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                k, _, v = line.decode().partition(":")
                headers[k.strip().lower()] = v.strip()
            n = int(headers.get("content-length", "0"))
            payload = await self.reader.readexactly(n) if n else b""
            if headers.get("connection", "").lower() == "close":
                self.close()
            return status, headers, payload
        except BaseException:
            self.close()
            raise

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def load(args):
    url = urlsplit(args.url)
    users = [f"{args.prefix}-{i}" for i in range(args.users)]
    hot = users[:20]
    seen = {u: {"allowed": 0, "blocked": 0, "failed": 0} for u in users}
    timeline = defaultdict(lambda: defaultdict(int))
    failures = []
    start = time.time()
    sent = 0
    stop = False

    def next_user():
        nonlocal sent
        i = sent
        sent += 1
        return hot[(i // 4) % len(hot)] if i % 4 == 0 else users[(i * 3 // 4) % len(users)], start + i / args.rate

    async def client():
        conn = Conn(url.hostname, url.port)
        while not stop:
            user, at = next_user()
            delay = at - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            t0 = time.time()
            sec = int(t0)
            try:
                status, headers, payload = await asyncio.wait_for(
                    conn.request("POST", "/api", json.dumps({"user_id": user})), 10)
                kind = str(status)
                if status == 200:
                    seen[user]["allowed"] += 1
                elif status == 429 and b'"rate_limited"' in payload:
                    seen[user]["blocked"] += 1
                    kind = "429"
                else:
                    if status == 429:
                        kind = "429-overloaded"
                    seen[user]["failed"] += 1
                    failures.append({"t": t0, "user": user, "status": status, "body": payload[:200].decode(errors="replace")})
                if headers.get("x-ratelimit-degraded") == "true":
                    timeline[sec]["degraded"] += 1
            except Exception as e:  # noqa: BLE001 - every failure is recorded
                conn.close()
                kind = "error"
                seen[user]["failed"] += 1
                failures.append({"t": t0, "user": user, "status": None, "body": f"{type(e).__name__}: {e}"})
                await asyncio.sleep(0.05)
            ms = int((time.time() - t0) * 1000)
            timeline[sec][kind] += 1
            timeline[sec]["max_ms"] = max(timeline[sec]["max_ms"], ms)

    tasks = [asyncio.create_task(client()) for _ in range(args.concurrency)]
    deadline = start + args.seconds if args.seconds else None
    while True:
        await asyncio.sleep(0.1)
        if (args.stop_file and os.path.exists(args.stop_file)) or (deadline and time.time() > deadline):
            break
    stop = True
    await asyncio.gather(*tasks)
    out = {
        "prefix": args.prefix,
        "seconds": round(time.time() - start, 1),
        "requests": sum(sum(v[k] for k in ("allowed", "blocked", "failed")) for v in seen.values()),
        "allowed": sum(v["allowed"] for v in seen.values()),
        "blocked": sum(v["blocked"] for v in seen.values()),
        "failed": sum(v["failed"] for v in seen.values()),
        "failures": failures[:200],
        "timeline": {str(k): dict(v) for k, v in sorted(timeline.items())},
        "users": seen,
    }
    with open(args.out, "w") as f:
        json.dump(out, f)
    print(f"load {args.prefix}: {out['requests']} requests in {out['seconds']} s: "
          f"{out['allowed']} allowed, {out['blocked']} refused, {out['failed']} failed")


async def verify(args):
    url = urlsplit(args.url)
    with open(args.out) as f:
        run = json.load(f)
    users = run["users"]
    deadline = time.time() + args.timeout
    conn = Conn(url.hostname, url.port)
    pending = dict(users)
    got = {}
    while True:
        for user in list(pending):
            try:
                status, _, payload = await conn.request("GET", f"/analytics/{user}")
            except Exception:  # noqa: BLE001 - retried until the deadline
                await asyncio.sleep(0.2)
                continue
            if status != 200:
                continue
            a = json.loads(payload)
            got[user] = a
            c = users[user]
            over = a["allowed"] + a["blocked"] - c["allowed"] - c["blocked"]
            if a["allowed"] >= c["allowed"] and a["blocked"] >= c["blocked"] and 0 <= over <= c["failed"]:
                del pending[user]
        if not pending or time.time() > deadline:
            break
        await asyncio.sleep(1)
    client_total = run["allowed"] + run["blocked"]
    counted = short = excess = 0
    for user, c in users.items():
        a = got.get(user, {"allowed": 0, "blocked": 0})
        diff = a["allowed"] + a["blocked"] - c["allowed"] - c["blocked"]
        counted += a["allowed"] + a["blocked"]
        short += max(0, -diff)
        excess += max(0, diff - c["failed"])
    print(f"verify {run['prefix']}: {len(users) - len(pending)}/{len(users)} users exact; client saw "
          f"{client_total} decided + {run['failed']} failed, analytics counted {counted} "
          f"(short by {short}, over by {excess} beyond the failed requests)")
    if pending and short + excess > args.slack:
        for user in list(pending)[:10]:
            print(f"  {user}: client {users[user]}, analytics {got.get(user)}", file=sys.stderr)
        sys.exit(1)
    if pending:
        print(f"  {len(pending)} users not exact, within the allowed {args.slack}")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    lp = sub.add_parser("load")
    lp.add_argument("url")
    lp.add_argument("prefix")
    lp.add_argument("out")
    lp.add_argument("--rate", type=float, default=300)
    lp.add_argument("--users", type=int, default=500)
    lp.add_argument("--concurrency", type=int, default=32)
    lp.add_argument("--stop-file")
    lp.add_argument("--seconds", type=float)
    vp = sub.add_parser("verify")
    vp.add_argument("url")
    vp.add_argument("out")
    vp.add_argument("--timeout", type=float, default=60)
    vp.add_argument("--slack", type=int, default=0)
    args = p.parse_args()
    asyncio.run(load(args) if args.cmd == "load" else verify(args))


if __name__ == "__main__":
    main()
