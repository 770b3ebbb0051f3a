"""Docs, configs, benchmarks and tests speak of the project: what a figure is, on which hardware, with which command;
never how the project was developed (work sessions, who ran what beside whom) nor paths outside the repository."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# written so that this file does not match itself
HISTORY = re.compile(r"session\s[0-9]|agents\sran|lent\sto\ssession|\.\./shared", re.IGNORECASE)


def test_no_development_history_in_docs_configs_benchmarks_tests():
    tracked = subprocess.run(["git", "ls-files", "README.md", "docs", "configs", "benchmarks", "tests"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert len(tracked) > 50, tracked
    hits = []
    for rel in tracked:
        data = (ROOT / rel).read_bytes() if (ROOT / rel).is_file() else b"\0"
        if b"\0" in data:  # binary (plots)
            continue
        for n, line in enumerate(data.decode(errors="replace").splitlines(), 1):
            if HISTORY.search(line):
                hits.append(f"{rel}:{n}: {line.strip()[:120]}")
    assert not hits, "\n".join(hits)
