#!/usr/bin/env python3
"""Writes Get-run JSON bodies (about 1 KB each) into DIR/runs/: done-N are ended (COMPLETED, every
tenth FAILED), live-N are still going (PROCESSING / QUEUED). usage: gen_runs.py DIR [COUNT]"""
import json, os, sys

out = os.path.join(sys.argv[1], "runs")
count = int(sys.argv[2]) if len(sys.argv) > 2 else 10000
os.makedirs(out, exist_ok=True)


def run(rid, status, steps_done):
    ended = status in ("COMPLETED", "FAILED")
    return {
        "id": rid, "status": status,
        "createdAt": "2024-01-15T09:30:00Z", "updatedAt": "2024-01-15T09:31:00Z",
        "startedAt": "2024-01-15T09:30:01Z", "completedAt": "2024-01-15T09:31:00Z" if ended else None,
        "error": {"code": "UNSUPPORTED_DOCUMENT", "message": "The document could not be processed."} if status == "FAILED" else None,
        "workflow": {"id": "wf_invoice_extract", "name": "Invoice extraction"},
        "progress": {"stepsCompleted": steps_done, "stepsTotal": 3}, "durationMs": 59000, "computedDurationMs": 58800,
        "steps": [{"id": f"step_{i}", "name": f"Step {i}", "type": "extraction",
                   "status": "COMPLETED" if i < steps_done else "QUEUED", "message": "ok",
                   "output": {"fields": {"total": 1234.5, "currency": "EUR", "vendor": "ACME GmbH"}} if i < steps_done else None,
                   "nestedRuns": {"count": 0, "data": []}} for i in range(3)],
    }


for i in range(count):
    for rid, status, steps in ((f"done-{i}", "FAILED" if i % 10 == 9 else "COMPLETED", 3),
                               (f"live-{i}", "PROCESSING" if i % 2 else "QUEUED", 1)):
        with open(os.path.join(out, rid + ".json"), "w") as f:
            json.dump(run(rid, status, steps), f)
