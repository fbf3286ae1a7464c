"""The benchmark command runs, its implementations agree, and its output is well formed."""

import json
import subprocess
import sys


def test_bench_json_smoke():
    out = subprocess.run(
        [sys.executable, "-m", "softmax_ce", "bench", "--shapes", "64x300,2x5x6x7", "--json", "-",
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


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "softmax_ce", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_cli_help_at_every_level_and_unknown_arguments_rejected():
    top = _cli("--help")
    assert top.returncode == 0 and "usage: python -m softmax_ce" in top.stdout
    assert "bench" in top.stdout and "info" in top.stdout
    for command, option in (("bench", "--full"), ("info", "--json")):
        sub = _cli(command, "--help")
        assert sub.returncode == 0 and option in sub.stdout, sub.stdout
    for args in (("info", "--bogus"), ("bench", "--bogus"), ("frobnicate",), ()):
        bad = _cli(*args)
        assert bad.returncode == 2, (args, bad.stdout, bad.stderr)
        assert "usage:" in bad.stderr, bad.stderr


def test_info_json_matches_build_info():
    import softmax_ce

    out = _cli("info", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["cpu"] == softmax_ce.build_info()["cpu"]


def test_bench_cases_filter_json_file_and_final_line(tmp_path):
    path = tmp_path / "out.json"
    out = _cli("bench", "--quick", "--cases", "classify", "--json", str(path), "--repeat", "1",
               "--warmup", "1", "--no-compile", "--no-memory")
    assert out.returncode == 0, out.stderr
    payload = json.loads(path.read_text())
    assert {r["case"] for r in payload["records"]} == {"classify-10"}
    assert out.stdout.strip().splitlines()[-1].startswith("all ")  # every implementation agreed
    assert "[1/1" in out.stderr  # progress: case i of n
    missing = _cli("bench", "--cases", "no-such-case")
    assert missing.returncode != 0 and "matches none" in missing.stderr


def test_distributed_bench_runs_and_reports():
    """bench --distributed on tiny shapes: every row is there, times and memory are numbers."""
    from softmax_ce.bench import distributed

    result = distributed.run(64, 128, "float32", rounds=1, head=(32, 8, 64))
    assert len(result["rank_seconds"]) == 2 and all(s > 0 for s in result["rank_seconds"])
    assert result["head_single"][0] > 0
    assert [sorted(r) for r in result["head_ranks"]] == [["replicated", "sequence"]] * 2
    text = distributed.report(result)
    assert "fused linear cross-entropy (N, H, C) = (32, 8, 64)" in text
    assert text.count("input sequence:") == 2 and text.count("input replicated:") == 2


def test_token_bench_runs_and_reports():
    """bench --tokens on tiny shapes: every row is there, and the per-token outputs agree."""
    from softmax_ce.bench import token_cases

    result = token_cases.run(((64, 8, 128),), (64, 8, 128), (256, 4, 64), rounds=1)
    assert result["tokens"][0]["agrees"]
    assert set(result["tokens"][0]["seconds"]) == {"softmax_ce", "torch"}
    assert result["ignored"]["ratio"] > 0
    assert result["cap"]["capped"]["chunk_rows"] >= 1
    text = token_cases.report(result)
    assert "per-token outputs" in text and "half ignored" in text and "rows per chunk" in text
