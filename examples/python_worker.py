#!/usr/bin/env python3
"""A job scheduler worker in plain Python 3 (standard library only).

Workers speak plain HTTP/JSON to any coordinator node; any node accepts any
call (followers forward writes to the leader). The protocol:

1. Register: ``POST /api/workers/register``
   ``{"workerId": <uuid>, "name": ..., "capacity": n, "jobTypes": [...]}``.
   Pick the id yourself (a UUID v4) and keep it: a retried registration then
   updates the same worker instead of creating a second one.

2. Acquire by long poll: ``POST /api/jobs/acquire``
   ``{"workerId", "jobTypes", "maxJobs", "leaseSeconds", "waitSeconds"}``.
   The node holds the request until a job is ready or ``waitSeconds`` (at
   most 60) pass, then answers ``{"jobs": [...]}`` (maybe empty). Each job
   carries ``fencingToken`` and ``attempt``. Acquire is NOT idempotent: after
   a timeout, do not resend blindly; just poll again (a lease lost that way
   expires and the job returns to Pending).

3. Heartbeat every few seconds (well within the lease):
   ``POST /api/workers/{id}/heartbeat`` ``{"jobs": [{"jobId", "fencingToken"}]}``
   extends the leases of the jobs you still run. The answer's
   ``revokedJobs`` lists jobs whose lease is no longer yours: stop them, their
   results would be rejected. 404 ``not_found`` or 409 ``worker_dead`` means
   the cluster has forgotten you or declared you dead: register again with
   the same id.

4. Report: ``POST /api/jobs/{id}/complete``
   ``{"fencingToken", "success": true, "result": any}`` or
   ``{"fencingToken", "success": false, "error": "message"}``. Safe to resend
   (a repeated identical completion is accepted). 409 ``stale_token`` means
   the lease moved on (expired or revoked): drop the result.

5. Leave: ``POST /api/jobs/{id}/release`` ``{"fencingToken"}`` gives an
   unfinished job back (Pending at once, attempt not counted);
   ``DELETE /api/workers/{id}`` deregisters and returns every job still
   leased to you.

Errors look like ``{"error": {"code": "...", "message": "...", "leader": "host:port"}}``.
503 ``no_leader`` (during elections), other 5xx and connection errors mean:
try another node after a short pause.

Usage::

    python3 examples/python_worker.py --coordinators http://127.0.0.1:5001,http://127.0.0.1:5002
    jobsched submit --type py-echo --payload '{"hello": 1}'

Handlers here: ``py-echo`` (returns the payload) and ``py-sum`` (sums
``payload.numbers``). SIGTERM/SIGINT: stop polling, finish the running job,
deregister.
"""

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid


class ApiError(Exception):
    """A definite answer from a coordinator (4xx, or 5xx not worth retrying)."""

    def __init__(self, status, code, message):
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code


class Unavailable(Exception):
    """No node answered within the retry budget."""


class Interrupted(Exception):
    """Raised by the signal handler to cut a long poll short."""


class Coordinators:
    """Sends requests to the first node that answers; remembers it."""

    def __init__(self, urls, timeout=10.0, budget=30.0):
        self.urls = [u.rstrip("/") for u in urls]
        self.preferred = 0
        self.timeout = timeout
        self.budget = budget
        self.lock = threading.Lock()

    def call(self, method, path, body=None, extra_timeout=0.0, idempotent=True):
        data = None if body is None else json.dumps(body).encode()
        start = time.monotonic()
        attempt = 0
        last = "no attempt"
        while time.monotonic() - start < self.budget:
            with self.lock:
                index = (self.preferred + attempt) % len(self.urls)
            base = self.urls[index]
            attempt += 1
            req = urllib.request.Request(base + path, data=data, method=method)
            req.add_header("content-type", "application/json")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout + extra_timeout) as resp:
                    with self.lock:
                        self.preferred = index
                    raw = resp.read()
                    return json.loads(raw) if raw else None
            except urllib.error.HTTPError as e:
                try:
                    err = json.loads(e.read()).get("error", {})
                except (ValueError, AttributeError):
                    err = {}
                code, message = err.get("code", f"http_{e.code}"), err.get("message", "")
                retryable = e.code >= 500 and (idempotent or code == "no_leader")
                if not retryable:
                    raise ApiError(e.code, code, message) from None
                last = f"{base}: HTTP {e.code} {code}"
            except urllib.error.URLError as e:
                refused = isinstance(e.reason, ConnectionRefusedError)
                if not idempotent and not refused:
                    raise Unavailable(f"{base}: {e.reason} (outcome unknown, not retried)") from None
                last = f"{base}: {e.reason}"
            except (socket.timeout, TimeoutError, ConnectionError) as e:
                if not idempotent:
                    raise Unavailable(f"{base}: {e} (outcome unknown, not retried)") from None
                last = f"{base}: {e}"
            # Quick failover to the next node; pause after a full round.
            if attempt % len(self.urls) == 0:
                time.sleep(min(0.1 * 2 ** (attempt // len(self.urls)), 2.0))
        raise Unavailable(last)


def handle_echo(payload):
    return payload


def handle_sum(payload):
    numbers = payload.get("numbers") if isinstance(payload, dict) else None
    if not isinstance(numbers, list):
        raise ValueError("payload.numbers must be a list")
    return {"sum": sum(numbers)}


HANDLERS = {"py-echo": handle_echo, "py-sum": handle_sum}


class Worker:
    def __init__(self, api, name, lease_seconds=60, heartbeat_seconds=5.0, wait_seconds=20.0):
        self.api = api
        self.id = str(uuid.uuid4())
        self.name = name
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.wait_seconds = wait_seconds
        self.held = {}  # job id -> fencing token
        self.revoked = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.polling = False  # main thread is inside the acquire long poll

    def log(self, msg, **fields):
        print(json.dumps({"msg": msg, "workerId": self.id, **fields}), file=sys.stderr, flush=True)

    def register(self):
        body = {"workerId": self.id, "name": self.name, "capacity": 1, "jobTypes": sorted(HANDLERS)}
        while not self.stopping.is_set():
            try:
                self.api.call("POST", "/api/workers/register", body)
                self.log("registered")
                return True
            except (ApiError, Unavailable) as e:
                self.log("registration failed", error=str(e))
                self.stopping.wait(2.0)
        return False

    def heartbeat_loop(self):
        while not self.stopping.wait(self.heartbeat_seconds):
            with self.lock:
                jobs = [{"jobId": j, "fencingToken": t} for j, t in self.held.items()]
            try:
                resp = self.api.call("POST", f"/api/workers/{self.id}/heartbeat", {"jobs": jobs})
                with self.lock:
                    self.revoked.update(resp.get("revokedJobs", []))
            except ApiError as e:
                if e.code in ("worker_dead", "not_found"):
                    self.log("the cluster lost this worker; registering again")
                    self.register()
                else:
                    self.log("heartbeat rejected", error=str(e))
            except Unavailable as e:
                self.log("heartbeat failed", error=str(e))

    def run_job(self, job):
        job_id, token = job["id"], job["fencingToken"]
        with self.lock:
            self.held[job_id] = token
        try:
            handler = HANDLERS.get(job["type"])
            try:
                if handler is None:
                    raise ValueError(f"no handler for {job['type']}")
                report = {"fencingToken": token, "success": True, "result": handler(job["payload"])}
            except Exception as e:  # a handler error fails the attempt
                report = {"fencingToken": token, "success": False, "error": str(e)}
            with self.lock:
                if job_id in self.revoked:
                    self.log("lease revoked; result dropped", jobId=job_id)
                    return
            try:
                self.api.call("POST", f"/api/jobs/{job_id}/complete", report)
                self.log("job reported", jobId=job_id, success=report["success"], attempt=job["attempt"])
            except ApiError as e:
                # 409 stale_token: the lease moved on; the result is dropped.
                self.log("completion refused", jobId=job_id, error=str(e))
            except Unavailable as e:
                self.log("could not report; the lease will expire", jobId=job_id, error=str(e))
        finally:
            with self.lock:
                self.held.pop(job_id, None)

    def run(self):
        if not self.register():
            return
        beat = threading.Thread(target=self.heartbeat_loop, daemon=True)
        beat.start()
        request = {
            "workerId": self.id,
            "jobTypes": sorted(HANDLERS),
            "maxJobs": 1,
            "leaseSeconds": self.lease_seconds,
            "waitSeconds": self.wait_seconds,
        }
        while not self.stopping.is_set():
            try:
                self.polling = True
                resp = self.api.call(
                    "POST", "/api/jobs/acquire", request, extra_timeout=self.wait_seconds, idempotent=False
                )
            except Interrupted:
                break
            except ApiError as e:
                if e.code in ("worker_dead", "not_found"):
                    self.register()
                else:
                    self.log("acquire rejected", error=str(e))
                    self.stopping.wait(1.0)
                continue
            except Unavailable as e:
                self.log("acquire failed", error=str(e))
                self.stopping.wait(1.0)
                continue
            finally:
                self.polling = False
            for job in resp.get("jobs", []):
                self.run_job(job)
        # Deregistering also returns any job a cut-off long poll leased to us.
        try:
            self.api.call("DELETE", f"/api/workers/{self.id}")
            self.log("deregistered")
        except (ApiError, Unavailable) as e:
            self.log("deregistration failed", error=str(e))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--coordinators",
        default=os.environ.get(
            "JOBSCHED_COORDINATORS", "http://127.0.0.1:5001,http://127.0.0.1:5002,http://127.0.0.1:5003"
        ),
    )
    parser.add_argument("--name", default=f"{socket.gethostname()}-py-{os.getpid()}")
    parser.add_argument("--wait-seconds", type=float, default=20.0)
    parser.add_argument("--heartbeat-seconds", type=float, default=5.0)
    parser.add_argument("--lease-seconds", type=int, default=60)
    args = parser.parse_args()

    urls = [u.strip() for u in args.coordinators.split(",") if u.strip()]
    worker = Worker(
        Coordinators(urls),
        args.name,
        lease_seconds=args.lease_seconds,
        heartbeat_seconds=args.heartbeat_seconds,
        wait_seconds=args.wait_seconds,
    )

    def stop(signum, _frame):
        worker.log("signal received; finishing the current job and leaving", signal=signum)
        worker.stopping.set()
        if worker.polling:
            # Abandon the long poll now instead of waiting it out; a job it
            # might still lease to us is returned by deregistration.
            raise Interrupted()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.run()


if __name__ == "__main__":
    main()
