"""The adoption story of docs/gate.md, run as written: a team's own kernel, a baseline recorded and checked, a planted
bug (exit 1, the worst case and element named in gate.md and junit.xml), an environment mismatch (exit 2, the reports
still written). Each command of the walkthrough's block runs in a fresh directory with the exit code it states."""

import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "gate.md"


def walkthrough() -> list:
    """(command, expected exit code) of the block between the adoption markers; a heredoc stays one command."""
    text = DOC.read_text()
    block = text.split("<!-- adoption:begin -->", 1)[1].split("<!-- adoption:end -->", 1)[0]
    lines = block.split("```bash\n", 1)[1].rsplit("```", 1)[0].splitlines()
    cmds, i = [], 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("<<'EOF'"):
            body = []
            while lines[i] != "EOF":
                body.append(lines[i])
                i += 1
            i += 1
            line = "\n".join([line] + body + ["EOF"])
        m = re.search(r"\s+#\s*exit (\d+)\s*$", line)
        cmds.append((line[: m.start()] if m else line, int(m.group(1)) if m else 0))
    return cmds


def test_the_walkthrough_runs_as_written(tmp_path):
    cmds = walkthrough()
    assert [c for c, _ in cmds if "gate --impl" in c] and {e for _, e in cmds} == {0, 1, 2}
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
    }
    (tmp_path / "ci").mkdir()
    outputs = []
    for cmd, want in cmds:
        r = subprocess.run(
            ["bash", "-c", cmd.replace("python -m", f"{sys.executable} -m", 1)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        outputs.append((cmd, r))
        assert r.returncode == want, (cmd, r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    planted = next(r for c, r in outputs if "--out gate-report" in c and r.returncode == 1)
    assert "gate-report/cases/compose-fp32-" in planted.stdout  # the summary line names the dumped files where they are
    failing = next(r for c, r in outputs if c.startswith("grep -A4"))
    assert "worst case `compose-fp32-" in failing.stdout and "at element [" in failing.stdout
    assert int(next(r for c, r in outputs if c.startswith("grep -c \"worst case")).stdout) >= 1
    assert int(next(r for c, r in outputs if "another environment" in c).stdout) == 1
    assert (tmp_path / "gate-report" / "junit.xml").exists()  # written by the refused (exit 2) run too
    replayed = next(r for c, r in outputs if "replay(" in c)
    assert replayed.stdout.strip() == "True"  # the dumped worst case fails again when the team replays it
    dump = next(r.stdout.split() for c, r in outputs if c.startswith("ls gate-report/cases/"))
    assert dump and all(f.startswith("compose-fp32-") for f in dump)
    assert next(r.stdout.split() for c, r in outputs if c.startswith("ls gate-report/ ")) == [
        "gate.json",
        "gate.md",
        "junit.xml",
    ]
