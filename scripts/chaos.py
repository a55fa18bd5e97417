#!/usr/bin/env python3
"""The chaos drill's orchestrator and judge. scripts/chaos sets up the
loopback PostgreSQL, sshd and the daemons' configs and runs this; it is not
meant to run on its own (it reads everything from CHAOS_* variables).

While paced lanes and bursts keep submitting applies (each submit retried
with the same idempotency key until a daemon takes it), it runs a schedule
of faults: daemon SIGKILLs, sshd kills with their session processes,
PostgreSQL fast and immediate restarts, outages longer than the target's
max_target_wait_s, in-doubt COMMITs (commits stalled on a synchronous
standby that does not exist, sshd killed during the stall), a backend
frozen past the job's deadline, sshd's ChannelTimeout closing idle channels,
a second daemon on the same target submitting some of the same keys.
Then it waits for every job to end and checks every key against the ledger
and the data (one iu_collection row per title)."""

import collections
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

E = os.environ
WORK = E["CHAOS_WORK"]
BIN = E["GOVSQL_BIN"]
SHORT = E.get("CHAOS_SHORT") == "1"
DISK_FULL = E.get("CHAOS_DISK_FULL") == "1"
PG_BIN, PG_DIR, PG_PORT, PG_OPTS = E["PG_BIN"], E["PG_DIR"], E["PG_PORT"], E["PG_OPTS"]
SSHD_PORT = int(E["SSHD_PORT"])
SSHD_PID_FILE = E["SSHD_PID_FILE"]
SSHD_CONF_CT, SSHD_CONF_PLAIN = E["CHAOS_SSHD_CONFIG_CT"], E["CHAOS_SSHD_CONFIG_PLAIN"]
SSHD_LOG = E["CHAOS_SSHD_LOG"]
MAX_WAIT = int(E["CHAOS_MAX_TARGET_WAIT_S"])
JOB_TIMEOUT = int(E["CHAOS_JOB_TIMEOUT_S"])
CHANNEL_TIMEOUT = int(E["CHAOS_CHANNEL_TIMEOUT_S"])
DRAIN_S = int(E.get("GOVSQL_CHAOS_DRAIN_S", "600"))
SEED = int(E.get("GOVSQL_CHAOS_SEED") or random.randrange(1 << 30))
# An outage long enough for jobs to give up: a job's first attempt spends
# ~8 s in the SSH connect backoff before it is first sent back to the queue,
# and max_target_wait_s counts from then.
LONG_OUTAGE = MAX_WAIT + (12 if SHORT else 15)
SLACK = 3.0          # seconds around an outage in which giving up is fair
WAKE_TARGET = 2.0    # p50 of "target back -> its oldest waiting job done"
NOTHING_RAN = ("target_unreachable", "db_unavailable", "host_key", "ssh_auth")
TERMINAL = ("planned", "applied", "verified", "refused", "failed", "cancelled")

rng = random.Random(SEED)
T0 = time.time()
PRINT = threading.Lock()


def say(msg):
    with PRINT:
        print(f"   [{time.time() - T0:6.1f}s] {msg}", flush=True)


def run(cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def as_postgres(cmd):
    return (["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []) + cmd


def sql(db, text, check=True):
    r = run(as_postgres([f"{PG_BIN}/psql", "-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1",
                         "-h", PG_DIR, "-p", PG_PORT, "-U", "postgres", "-d", db, "-c", text]), check=check)
    return [l.split("\t") for l in r.stdout.splitlines() if l.strip()]


def pg_ctl(*args):
    r = run(as_postgres([f"{PG_BIN}/pg_ctl", "-D", f"{PG_DIR}/data", "-l", f"{PG_DIR}/log", "-o", PG_OPTS, "-w"]
                        + list(args)), check=False)
    if r.returncode != 0:
        say(f"pg_ctl {' '.join(args)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.returncode == 0


# ---------------------------------------------------------------- the client

class ClientError(Exception):
    pass


def call(sock_path, req, timeout=15):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    try:
        s.connect(sock_path)
        s.sendall((json.dumps(req) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    if not buf.endswith(b"\n"):
        raise ClientError("no reply (connection closed)")
    return json.loads(buf)


# ---------------------------------------------------------------- the daemons

class Daemon:
    def __init__(self, name):
        self.name = name
        self.config = E[f"CHAOS_CONFIG_{name}"]
        self.sock = E[f"CHAOS_SOCKET_{name}"]
        self.log = f"{WORK}/daemon-{name}.log"
        self.pidfile = f"{WORK}/daemon-{name}.pid"
        self.proc = None
        self.lock = threading.RLock()
        self.down_since = T0     # not started yet
        self.down = []           # [(down, up)], up None while down
        self.unexpected = []     # (time, exit code)

    def start(self):
        with self.lock:
            env = dict(os.environ, GOVSQL_CONFIG=self.config, GOVSQL_LOG=E.get("GOVSQL_CHAOS_LOG", "info"))
            with open(self.log, "ab") as log:
                log.write(f"==== chaos: start at +{time.time() - T0:.1f}s\n".encode())
                log.flush()
                self.proc = subprocess.Popen([BIN, "daemon"], env=env, stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=log)
            open(self.pidfile, "w").write(f"{self.proc.pid}\n")
            deadline = time.time() + 30
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    if call(self.sock, {"v": 1, "op": "health"}, timeout=2).get("ok"):
                        if self.down_since is not None:
                            self.down.append((self.down_since, time.time()))
                            self.down_since = None
                        return True
                except (OSError, ValueError, ClientError):
                    pass
                time.sleep(0.05)
            say(f"daemon {self.name} did not start (exit {self.proc.poll()}); its log ends:")
            print(tail(self.log, 15), flush=True)
            return False

    def kill(self, sig=signal.SIGKILL):
        with self.lock:
            if self.proc and self.proc.poll() is None:
                self.down_since = time.time()
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            elif self.down_since is None:
                self.down_since = time.time()

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def was_up(self, t0, t1):
        """Up for the whole of [t0, t1]."""
        for d, u in self.down + ([(self.down_since, None)] if self.down_since is not None else []):
            if d <= t1 and (u is None or u >= t0):
                return False
        return True

    def watch(self):
        """Notes (and restarts) a daemon that exited by itself."""
        with self.lock:
            if self.down_since is None and self.proc is not None and self.proc.poll() is not None:
                code = self.proc.returncode
                self.down_since = time.time()
                self.unexpected.append((time.time(), code))
                say(f"DAEMON {self.name} EXITED BY ITSELF (exit {code}); its log ends:")
                print(tail(self.log, 15), flush=True)
                if not self.start():
                    self.down_since = self.down_since or time.time()


def tail(path, n):
    try:
        lines = open(path, errors="replace").read().splitlines()
    except OSError:
        return "   (no log)"
    return "\n".join("      " + l for l in lines[-n:])


DAEMONS = {"A": Daemon("A"), "B": Daemon("B")}


# ---------------------------------------------------------------- submits

class Submits:
    def __init__(self):
        self.lock = threading.Lock()
        self.n = 0
        self.jobs = []        # dicts: key, title, daemon, job_id, accepted_at, tries
        self.keys = {}        # key -> title
        self.never = []       # (key, daemon, why)
        self.retries = 0

    def new_key(self):
        with self.lock:
            self.n += 1
            key = f"chaos-{self.n:05d}"
            self.keys[key] = f"chaos-title-{SEED:x}-{self.n:05d}"
            return key

    def submit(self, dname, key):
        d = DAEMONS[dname]
        title = self.keys[key]
        start, tries = time.time(), 0
        req = {"v": 1, "op": "submit", "command": "dot_iu_create_collection", "mode": "apply",
               "params": [["title", title]], "idempotency_key": key}
        while True:
            tries += 1
            why = ""
            try:
                r = call(d.sock, req)
                if r.get("ok"):
                    with self.lock:
                        self.jobs.append(dict(key=key, title=title, daemon=dname, job_id=r["job"]["job_id"],
                                              accepted_at=time.time(), tries=tries))
                        self.retries += tries - 1
                    return
                err = r.get("error") or {}
                why = f"{err.get('kind')}: {err.get('message')}"
                if err.get("kind") not in ("unavailable", "internal", "timeout"):
                    with self.lock:
                        self.never.append((key, dname, why))
                    say(f"submit of {key} to {dname} refused: {why}")
                    return
            except (OSError, ValueError, ClientError) as e:
                why = str(e)
            if time.time() - start > 600:
                with self.lock:
                    self.never.append((key, dname, f"the daemon did not take it in 600 s ({tries} tries; last: {why})"))
                return
            time.sleep(0.2)


SUB = Submits()
STOP = threading.Event()                       # no more submits
LANES_ON = {"A": threading.Event(), "B": threading.Event()}
THREADS = []


def spawn(fn, *args):
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    THREADS.append(t)
    return t


def lane(dname, period):
    nxt = time.time()
    while not STOP.is_set():
        if not LANES_ON[dname].is_set():
            time.sleep(0.1)
            nxt = time.time()
            continue
        SUB.submit(dname, SUB.new_key())
        nxt = max(nxt + period * rng.uniform(0.5, 1.5), time.time() - period)
        time.sleep(max(0.0, nxt - time.time()))


def dup_lane(period):
    """The same key, same params, on both daemons (in either order)."""
    while not STOP.is_set():
        if not LANES_ON["B"].is_set():
            time.sleep(0.1)
            continue
        key = SUB.new_key()
        order = ["A", "B"] if rng.random() < 0.5 else ["B", "A"]
        for dname in order:
            SUB.submit(dname, key)
            time.sleep(rng.uniform(0, 0.3))
        time.sleep(period * rng.uniform(0.5, 1.5))


def burst(dname, n, width=4):
    keys = [SUB.new_key() for _ in range(n)]
    def part(ks):
        for k in ks:
            SUB.submit(dname, k)
    for i in range(width):
        spawn(part, keys[i::width])


def watcher():
    while True:
        for d in DAEMONS.values():
            d.watch()
        time.sleep(0.5)


# ---------------------------------------------------------------- the target's faults

OUTAGES = []     # dicts: name, down, up, detail
CT_ON = [True]   # whether the running sshd has ChannelTimeout
INDOUBT = []     # (episode no, job ids caught waiting for the standby)
FROZEN = []      # dicts: pid, app, state, at, job


def children_map():
    kids = collections.defaultdict(list)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            kids[ppid].append(int(pid))
        except (OSError, ValueError, IndexError):
            pass
    return kids


def tree(pid):
    kids, out, todo = children_map(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def sshd_pid():
    try:
        pid = int(open(SSHD_PID_FILE).read().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def port_open():
    try:
        socket.create_connection(("127.0.0.1", SSHD_PORT), timeout=0.5).close()
        return True
    except OSError:
        return False


def sshd_kill(sig=signal.SIGKILL):
    """sshd and every process under it: its connections, shells, psqls."""
    pid = sshd_pid()
    if pid:
        # Stopped first, sshd forks no connection the kill would miss.
        def send(p, s):
            try:
                os.kill(p, s)
            except OSError:
                pass
        send(pid, signal.SIGSTOP)
        for p in tree(pid):
            send(p, sig)
        send(pid, signal.SIGCONT)
    for _ in range(100):
        if not port_open():
            return
        time.sleep(0.05)


def sshd_start(ct):
    CT_ON[0] = ct
    conf = SSHD_CONF_CT if ct else SSHD_CONF_PLAIN
    run(["/usr/sbin/sshd", "-f", conf, "-E", SSHD_LOG])
    for _ in range(200):
        if port_open():
            return time.time()
        time.sleep(0.02)
    raise SystemExit("sshd did not come back")


CT_WANTED = [True]


def ct_wanted():
    """ChannelTimeout: the whole short run; the first 60% of the full run."""
    return CT_WANTED[0]


def outage(name, down, up, detail=""):
    OUTAGES.append(dict(name=name, down=down, up=up, detail=detail))


def ep_sshd_kill(ct_off=False):
    down = time.time()
    sshd_kill()
    time.sleep(1)
    if ct_off:
        CT_WANTED[0] = False
    up = sshd_start(ct_wanted())
    outage("sshd kill", down, up, "ChannelTimeout " + ("on" if ct_wanted() else "off"))
    say(f"sshd killed with its sessions; back after {up - down:.1f} s"
        + (" without ChannelTimeout from here" if ct_off else ""))


def ep_sshd_outage(secs):
    down = time.time()
    sshd_kill(signal.SIGTERM)
    time.sleep(secs)
    up = sshd_start(ct_wanted())
    outage("sshd stopped", down, up, f"{up - down:.0f} s > max_target_wait_s {MAX_WAIT}")
    say(f"sshd stopped for {up - down:.1f} s (max_target_wait_s = {MAX_WAIT})")


def ep_pg_restart(mode):
    down = time.time()
    pg_ctl("-m", mode, "restart")
    up = time.time()
    outage(f"PostgreSQL {mode} restart", down, up)
    say(f"PostgreSQL restarted ({mode}) in {up - down:.1f} s")


def ep_pg_outage(secs, kill_a=False):
    down = time.time()
    pg_ctl("-m", "fast", "stop")
    extra = ""
    if kill_a:
        time.sleep(secs / 3)
        DAEMONS["A"].kill()
        restart(DAEMONS["A"])
        extra = "; daemon A SIGKILLed and restarted during it"
    time.sleep(max(0.0, secs - (time.time() - down)))
    pg_ctl("start")
    up = time.time()
    outage("PostgreSQL stopped", down, up, f"{up - down:.0f} s > max_target_wait_s {MAX_WAIT}{extra}")
    say(f"PostgreSQL stopped for {up - down:.1f} s (max_target_wait_s = {MAX_WAIT}){extra}")


def syncrep_waiters():
    rows = sql("postgres", "SELECT pid, application_name FROM pg_stat_activity "
                           "WHERE usename = 'govsql_runtime' AND wait_event = 'SyncRep'", check=False)
    return [(r[0], r[1]) for r in rows if len(r) == 2]


def ep_indoubt():
    n = len(INDOUBT) + 1
    down = time.time()
    sql("postgres", "ALTER SYSTEM SET synchronous_standby_names = 'nosuch'")
    sql("postgres", "SELECT pg_reload_conf()")
    waiting = []
    deadline = time.time() + min(6, JOB_TIMEOUT - 3)
    while time.time() < deadline:
        waiting = syncrep_waiters()
        if len(waiting) >= 2:
            break
        time.sleep(0.1)
    time.sleep(0.5)
    waiting = syncrep_waiters() or waiting
    sshd_kill()
    time.sleep(0.3)
    after = syncrep_waiters()
    caught = sorted({app.split(":", 1)[1] for _, app in waiting + after if app.startswith("govsql:")})
    INDOUBT.append((n, down, caught))
    time.sleep(1.5)
    sql("postgres", "ALTER SYSTEM RESET synchronous_standby_names")
    sql("postgres", "SELECT pg_reload_conf()")
    time.sleep(0.5)
    up = sshd_start(ct_wanted())
    outage("in-doubt COMMIT", down, up, f"{len(caught)} commits stalled, sshd killed")
    say(f"in-doubt COMMIT #{n}: {len(caught)} applies waited for a standby named 'nosuch' "
        f"({len(after)} still waiting after sshd was killed); setting reset, sshd back after {up - down:.1f} s")


def ep_freeze():
    secs = JOB_TIMEOUT + 5
    pick = None
    deadline = time.time() + 3
    while time.time() < deadline:
        rows = sql("postgres", "SELECT pid, application_name, state FROM pg_stat_activity "
                               "WHERE usename = 'govsql_runtime' AND backend_type = 'client backend' "
                               "ORDER BY (state = 'active') DESC, (application_name LIKE 'govsql%') DESC, backend_start LIMIT 1",
                   check=False)
        if rows and len(rows[0]) == 3:
            pick = rows[0]
            if pick[2] == "active" and pick[1].startswith("govsql"):
                break
        time.sleep(0.02)
    if not pick:
        say("freeze: no govsql_runtime backend to freeze; skipped")
        return
    pid = int(pick[0])
    os.kill(pid, signal.SIGSTOP)
    open(f"{WORK}/frozen.pid", "w").write(f"{pid}\n")
    at = time.time()
    job = pick[1].split(":", 1)[1] if pick[1].startswith("govsql:") else ""
    FROZEN.append(dict(pid=pid, app=pick[1], state=pick[2], at=at, job=job))
    say(f"backend {pid} ({pick[1] or '-'}, {pick[2]}) frozen with SIGSTOP for {secs} s (job_timeout_s = {JOB_TIMEOUT})")
    time.sleep(secs)
    os.kill(pid, signal.SIGCONT)
    os.unlink(f"{WORK}/frozen.pid")
    say(f"backend {pid} continued (SIGCONT)")


def ep_kill(dname):
    """SIGKILL in the middle of a burst of submits to it."""
    d = DAEMONS[dname]
    burst(dname, 60)
    time.sleep(rng.uniform(0.01, 0.08))
    t = time.time()
    d.kill()
    restart(d)
    say(f"daemon {dname} SIGKILLed, back after {time.time() - t:.1f} s")


def restart(d):
    for _ in range(5):
        if d.start():
            return
        d.unexpected.append((time.time(), f"did not start (exit {d.proc.poll()})"))
        d.kill()
        time.sleep(1)
    raise SystemExit(f"daemon {d.name} does not start")


def ep_start_b():
    restart(DAEMONS["B"])
    LANES_ON["B"].set()
    say("daemon B started (own state_dir and socket, same target); its lane and the shared-key lane begin")


def ep_stop_b():
    LANES_ON["B"].clear()
    time.sleep(0.5)
    DAEMONS["B"].kill()
    say("daemon B SIGKILLed; it stays down until the end (its jobs wait for it)")


def ep_lull():
    """No submits for longer than sshd's ChannelTimeout: idle channels die."""
    secs = CHANNEL_TIMEOUT + 3
    on = {n: e.is_set() for n, e in LANES_ON.items()}
    for e in LANES_ON.values():
        e.clear()
    time.sleep(secs)
    for n, e in LANES_ON.items():
        if on[n]:
            e.set()
    say(f"no submits for {secs} s (ChannelTimeout {'on' if CT_ON[0] else 'off'}); submits again")
    ep_burst("A", 30)


def ep_burst(dname, n):
    if dname == "B" and not LANES_ON["B"].is_set():
        dname = "A"
    burst(dname, n)
    say(f"burst of {n} submits to daemon {dname}")


def ep_disk_full():
    d = DAEMONS["A"]
    state = E["CHAOS_STATE_A"]
    probe = f"{WORK}/fill"
    os.makedirs(probe, exist_ok=True)
    if run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=700", "tmpfs", probe], check=False).returncode != 0:
        say("disk full: cannot mount a tmpfs here; skipped")
        return
    run(["umount", probe])
    d.kill()
    run(["cp", "-a", state, state + ".bak"])
    run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=700", "tmpfs", state])
    run(["cp", "-a", state + ".bak/.", state + "/"])
    restart(d)
    run(["dd", "if=/dev/zero", f"of={state}/filler", "bs=64k"], check=False)
    time.sleep(3)
    os.unlink(f"{state}/filler")
    say("disk full: daemon A's state dir moved to a 4 MB tmpfs and filled for 3 s")


# ---------------------------------------------------------------- the schedule

def schedule():
    """[(seconds, function, args)]: for the short run, when (from the first
    submit; an episode that overran delays the next); for the full run, the
    pause before the episode (after the previous one ended)."""
    if SHORT:
        return [
            (5, ep_start_b, ()),
            (10, ep_kill, ("A",)),
            (15, ep_burst, ("A", 30)),
            (18, ep_sshd_kill, ()),
            (28, ep_pg_restart, ("fast",)),
            (37, ep_indoubt, ()),
            (50, ep_burst, ("B", 20)),
            (52, ep_sshd_outage, (LONG_OUTAGE,)),
            (78, ep_pg_restart, ("immediate",)),
            (82, ep_lull, ()),
            (104, ep_stop_b, ()),
            (106, ep_kill, ("A",)),
            (110, ep_burst, ("A", 30)),
            (114, None, ()),
        ]
    names = {"kill": (ep_kill, ("A",)), "kill_b": (ep_kill, ("B",)), "sshd_kill": (ep_sshd_kill, ()),
             "pg_fast": (ep_pg_restart, ("fast",)), "pg_immediate": (ep_pg_restart, ("immediate",)),
             "indoubt": (ep_indoubt, ()), "sshd_outage": (ep_sshd_outage, (LONG_OUTAGE,)),
             "pg_outage": (ep_pg_outage, (LONG_OUTAGE,)), "pg_outage_kill": (ep_pg_outage, (LONG_OUTAGE, True)),
             "freeze": (ep_freeze, ()), "lull": (ep_lull, ()), "disk_full": (ep_disk_full, ()),
             "burst": (ep_burst, ("A", 40))}
    if E.get("GOVSQL_CHAOS_ONLY"):
        # Only these episodes (comma-separated names), 8 s apart: for
        # working on the drill itself.
        out = [(3, ep_start_b, ())]
        for name in E["GOVSQL_CHAOS_ONLY"].split(","):
            out.append((6, *names[name]))
        return out + [(6, None, ())]
    long_out = LONG_OUTAGE
    middle = ([(ep_kill, ("A",))] * 6 + [(ep_sshd_kill, ())] * 4 + [(ep_pg_restart, ("fast",))] * 3
              + [(ep_pg_restart, ("immediate",))] * 3 + [(ep_indoubt, ())] * 3
              + [(ep_sshd_outage, (long_out,))] * 2 + [(ep_pg_outage, (long_out,))]
              + [(ep_pg_outage, (long_out, True))] + [(ep_freeze, ())] * 2
              + [(ep_burst, ("A", 40)), (ep_burst, ("B", 30)), (ep_burst, ("A", 40)), (ep_burst, ("B", 30))]
              + [(ep_kill, ("B",))] * 2 + [(ep_lull, ())] * 2 + ([(ep_disk_full, ())] if DISK_FULL else []))
    rng.shuffle(middle)
    eps = [(ep_kill, ("A",)), (ep_start_b, ())] + middle
    # sshd restarts without ChannelTimeout at 60%; daemon B stops for good
    # at 80%, before the last few.
    eps.insert(2 + int(len(middle) * 0.8), (ep_stop_b, ()))
    eps.insert(2 + int(len(middle) * 0.62), (ep_sshd_kill, (True,)))
    eps += [(ep_kill, ("A",)), (ep_burst, ("A", 40))]
    return [(rng.uniform(7, 13), fn, args) for fn, args in eps] + [(6, None, ())]


def inflight_skip(fn, args):
    """Daemon B kills while B is down are skipped."""
    return fn is ep_kill and args == ("B",) and not LANES_ON["B"].is_set()


# ---------------------------------------------------------------- the end

def list_jobs(d):
    out, page = [], 0
    while True:
        r = call(d.sock, {"v": 1, "op": "list", "limit": 1000, "page": page}, timeout=60)
        if not r.get("ok"):
            raise ClientError(f"list on {d.name}: {r.get('error')}")
        jobs = r.get("jobs") or []
        out.extend(jobs)
        if len(jobs) < 1000:
            return out
        page += 1


def drain():
    print(f"== waiting for every job to end (at most {DRAIN_S} s)", flush=True)
    start = time.time()
    deadline = start + DRAIN_S
    last = 0.0
    known = {}
    while True:
        pending = collections.Counter()
        jobs = {}
        try:
            for d in DAEMONS.values():
                for j in list_jobs(d):
                    jobs[(d.name, j["job_id"])] = j
        except (OSError, ValueError, ClientError) as e:
            say(f"cannot list jobs ({e}); trying again")
            time.sleep(2)
            continue
        for (dn, jid), j in jobs.items():
            if j["state"] not in TERMINAL:
                pending[j["state"]] += 1
        known = jobs
        n = sum(pending.values())
        if n == 0:
            say(f"every job ended ({time.time() - start:.0f} s after the last submit)")
            return known, time.time() - start
        if time.time() >= deadline:
            say(f"{n} jobs still not over after {DRAIN_S} s: {dict(pending)}")
            return known, None
        if time.time() - last >= 15:
            last = time.time()
            say(f"{n} jobs not over yet: {dict(pending)}")
        time.sleep(2)


def ledger_and_data():
    ledger = collections.defaultdict(list)
    for r in sql("iu_core", "SELECT idempotency_key, run_status, run_id, coalesce(evidence->>'job_id', ''), "
                            "coalesce(evidence->>'error_class', ''), extract(epoch FROM created_at) "
                            "FROM dot_iu_command_run WHERE run_mode = 'apply' AND idempotency_key LIKE 'chaos-%' "
                            "ORDER BY run_id"):
        ledger[r[0]].append(dict(status=r[1], run_id=int(r[2]), job_id=r[3], cls=r[4], at=float(r[5])))
    data = {}
    for r in sql("iu_core", "SELECT title, count(*), extract(epoch FROM min(created_at)) FROM public.iu_collection "
                            "WHERE title LIKE 'chaos-title-%' GROUP BY title"):
        data[r[0]] = int(r[1])
    return ledger, data


def judge(jobs, drained):
    ledger, data = ledger_and_data()
    accepted = {(j["daemon"], j["job_id"]): j for j in SUB.jobs}
    by_key = collections.defaultdict(list)
    for (dn, jid), j in jobs.items():
        j["_daemon"] = dn
        by_key[j["idempotency_key"]].append(j)
    vanished = [a for k, a in accepted.items() if k not in jobs]
    unknown = [j for k, j in jobs.items() if k not in accepted and j["idempotency_key"].startswith("chaos-")]
    keys = SUB.keys
    submitted = {a["key"] for a in SUB.jobs} | (set(by_key) & set(keys))

    def cls(j):
        return ((j.get("outcome") or {}).get("error_class")) or ""

    def msg(j):
        return ((j.get("outcome") or {}).get("message")) or ""

    applied_rows = {k: [r for r in rs if r["status"] == "applied"] for k, rs in ledger.items()}
    once_l = sum(1 for k in submitted if len(applied_rows.get(k, [])) == 1)
    twice_l = sorted(k for k in submitted if len(applied_rows.get(k, [])) > 1)
    once_d = sum(1 for k in submitted if data.get(keys[k], 0) == 1)
    twice_d = sorted(k for k in submitted if data.get(keys[k], 0) > 1)
    stuck = [j for j in jobs.values() if j["state"] not in TERMINAL]
    lost = sorted(k for k in submitted
                  if not any(j["state"] in TERMINAL for j in by_key.get(k, []))
                  and not any(j["state"] not in TERMINAL for j in by_key.get(k, []))
                  and data.get(keys[k], 0) == 0)
    failed = collections.Counter()
    for j in jobs.values():
        if j["state"] in ("failed", "refused", "cancelled"):
            failed[f"{j['state']}/{cls(j) or '?'}"] += 1

    # Failed but committed: a job that ended failed/refused although the
    # commit for its key is its own (the applied row names it), or although
    # its key committed and no job of the key was told "applied".
    fbc, sibling = [], 0
    for j in jobs.values():
        if j["state"] not in ("failed", "refused", "cancelled"):
            continue
        k = j["idempotency_key"]
        rows = applied_rows.get(k, [])
        committed = bool(rows) or data.get(keys.get(k, ""), 0) > 0
        if not committed:
            continue
        if any(r["job_id"] == j["job_id"] for r in rows):
            fbc.append((j, "the applied ledger row for its key names this job"))
        elif not any(s["state"] == "applied" for s in by_key[k]):
            fbc.append((j, "its key committed (" + ("ledger" if rows else "data only") +
                        ") and no job of the key ended applied"))
        else:
            sibling += 1

    # Consistency of applied jobs with the ledger and the data.
    incoherent = []
    for k in submitted:
        rows, n = applied_rows.get(k, []), data.get(keys[k], 0)
        said_applied = [j for j in by_key.get(k, []) if j["state"] == "applied"]
        if said_applied and not rows:
            incoherent.append((k, "a job ended applied but the ledger has no applied row"))
        if said_applied and n == 0:
            incoherent.append((k, "a job ended applied but its title has no data row"))
        if rows and n == 0:
            incoherent.append((k, "an applied ledger row but no data row"))
        if n and not rows:
            incoherent.append((k, "a data row but no applied ledger row"))

    # Gave up although the target was answering. When it gave up: the
    # daemon's last "job finished" log line for it (finished_at is when the
    # queue recorded the end, which lagged by seconds on a loaded machine),
    # else finished_at (whole seconds).
    last_end = finish_lines()
    LAST_END.update(last_end)

    def in_outage(t, whole=True):
        return any(o["down"] - 1 <= t + (1 if whole else 0) and t <= o["up"] + SLACK for o in OUTAGES)

    def gave_up_fairly(j):
        if j["job_id"] in last_end:
            return in_outage(last_end[j["job_id"]], whole=False)
        return in_outage(j.get("finished_at") or 0)
    gave_up = [j for j in jobs.values() if j["state"] == "failed" and cls(j) in NOTHING_RAN
               and not gave_up_fairly(j)]
    gave_up_fair = sum(1 for j in jobs.values() if j["state"] == "failed" and cls(j) in NOTHING_RAN
                       and gave_up_fairly(j))

    # In-doubt commits must end applied.
    indoubt_bad, indoubt_n = [], 0
    for n, stall, ids in INDOUBT:
        for jid in ids:
            j = next((j for (dn, i), j in jobs.items() if i == jid), None)
            # A job over before the stall was writing an owed ledger row.
            if j is not None and j.get("finished_at") is not None and j["finished_at"] < stall - 1:
                continue
            indoubt_n += 1
            if j is None or j["state"] != "applied":
                indoubt_bad.append((n, jid, j))

    # Wake: from the target's return to its oldest waiting job's end.
    own_row = {}
    for k, rs in ledger.items():
        for r in rs:
            if r["job_id"] and r["status"] == "applied":
                own_row[r["job_id"]] = r["at"]

    def end_of(j):
        """(earliest, estimate, mark): when the job ended. Its own applied
        row's time when it has one; else finished_at (whole seconds)."""
        if j["state"] == "applied" and j["job_id"] in own_row:
            t = own_row[j["job_id"]]
            return t, t, ""
        if j["state"] in TERMINAL and j["job_id"] in last_end:
            t = last_end[j["job_id"]]
            return t, t, ""
        f = j.get("finished_at")
        if f is None:
            return None, None, ""
        return f, f + 0.5, "~"

    def accepted_at(j):
        a = accepted.get((j["_daemon"], j["job_id"]))
        return a["accepted_at"] if a else j["submitted_at"] + 0.5

    wakes = []
    wake_lines = []
    applied_times = sorted(r["at"] for rs in applied_rows.values() for r in rs)
    for o in OUTAGES:
        u = o["up"]
        waiting = []
        for j in jobs.values():
            d = DAEMONS[j["_daemon"]]
            if not d.was_up(u, u):
                continue
            lo, e, approx = end_of(j)
            if accepted_at(j) >= u:
                continue
            if j["state"] == "failed" and cls(j) in NOTHING_RAN and in_outage(j.get("finished_at") or 0):
                continue  # it gave up during the outage
            # Not over when the target came back (and not over before it went).
            if e is None or (not approx and e > u) or (approx and lo >= o["down"] and lo + 1 > u):
                waiting.append((accepted_at(j), j, e, approx))
        first = next((t for t in applied_times if t >= u), None)
        first_s = f"first commit after it +{first - u:.1f} s" if first else "no commit after it"
        if not waiting:
            wake_lines.append(f"   {o['name']:<28} at +{u - T0:6.1f}s: no job was waiting ({first_s})")
            continue
        waiting.sort(key=lambda w: w[0])
        _, j, e, approx = waiting[0]
        if e is None:
            w = float("inf")
        else:
            w = max(0.0, e - u)
        wakes.append(w)
        wake_lines.append(f"   {o['name']:<28} at +{u - T0:6.1f}s: {len(waiting):4d} waiting; oldest {j['job_id']} "
                          f"({j['_daemon']}, {j['state']}) done {approx}+{w:.1f} s; {first_s}")
    p50 = statistics.median(wakes) if wakes else None

    unexpected = [(d.name, t, c) for d in DAEMONS.values() for t, c in d.unexpected]
    never = SUB.never

    # ---- the report
    n_jobs = len(jobs)
    dup_keys = sum(1 for k, js in by_key.items() if len({j["_daemon"] for j in js}) > 1)
    print("== results", flush=True)
    print(f"seed                     {SEED:#x} (GOVSQL_CHAOS_SEED to repeat the schedule)")
    print(f"submitted                {len(submitted)} keys, {n_jobs} jobs "
          f"(A {sum(1 for j in jobs.values() if j['_daemon'] == 'A')}, B {sum(1 for j in jobs.values() if j['_daemon'] == 'B')}); "
          f"{dup_keys} keys on both daemons; {SUB.retries} submit retries; {len(unknown)} jobs whose submit reply was lost")
    print(f"applied once             ledger {once_l}   data {once_d}")
    print(f"applied twice            ledger {len(twice_l)}   data {len(twice_d)}")
    print(f"lost                     {len(lost)}")
    print(f"stuck                    {len(stuck)}" + ("" if drained is not None else f" (after {DRAIN_S} s)"))
    print(f"failed by class          {sum(failed.values())} {dict(sorted(failed.items())) if failed else ''}")
    print(f"failed-but-committed     {len(fbc)}   ({sibling} failed jobs whose key another job applied: fine)")
    print(f"gave up while target up  {len(gave_up)}   (failed {'/'.join(NOTHING_RAN[:2])} outside every outage ± {SLACK:.0f} s; "
          f"{gave_up_fair} gave up during an outage: fine)")
    print(f"in-doubt COMMITs         {indoubt_n} applies caught in {len(INDOUBT)} stalls; {indoubt_n - len(indoubt_bad)} ended applied")
    hit = deadlines()
    for f in FROZEN:
        ids = sorted({jid for t, jid in hit if f["at"] - 1 <= t <= f["at"] + JOB_TIMEOUT + 7})
        ends = []
        for jid in ids:
            j = next((j for (dn, i), j in jobs.items() if i == jid), None)
            owed = j is not None and (j.get("finished_at") or 1e12) < f["at"] - 1
            ends.append(f"{jid} {(j['state'] + ' ' + cls(j)).strip() if j else 'no such job'}"
                        + (" (over before the freeze: its owed ledger row was being written)" if owed else ""))
        print(f"frozen backend           pid {f['pid']} ({f['state']}, {f['app'] or '-'}) at +{f['at'] - T0:.0f}s; "
              f"jobs past their deadline meanwhile: {', '.join(ends) or 'none'}")
    print(f"timeouts                 {sum(1 for j in jobs.values() if cls(j) == 'timeout')} jobs ended with class timeout")
    try:
        ct = sum(1 for l in open(SSHD_LOG, errors="replace") if "seconds of inactivity" in l)
    except OSError:
        ct = "?"
    print(f"ChannelTimeout           sshd closed {ct} idle channels")
    print(f"incoherent               {len(incoherent)} (applied job, ledger and data disagree)")
    print(f"vanished jobs            {len(vanished)} (a daemon took a submit, then had no such job)")
    print(f"submits never taken      {len(never)}")
    print(f"daemons exited by itself {len(unexpected)}")
    print(f"drain                    " + (f"{drained:.0f} s" if drained is not None else f"> {DRAIN_S} s"))
    print("wake (target back -> its oldest waiting job done: its ledger row or its daemon's log line; ~ = finished_at):")
    for l in wake_lines:
        print(l)
    print(f"wake p50                 " + (f"{p50:.1f} s" if p50 is not None else "n/a (no outage had a waiting job)")
          + f" (target <= {WAKE_TARGET:.0f} s) over {len(wakes)} outages")

    problems = []
    if twice_l or twice_d:
        problems.append("applied twice")
    if lost:
        problems.append("lost")
    if stuck:
        problems.append("stuck")
    if fbc:
        problems.append("failed-but-committed")
    if gave_up:
        problems.append("gave up while the target was up")
    if indoubt_bad:
        problems.append("in-doubt COMMIT not applied")
    if incoherent:
        problems.append("incoherent")
    if vanished:
        problems.append("vanished jobs")
    if never:
        problems.append("submits never taken")
    if unexpected:
        problems.append("daemon exited by itself")
    if (p50 is None and OUTAGES) or (p50 is not None and p50 > WAKE_TARGET):
        problems.append("wake p50")
    if INDOUBT and indoubt_n == 0:
        problems.append("no in-doubt COMMIT was caught")

    if problems:
        details(jobs, by_key, ledger, data, keys, twice_l, twice_d, lost, stuck, fbc, gave_up,
                indoubt_bad, incoherent, vanished, never, unexpected)
        print("CHAOS FAILED: " + ", ".join(problems))
        return 1
    print("chaos ok")
    return 0


LAST_END = {}


def log_time(line):
    import datetime
    try:
        return datetime.datetime.strptime(line[:26], "%Y-%m-%dT%H:%M:%S.%f").replace(
            tzinfo=datetime.timezone.utc).timestamp()
    except ValueError:
        return None


def deadlines():
    """(unix time, job id) of every "job deadline passed" in the daemons' logs."""
    out = []
    for d in DAEMONS.values():
        try:
            for l in open(d.log, errors="replace"):
                if "deadline passed" in l and "tag=govsql:" in l:
                    ts = log_time(l)
                    if ts is not None:
                        out.append((ts, l.split("tag=govsql:", 1)[1].split()[0]))
        except OSError:
            pass
    return out


def finish_lines():
    """job id -> unix time of its last "job finished" line in the logs."""
    out = {}
    for d in DAEMONS.values():
        try:
            for l in open(d.log, errors="replace"):
                if " job finished " in l and "job_id=" in l:
                    ts = log_time(l)
                    if ts is not None:
                        out[l.split("job_id=", 1)[1].split()[0]] = ts
        except OSError:
            pass
    return out


def log_lines(job_id, n=8):
    out = []
    for d in DAEMONS.values():
        try:
            for l in open(d.log, errors="replace"):
                if job_id in l:
                    out.append(f"{d.name}: {l.rstrip()}")
        except OSError:
            pass
    if len(out) > n:
        out = out[:2] + [f"... {len(out) - n} more ..."] + out[-(n - 2):]
    return out


def describe(j, ledger, data, keys, why="", brief=False):
    o = j.get("outcome") or {}
    k = j["idempotency_key"]
    rel = lambda t: f"+{t - T0:.0f}s" if t else "-"
    print(f"  job {j['job_id']} daemon {j['_daemon']} key {k} state {j['state']} class {o.get('error_class') or '-'} "
          f"run_id {o.get('run_id')} submitted {rel(j.get('submitted_at'))} finished {rel(j.get('finished_at'))}"
          + (f"  <- {why}" if why else ""))
    if brief:
        return
    if j["job_id"] in LAST_END:
        print(f"      its last \"job finished\" log line: +{LAST_END[j['job_id']] - T0:.1f}s")
    if o.get("message"):
        print(f"      message: {o['message']}")
    for r in ledger.get(k, []):
        print(f"      ledger: run {r['run_id']} {r['status']} {r['cls'] or ''} by job {r['job_id'] or '-'} at {rel(r['at'])}")
    print(f"      data rows for its title: {data.get(keys.get(k, ''), 0)}")
    for l in log_lines(j["job_id"]):
        print(f"      {l}")


def details(jobs, by_key, ledger, data, keys, twice_l, twice_d, lost, stuck, fbc, gave_up,
            indoubt_bad, incoherent, vanished, never, unexpected):
    print("== what failed")
    print("outages (relative to the first submit):")
    for o in OUTAGES:
        print(f"   {o['name']:<28} +{o['down'] - T0:6.1f}s .. +{o['up'] - T0:6.1f}s  {o['detail']}")
    for d in DAEMONS.values():
        print(f"   daemon {d.name} down: " + ", ".join(f"+{a - T0:.1f}s..{('+%.1fs' % (b - T0)) if b else 'end'}"
                                                     for a, b in d.down + ([(d.down_since, None)] if d.down_since else [])))

    def keyjobs(title, ks, limit=20):
        if not ks:
            return
        print(f"{title}: {len(ks)}")
        for k in ks[:limit]:
            print(f" key {k}:")
            for j in by_key.get(k, []):
                describe(j, ledger, data, keys)
            if not by_key.get(k):
                print(f"   no job; data rows {data.get(keys.get(k, ''), 0)}; ledger {ledger.get(k)}")

    keyjobs("applied twice (ledger)", twice_l)
    keyjobs("applied twice (data)", twice_d)
    keyjobs("lost", lost)
    for title, js in (("stuck", stuck), ("gave up while the target was up", gave_up)):
        if js:
            print(f"{title}: {len(js)}")
            for i, j in enumerate(sorted(js, key=lambda j: j.get("submitted_at") or 0)[:60]):
                describe(j, ledger, data, keys, brief=i >= 8)
    if fbc:
        print(f"failed-but-committed: {len(fbc)}")
        for i, (j, why) in enumerate(fbc[:60]):
            describe(j, ledger, data, keys, why, brief=i >= 8)
    if indoubt_bad:
        print(f"in-doubt COMMITs that did not end applied: {len(indoubt_bad)}")
        for n, jid, j in indoubt_bad:
            if j is None:
                print(f"  stall #{n}: job {jid}: no such job in either daemon")
            else:
                describe(j, ledger, data, keys, f"stall #{n}")
    if incoherent:
        print(f"incoherent: {len(incoherent)}")
        for k, why in incoherent[:25]:
            print(f" key {k}: {why}")
            for j in by_key.get(k, []):
                describe(j, ledger, data, keys)
    for a in vanished[:25]:
        print(f"vanished: job {a['job_id']} key {a['key']} taken by daemon {a['daemon']} at +{a['accepted_at'] - T0:.1f}s")
        for l in log_lines(a["job_id"]):
            print(f"      {l}")
    for k, dn, why in never[:25]:
        print(f"never taken: key {k} by daemon {dn}: {why}")
    for dn, t, c in unexpected:
        print(f"daemon {dn} exited by itself at +{t - T0:.1f}s with {c}")


# ---------------------------------------------------------------- main

def main():
    global T0
    fs = sql("postgres", "SHOW fsync")[0][0]
    if fs != "on":
        raise SystemExit(f"PostgreSQL runs with fsync={fs}; the drill needs fsync on")
    plan = schedule()
    relative = not SHORT or bool(E.get("GOVSQL_CHAOS_ONLY"))
    kinds = collections.Counter(f"{fn.__name__[3:]}{'(' + ','.join(map(str, a)) + ')' if a else ''}"
                                for _, fn, a in plan if fn is not None)
    print(f"== chaos ({'short' if SHORT else 'full'}, seed {SEED:#x}): {sum(kinds.values())} episodes "
          f"{dict(sorted(kinds.items()))}; max_target_wait_s {MAX_WAIT}, job_timeout_s {JOB_TIMEOUT}, "
          f"long outages {LONG_OUTAGE} s, sshd ChannelTimeout session:*={CHANNEL_TIMEOUT}s "
          f"({'whole run' if SHORT else 'first 60%'}), PostgreSQL fsync={fs}", flush=True)
    T0 = time.time()
    for d in DAEMONS.values():
        d.down_since = T0
    restart(DAEMONS["A"])
    threading.Thread(target=watcher, daemon=True).start()
    LANES_ON["A"].set()
    # Paced lanes: two on A, one on B while it runs, one that gives the same
    # key to both daemons.
    spawn(lane, "A", 0.35)
    spawn(lane, "A", 0.5)
    spawn(lane, "B", 0.5)
    spawn(dup_lane, 1.0)
    prev_end = time.time()
    for at, fn, args in plan:
        if relative:
            time.sleep(at)
        else:
            time.sleep(max(0.0, T0 + at - time.time(), prev_end + 2 - time.time()))
        if fn is None:
            break
        if inflight_skip(fn, args):
            continue
        fn(*args)
        prev_end = time.time()
    STOP.set()
    # Everything healthy again for the end: the target, both daemons.
    if sshd_pid() is None or not port_open():
        sshd_start(CT_ON[0])
    for d in DAEMONS.values():
        with d.lock:
            if not d.alive():
                restart(d)
    say("submits stopped; target healthy; both daemons up to finish their jobs")
    for t in THREADS:
        t.join(timeout=650)
    jobs, drained = drain()
    if E.get("GOVSQL_CHAOS_SABOTAGE") == "1":
        sabotage(jobs)
    return judge(jobs, drained)


def sabotage(jobs):
    """GOVSQL_CHAOS_SABOTAGE=1 proves the judge can fail: a second data row
    for one applied key (applied twice), a data row for the title of a job
    that gave up (failed-but-committed), an accepted job that no daemon has
    (lost, vanished), and the longest outage forgotten (its give-ups now
    look like giving up while the target was up)."""
    applied = [j for j in jobs.values() if j["state"] == "applied"]
    gave_up = [j for j in jobs.values() if j["state"] == "failed"]
    if applied:
        t = SUB.keys[applied[0]["idempotency_key"]]
        sql("iu_core", f"INSERT INTO public.iu_collection (title) VALUES ('{t}')")
    if gave_up:
        t = SUB.keys[gave_up[0]["idempotency_key"]]
        sql("iu_core", f"INSERT INTO public.iu_collection (title) VALUES ('{t}')")
    key = SUB.new_key()
    SUB.jobs.append(dict(key=key, title=SUB.keys[key], daemon="A", job_id="0-sabotage",
                         accepted_at=time.time(), tries=1))
    longest = [o for o in OUTAGES if o["up"] - o["down"] > MAX_WAIT]
    if longest:
        OUTAGES.remove(longest[0])
    say("SABOTAGE: the drill itself broke the results (GOVSQL_CHAOS_SABOTAGE=1); it must fail")


if __name__ == "__main__":
    sys.exit(main())
