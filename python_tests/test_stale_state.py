"""What a kill or a full disk leaves behind is handled on the next start (issue 26): a torn last
line of a stage's metrics.jsonl is dropped on resume, with a note on stderr (a damaged line
elsewhere is an error naming the file); temporary files of a killed atomic write (runtime's
atomic_save / atomic_write_text, the HF log-prob cache's writer) are removed by the next write
of the same file -- only our own temp-name pattern, only in that directory, only of dead
processes."""

import json
import os
import subprocess
import sys

import pytest
import torch

from remit_ext.train import runtime


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


class _Main:
    is_main = True

    def barrier(self):
        pass


def _stage(tmp_path):
    return runtime.StageRun(tmp_path, "ntp", {"stage": "ntp"}, _Main(), total_steps=10,
                            ckpt_every=5, progress=False)


def test_resume_drops_a_torn_last_metrics_line(tmp_path, capsys):
    run = _stage(tmp_path)
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)]
    (tmp_path / runtime.METRICS).write_text("\n".join(lines) + '\n{"step": 4, "lo')
    run._truncate_log(3)
    assert (tmp_path / runtime.METRICS).read_text().splitlines() == lines
    assert "dropped the torn last line" in capsys.readouterr().err


def test_resume_refuses_a_damaged_middle_line(tmp_path):
    run = _stage(tmp_path)
    (tmp_path / runtime.METRICS).write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not JSON"):
        run._truncate_log(2)


def test_atomic_writes_remove_stale_temps(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    target = tmp_path / "checkpoint.pt"
    stale = tmp_path / f".checkpoint.pt.tmp{dead}"
    live = tmp_path / f".checkpoint.pt.tmp{alive}"  # another writer still running
    other = tmp_path / f".config.json.tmp{dead}"  # another file's: the next write of it
    foreign = tmp_path / f".checkpoint.pt.tmp{dead}.bak"  # not our pattern
    for f in (stale, live, other, foreign):
        f.write_text("x")
    runtime.atomic_save({"a": torch.ones(2)}, target)
    assert target.exists() and not stale.exists()
    assert live.exists() and other.exists() and foreign.exists()
    runtime.atomic_write_text("{}", tmp_path / "config.json")
    assert not other.exists() and foreign.exists()


def test_hf_cache_writer_removes_stale_temps(tmp_path):
    cache = pytest.importorskip("remit_ext.hf.cache")
    dead, alive = _dead_pid(), os.getppid()
    target = tmp_path / "meta.json"
    stale = tmp_path / f"meta.json.{dead}.0123abcd.tmp"
    live = tmp_path / f"meta.json.{alive}.0123abcd.tmp"
    foreign = tmp_path / f"meta.json.{dead}.notours.tmp"
    for f in (stale, live, foreign):
        f.write_text("x")
    cache._write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert not stale.exists() and live.exists() and foreign.exists()
