"""The Python microbenchmarks run end to end on toy shapes (so that they do not rot between the runs that fill
benchmarks/results/)."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_call_overhead_tiny():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/microbench/call_overhead.py"), "--tiny"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [line for line in out.splitlines() if re.match(r"K=\d+ (fp32|int8) (warm|cold)", line)]
    assert len(rows) == 8, out
    for line in rows:
        times = [float(v) for v in line.split()[3:]]
        assert len(times) == 4 and all(t > 0 for t in times), line
