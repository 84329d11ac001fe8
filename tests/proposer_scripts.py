"""Proposer programs written for the tests: each runs in the sandbox image as `python3 -c SCRIPT`,
on a writable copy of the parent workspace (tests/test_api.py's TRAIN), with the context files in
$RATCHET_CONTEXT_DIR, and reports what it saw on stdout."""

from __future__ import annotations

# Lowers V by a factor drawn from the proposal's number (some draws raise it): the loop improves
# only by keeping the good draws. Shows which context files it got and what it read there.
IMPROVER = r"""
import json, os, random, re
ctx = os.environ["RATCHET_CONTEXT_DIR"]
n = int(os.environ["RATCHET_PROPOSAL_NUMBER"])
print("context:", " ".join(sorted(os.listdir(ctx))), flush=True)
loop = json.load(open(os.path.join(ctx, "loop.json")))
recent = json.load(open(os.path.join(ctx, "recent.json")))
print("best:", loop["best_metric"], "recent:", len(recent), "ledger rows:",
      len(open(os.path.join(ctx, "results.tsv")).read().splitlines()) - 1)
text = open("train.py").read()
v = float(re.search(r"^V = (.*)$", text, re.M).group(1))
factor = random.Random(n).choice([0.5, 0.7, 0.8, 0.9, 1.1, 1.3])
new = round(v * factor, 6)
open("train.py", "w").write(re.sub(r"^V = .*$", f"V = {new}", text, flags=re.M))
try:  # a workspace holding a harness file has a read-only top directory: nothing new there
    open("notes.txt", "w").write("x")
except OSError as e:
    print("new top-level file:", type(e).__name__)
with open(os.path.join(os.environ["RATCHET_OUTPUT_DIR"], "description.txt"), "w") as f:
    f.write(f"V {v} -> {new} (x{factor})\nsecond line is ignored\n")
"""

# One misbehaviour per proposal number, then good edits: 1 writes the harness (refused by the
# file system) and drops a file outside `editable`; 2 hangs; 3 exits non-zero; 4 changes nothing.
MISBEHAVING = r"""
import os, re, sys, time
n = int(os.environ["RATCHET_PROPOSAL_NUMBER"])
if n == 1:
    try:
        open("prepare.py", "a").write("SECRET = 2\n")
    except OSError as e:
        print("harness write:", type(e).__name__)
    open("lib/notes.py", "w").write("# not editable\n")
elif n == 2:
    print("hanging", flush=True)
    while True:
        time.sleep(1)
elif n == 3:
    print("giving up", flush=True)
    sys.exit(3)
elif n == 4:
    pass
else:
    text = open("train.py").read()
    open("train.py", "w").write(re.sub(r"^V = .*$", f"V = {1.0 - n / 100}", text, flags=re.M))
    out = os.path.join(os.environ["RATCHET_OUTPUT_DIR"], "description.txt")
    open(out, "w").write(f"<script>alert({n})</script> V -> {1.0 - n / 100}\n")
"""

# Sleeps (so a test can kill the service meanwhile), then an edit that depends only on its number.
SLOW = r"""
import os, re, time
n = int(os.environ["RATCHET_PROPOSAL_NUMBER"])
print("thinking", n, flush=True)
time.sleep(float(os.environ.get("THINK_S", "2")))
text = open("train.py").read()
open("train.py", "w").write(re.sub(r"^V = .*$", f"V = {1.0 - n / 10}", text, flags=re.M))
open(os.path.join(os.environ["RATCHET_OUTPUT_DIR"], "description.txt"), "w").write(f"edit {n}\n")
"""

# Appended to egress_net.PROBE: after probing the network it was given, makes a candidate that
# probes its own (it has none) and reports what it reached as a metric.
NETWORKED_TAIL = r"""
import re
text = open("train.py").read()
probe = (
    "import socket\n"
    "def reach(h, p):\n"
    "    s = socket.socket(); s.settimeout(2)\n"
    "    try:\n"
    "        s.connect((h, p)); return 1\n"
    "    except OSError:\n"
    "        return 0\n"
    "    finally:\n"
    "        s.close()\n"
    f"REACH = reach('127.0.0.1', 3128) + reach('{server_ip}', 8000)\n"
)
text = probe + text.replace("print('num_steps: 7')", "print('num_steps: 7')\nprint(f'reach: {REACH}')")
open("train.py", "w").write(re.sub(r"^V = .*$", "V = 0.5", text, flags=re.M))
"""
