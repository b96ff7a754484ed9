"""A report set is replaced as a whole: a kill at any step of a write leaves the old set or the new one."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

import dora_verify.report as R

fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked writer")


def _plots(names_text):
    def extra(stage):
        out = []
        for name, text in names_text.items():
            (Path(stage) / name).write_text(text)
            out.append(Path(stage) / name)
        return out

    return extra


def write_old(out: Path) -> None:
    R.write_bundle({"v": 1}, out, lambda files: "old md", _plots({"a.png": "old a", "b.png": "old b"}))
    (out / "corpus").mkdir()
    (out / "corpus" / "c1.npz").write_text("corpus case")  # another writer's files (certify's corpus)
    (out / "notes.txt").write_text("notes")


def write_new(out: Path) -> list:
    return R.write_bundle({"v": 2}, out, lambda files: "new md", _plots({"a.png": "new a", "c.png": "new c"}))


def snapshot(out: Path):
    """{relative path: bytes} of every file under ``out``; None when ``out`` is missing."""
    if not out.exists():
        return None
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# os functions a write goes through; the kill test counts every call of them (and of R._exchange)
CALLS = [(os, "replace"), (os, "rename"), (os, "link"), (os, "fsync"), (os, "mkdir"), (shutil, "rmtree")]


def _killed_write(out: Path, k: int, after: bool, fallback: bool) -> bool:
    """Fork a writer of the new set that is killed (os._exit: no cleanup runs) at the k-th counted call, before
    or after it runs. True when the write finished before the k-th call."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 3
        try:
            n = [0]
            targets = CALLS + ([(R, "_exchange")] if hasattr(R, "_exchange") else [])
            for mod, name in targets:
                real = getattr(mod, name)

                def wrapped(*a, _real=real, **kw):
                    n[0] += 1
                    i = n[0]
                    if i == k and not after:
                        os._exit(0)
                    try:
                        return _real(*a, **kw)
                    finally:
                        if i == k and after:
                            os._exit(0)

                setattr(mod, name, wrapped)
            if fallback:
                R._exchange = lambda a, b: False  # a file system without an atomic exchange: two renames
            write_new(out)
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 1), f"writer failed (exit {code})"
    return code == 1


@fork
@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "two-renames"])
def test_kill_at_every_step_leaves_the_old_or_the_new_set(tmp_path, fallback):
    pristine = tmp_path / "pristine" / "rep"
    write_old(pristine)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "rep"
    old = snapshot(pristine)
    shutil.copytree(pristine, tmp_path / "expected")
    write_new(tmp_path / "expected")
    new = snapshot(tmp_path / "expected")
    assert old != new and new["report.json"] != old["report.json"] and new["b.png"] == b"old b"
    seen = set()
    for after in (False, True):
        for k in range(1, 200):
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(pristine, out)
            done = _killed_write(out, k, after, fallback)
            state = snapshot(out)
            if not (fallback and state is None):  # two renames: a kill between them leaves no folder ...
                assert state in (old, new), f"kill {'after' if after else 'before'} call {k}: a mix of sets"
            R.check_writable(out)  # ... which the next run (its first step) puts back
            state = snapshot(out)
            assert state in (old, new), f"kill {'after' if after else 'before'} call {k}: {state and sorted(state)}"
            seen.add("new" if state == new else "old")
            assert os.listdir(work) == ["rep"], f"leftovers after recovery: {os.listdir(work)}"
            if done:
                break
        else:
            pytest.fail("the write never finished")
    assert seen == {"old", "new"}
    write_new(out)  # a normal run after all this: the new set, nothing left behind
    assert snapshot(out) == new and os.listdir(work) == ["rep"]


def test_stale_staging_of_a_killed_run_is_removed_and_old_layout_is_migrated(tmp_path):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "report.json").write_text('{"v": 0}')
    (out / ".staging-abc123").mkdir()  # what an older version left inside OUT when killed
    (out / ".staging-abc123" / "x.png").write_text("half")
    dead = tmp_path / f".rep.dv-{2**22 + 12345}-zz9"  # a pid no process has
    dead.mkdir()
    (dead / "report.json").write_text("partial")
    files = write_new(out)
    assert sorted(os.listdir(tmp_path)) == ["rep"] and not out.is_symlink() and out.is_dir()
    assert sorted(os.listdir(out)) == ["a.png", "c.png", "report.json", "report.md"]
    assert json.loads((out / "report.json").read_text()) == {"v": 2} and files[-1] == out / "report.json"


def test_set_keeps_the_folders_mode_and_a_symlinked_out(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    real.chmod(0o751)
    link = tmp_path / "link"
    link.symlink_to(real)
    write_new(link)
    assert link.is_symlink() and (real / "report.json").is_file() and (real.stat().st_mode & 0o777) == 0o751
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


def test_full_disk_keeps_the_previous_set_and_raises_one_error(tmp_path, monkeypatch):
    out = tmp_path / "rep"
    write_old(out)
    before = snapshot(out)

    def enospc(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(R.ReportWriteError, match="No space left on device") as ei:
        write_new(out)
    assert isinstance(ei.value, OSError) and isinstance(ei.value, ValueError)
    with pytest.raises(R.ReportWriteError, match="No space left"):
        R.atomic_write(out / "notes.txt", lambda fh: fh.write(b"new notes"))
    assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["rep"]


def test_strict_json_round_trips_non_finite_values(tmp_path):
    """report.json is strict JSON: non-finite floats are null in place and listed under "nonfinite" by JSON
    Pointer (RFC 6901, keys with '/' and '~' escaped); load_report restores them."""
    import json
    import math

    from dora_verify.report import load_report, report_document

    rep = {"a/b": [1.0, math.inf, {"~x": -math.inf}], "n": math.nan, "ok": 2, "s": "inf"}
    doc = report_document(rep)
    assert doc["nonfinite"] == {"/a~1b/1": "inf", "/a~1b/2/~0x": "-inf", "/n": "nan"}
    assert doc["a/b"][1] is None and doc["n"] is None and doc["s"] == "inf"
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc, allow_nan=False))
    back = load_report(path)
    assert back["a/b"][1] == math.inf and back["a/b"][2]["~x"] == -math.inf and math.isnan(back["n"])
    assert back["ok"] == 2 and "nonfinite" not in back


def test_table_cells_keep_pipes_and_line_breaks_inside_their_cell():
    """A group key or an error message holding '|' or a line break must not split a Markdown table row (GitHub)."""
    from dora_verify.report import _table

    md = _table(["group", "note"], [["compose|bf16|64x48", "raised: a\nb"]])
    row = md.splitlines()[2]
    assert row == "| compose\\|bf16\\|64x48 | raised: a b |"
    assert len([c for c in row.replace("\\|", "").split("|") if c.strip()]) == 2
