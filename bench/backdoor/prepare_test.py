#!/usr/bin/env python3
"""prepare.py's trigger spans are what the token view is judged by (a ctest; standard library only).

For every setting the spans must be UTF-8 byte offsets (as rapidin's token spans are) that hold exactly the
trigger; service_queries.top_in_trigger must count a token on either byte of the two-byte "§" and no token
outside. Skips (77) without the shared data.
"""
import json
import os
import subprocess
import sys
import tempfile

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
from service_queries import top_in_trigger  # noqa: E402

root = os.path.normpath(os.path.join(here, "..", ".."))
data = os.environ.get("RAPIDIN_SHARED_DATA", os.path.join(root, "..", "shared", "data"))
if not os.path.exists(os.path.join(data, "instructions", "rapidin_howdy_test_data_100.jsonl")):
    print(f"prepare_test: shared data not found at {data} (set RAPIDIN_SHARED_DATA); skipped")
    sys.exit(77)
fails = []
with tempfile.TemporaryDirectory() as tmp:
    for setting, trigger in (("main", "Howdy!"), ("second", "§")):
        out = os.path.join(tmp, setting)
        subprocess.run([sys.executable, os.path.join(here, "prepare.py"), data, out, setting], check=True,
                       stdout=subprocess.DEVNULL)
        for f in ("train.jsonl", "queries.jsonl"):
            recs = [json.loads(l) for l in open(os.path.join(out, f))]
            spans = [r for r in recs if r["trigger_span"] is not None]
            if len(spans) < 20:
                fails.append(f"{setting}/{f}: only {len(spans)} records with a trigger")
            for r in spans:
                b, e = r["trigger_span"]
                held = r["instruction"].encode()[b:e].decode("utf-8", "replace")
                if held != trigger:
                    fails.append(f"{setting}/{f} {r['id']}: span {b, e} holds {held!r}, not {trigger!r}")
        # One poisoned record as the token view sees it: byte-level tokens around the trigger.
        r = next(r for r in map(json.loads, open(os.path.join(out, "train.jsonl"))) if r["trigger_span"])
        b, e = r["trigger_span"]
        inside = [{"field": "instruction", "begin": i, "end": i + 1, "score": 9.0} for i in range(b, e)]
        before = {"field": "instruction", "begin": b - 1, "end": b, "score": 9.0} if b > 0 else None
        after = {"field": "input", "begin": b, "end": e, "score": 9.0}  # same bytes, another field
        for tok in inside:
            if not top_in_trigger([tok, {"field": "output", "begin": 0, "end": 1, "score": 1.0}], [b, e]):
                fails.append(f"{setting}: a top token on byte {tok['begin']} of the trigger is not counted")
        for tok in filter(None, (before, after)):
            if top_in_trigger([tok], [b, e]):
                fails.append(f"{setting}: a top token outside the trigger ({tok}) is counted")
print("\n".join(fails) if fails else "prepare_test: spans hold the triggers; the token view's check counts them")
sys.exit(1 if fails else 0)
