"""carseg/atomic.py beyond its everyday use (covered wherever files are written): temporaries that killed writers left."""
import os
import subprocess
import sys

from carseg import atomic


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True,
                          text=True)  # a process that has exited: its pid runs nothing now
    dead_pid = int(dead.stdout)
    (tmp_path / f".sub.csv.{dead_pid}.tmp").write_text("partial rows of a killed run")
    (tmp_path / f".sub.csv.{os.getpid()}.tmp").write_text("this process's own")
    (tmp_path / ".other.csv.1.tmp").write_text("another file's")
    assert atomic.remove_stale_temporaries(tmp_path / "sub.csv") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.csv.1.tmp", f".sub.csv.{os.getpid()}.tmp"]


def test_a_name_with_glob_characters_matches_only_its_own_temporaries(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True,
                          text=True)
    (tmp_path / f".sub[1].csv.{dead.stdout.strip()}.tmp").write_text("partial")
    (tmp_path / f".sub1.csv.{dead.stdout.strip()}.tmp").write_text("another file's: [1] is not a character class")
    assert atomic.remove_stale_temporaries(tmp_path / "sub[1].csv") == 1
    assert [p.name for p in tmp_path.iterdir()] == [f".sub1.csv.{dead.stdout.strip()}.tmp"]


def test_a_temporary_names_its_target():
    assert atomic.temporary_target("/runs/.sub.csv.gz.rank1-of-2.4242.tmp").as_posix() == "/runs/sub.csv.gz.rank1-of-2"
