"""The Python microbenchmarks run end to end on toy shapes (so that they do not rot between the runs that fill
benchmarks/results/)."""
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_call_overhead_tiny():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/microbench/call_overhead.py"), "--tiny"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [line for line in out.splitlines() if re.match(r"K=\d+ (fp32|int8) (warm|cold)", line)]
    assert len(rows) == 8, out
    for line in rows:
        times = [float(v) for v in line.split()[3:]]
        assert len(times) == 5 and all(t > 0 for t in times), line


def test_ab_builds_tiny_compares_two_checkouts():
    # this checkout against itself: every case timed on both sides in alternating workers, ratios around 1
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/microbench/ab_builds.py"), "--base", str(ROOT),
                          "--tiny", "--rounds", "2", "--reps", "1", "--out", "",
                          "--cases", "shortlist:fp32:2:1,shortlist:int8:3:1,cascade:bf16:1:1"],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| shortlist:") or line.startswith("| cascade:")]
    assert [r.split("|")[1].strip() for r in rows] == ["shortlist:fp32:2:1", "shortlist:int8:3:1", "cascade:bf16:1:1"]
    for line in rows:
        base, head, ratio, lo, hi = (float(v) for v in line.split("|")[2:7])
        assert base > 0 and head > 0 and lo <= ratio <= hi, line
    assert len(re.findall(r"^# round \d (base|head):", out, flags=re.M)) == 4, out


def test_ab_builds_rejects_bad_cases_and_missing_base():
    script = str(ROOT / "benchmarks/microbench/ab_builds.py")
    for args, message in ((["--cases", "shortlist:fp64:1:1"], "dtype in"), (["--cases", "topk:fp32:1:1"], "op in"),
                          (["--cases", "shortlist:fp32:x:1"], "must be integers"), ([], "--base is required"),
                          (["--base", "/nonexistent"], "no cascadexml_fast package")):
        res = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr)


@pytest.mark.parametrize("source", sorted(p.name for p in (ROOT / "benchmarks/microbench").glob("*.cpp")))
def test_standalone_cpp_microbenchmarks_compile(source, tmp_path):
    """The C++ loops are built by hand with the command in their header comment: compile each that way."""
    if shutil.which("g++") is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs g++ on x86-64")
    path = ROOT / "benchmarks/microbench" / source
    command = re.search(r"g\+\+ ([^&\n]*?) -o \S+ (benchmarks/microbench/\S+\.cpp)", path.read_text())
    assert command and command.group(2) == f"benchmarks/microbench/{source}", "no build command in the header"
    res = subprocess.run(["g++", *command.group(1).split(), "-o", str(tmp_path / "a.out"), str(path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
