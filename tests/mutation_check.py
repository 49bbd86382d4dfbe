"""Mutation check (issue #14, item 3): every mutation of ``tests/mutations.py`` must make its
accuracy tests fail, and the same tests must pass unmutated (the control).

Each run is ``python -m pytest -x`` on the mutation's node ids in a fresh process with the
``mutations`` plugin. Run ``python tests/mutation_check.py [NAME ...]`` for the table
mutation → failing test → message; ``tests/test_mutations.py`` runs it under CI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutations import ENV, MUTATIONS

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Outcome:
    returncode: int       # pytest's: 0 all passed, 1 a test failed, other: could not run
    failed: str | None    # node id of the first failing test
    message: str          # its short failure message (pytest -rf), or pytest's last lines
    skipped: int          # tests skipped
    seconds: float


def run_tests(tests: list[str] | tuple[str, ...], mutation: str | None = None, timeout_s: float = 1800) -> Outcome:
    """Run ``tests`` (node ids) with ``mutation`` applied (None: unmutated), stopping at the first failure."""
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if mutation is not None:
        env[ENV] = mutation
    env["COLUMNS"] = "400"  # pytest cuts its short summary (the failure message) to the terminal width
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests"), str(ROOT), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-rfEs", "-p", "mutations", "-p", "no:cacheprovider",
             "--basetemp", str(Path(tmp) / "pt"), *tests],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    output = proc.stdout + proc.stderr
    failed = re.search(r"^(?:FAILED|ERROR) (\S+?)(?: - (.*))?$", output, re.MULTILINE)
    skipped = re.search(r"(\d+) skipped", output)
    message = (failed.group(2) or "") if failed else "\n".join(output.strip().splitlines()[-5:])
    return Outcome(proc.returncode, failed.group(1) if failed else None, message.strip(), int(skipped.group(1)) if skipped else 0,
                   time.perf_counter() - start)


def caught(name: str, outcome: Outcome) -> bool:
    """Whether one of mutation ``name``'s own tests failed (not an error of pytest itself)."""
    return outcome.returncode == 1 and outcome.failed is not None and outcome.failed.split("[")[0] in MUTATIONS[name].tests


def all_tests(names: list[str] | None = None) -> list[str]:
    """The node ids of the mutations ``names`` (all by default), each once."""
    return list(dict.fromkeys(t for name in names or MUTATIONS for t in MUTATIONS[name].tests))


def main(argv: list[str]) -> int:
    names = argv or list(MUTATIONS)
    control = run_tests(all_tests(names))
    print(f"control (unmutated, {len(all_tests(names))} tests): {'passed' if control.returncode == 0 else 'FAILED'} "
          f"in {control.seconds:.0f} s{f', {control.skipped} skipped' if control.skipped else ''}")
    if control.returncode != 0:
        print(control.failed, control.message)
        return 1
    print("\n| mutation | caught by | message | s |\n|---|---|---|---|")
    survived = 0
    for name in names:
        outcome = run_tests(MUTATIONS[name].tests, name)
        survived += not caught(name, outcome)
        test = outcome.failed if caught(name, outcome) else f"SURVIVED (pytest exit {outcome.returncode})"
        print(f"| {name} | {test} | {outcome.message[:160].replace('|', '/')} | {outcome.seconds:.0f} |", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
