"""atomic.py beyond its everyday use (covered wherever files are written): temporaries that killed writers left."""
import os
import subprocess
import sys

import atomic


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True,
                          text=True)  # a process that has exited: its pid runs nothing now
    dead_pid = int(dead.stdout)
    (tmp_path / f".sub.csv.{dead_pid}.tmp").write_text("partial rows of a killed run")
    (tmp_path / f".sub.csv.{os.getpid()}.tmp").write_text("this process's own")
    (tmp_path / ".other.csv.1.tmp").write_text("another file's")
    assert atomic.remove_stale_temporaries(tmp_path / "sub.csv") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.csv.1.tmp", f".sub.csv.{os.getpid()}.tmp"]
