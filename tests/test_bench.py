"""The benchmark command runs, its implementations agree, and its output is well formed."""

import json
import subprocess
import sys


def test_bench_json_smoke():
    out = subprocess.run(
        [sys.executable, "-m", "softmax_ce", "bench", "--shapes", "64x300,2x5x6x7", "--json",
         "--repeat", "1", "--warmup", "1", "--no-compile", "--no-memory"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    records = payload["records"]
    assert payload["machine"]["copy_gbps"] > 0
    impls = {r["impl"] for r in records if r["op"] == "cross_entropy"}
    assert {"torch eager", "softmax_ce reference"} <= impls
    for r in records:
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0
        # every implementation is checked against torch eager (the one record not checked)
        assert r["agrees"] is (None if r["impl"] == "torch eager" else True), r
    assert "timing round" in out.stderr  # progress is shown
