"""Issue 12: an STE run interrupted by SIGINT resumes from its state file to the uninterrupted result.

Usage: ``python benchmarks/measurements/ste_resume.py``. Runs STE matching (MLP pair of
seeds 0 and 1, 3,000 Fashion-MNIST training images, 3 epochs) once uninterrupted, then twice
interrupted with SIGINT (mid-epoch, and after the first epoch), each time re-running the same
call until it finishes, and compares the permutations and evaluation histories. Writes
``ste_resume.md`` beside this file.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import common as c
import numpy as np

EPOCHS, EXAMPLES = 3, 3000


def child(state: str, out: str) -> None:
    """Align once (resuming from ``state`` when it exists) and save the permutation, history and time.

    ``out + ".started"`` is created when the models and data are loaded, just before the alignment.
    """
    import combinability as cb
    from combinability.data import load_dataset

    # a shell's background job starts with SIGINT ignored, which Python keeps: restore Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)
    c.single_thread()
    a, b = c.mlp(0), c.mlp(1)
    data = load_dataset(c.DATA, "train").subset(EXAMPLES, seed=0)
    Path(out + ".started").touch()
    t0 = time.perf_counter()
    pair = cb.ModelPair(a, b).align("ste", data=data, epochs=EPOCHS, seed=0,
                                    state=None if state == "-" else state)
    perm = pair.permutation
    np.savez(out, history=np.asarray(perm.history), seconds=time.perf_counter() - t0,
             **{f"perm/{k}": np.asarray(v) for k, v in perm.items()})


def _run(state: Path | str, out: Path, interrupt_after: float | None = None) -> tuple[int, str]:
    """Run the child; with ``interrupt_after``, send SIGINT that many seconds into its alignment."""
    cmd = [sys.executable, __file__, "child", str(state), str(out)]
    started = Path(str(out) + ".started")
    started.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if interrupt_after is not None:
        while not started.exists() and proc.poll() is None:
            time.sleep(0.05)
        try:
            proc.wait(timeout=interrupt_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    if proc.returncode not in (0, -signal.SIGINT, 130, 1) or (proc.returncode == 1 and "KeyboardInterrupt" not in err):
        raise RuntimeError(f"child failed ({proc.returncode}):\n{err}")
    return proc.returncode, "KeyboardInterrupt" if "KeyboardInterrupt" in err else ""


def _same(x: Path, y: Path) -> tuple[bool, str]:
    a, b = np.load(x), np.load(y)
    if sorted(a.files) != sorted(b.files):
        return False, f"different keys {a.files} vs {b.files}"
    diffs = [k for k in a.files if k != "seconds" and not np.array_equal(a[k], b[k])]
    return not diffs, ("identical" if not diffs else f"differ in {diffs}") + f"; history {np.round(a['history'], 5)}"


def main() -> None:
    work = c.WORK / "ste_resume"
    work.mkdir(parents=True, exist_ok=True)
    for f in work.glob("*"):
        f.unlink()
    c.mlp(0), c.mlp(1)  # trained before any timing
    rc, _ = _run("-", work / "full.npz")
    full_time = float(np.load(work / "full.npz")["seconds"])
    c.log(f"uninterrupted: rc {rc}, alignment {full_time:.1f} s")
    rows = [["uninterrupted", "-", f"{full_time:.1f}", "-", "reference"]]
    for frac in (0.2, 0.55):
        state, out = work / f"state_{frac}.npz", work / f"resumed_{frac}.npz"
        rc1, what = _run(state, out, interrupt_after=frac * full_time)
        saved = state.exists()
        position = tuple(int(p) for p in np.load(state)["position"]) if saved else None
        rc2, _ = _run(state, out)
        t2 = float(np.load(out)["seconds"]) if out.exists() else float("nan")
        same, detail = _same(work / "full.npz", out) if out.exists() else (False, "no result")
        c.log(f"SIGINT at {frac:.0%}: rc {rc1} {what}, state saved {saved} at (epoch, step) {position}; "
              f"rerun rc {rc2}, {t2:.1f} s: {detail}")
        rows.append([f"SIGINT {frac * full_time:.1f} s into the alignment", f"rc {rc1} ({what or 'no interrupt'}), "
                     f"state at (epoch, step) {position}", f"{t2:.1f}", f"rc {rc2}",
                     "**same permutation and history**" if same else f"DIFFERENT: {detail}"])
    c.write_table("ste_resume.md",
                  f"STE, MLP seeds 0/1 (width {c.MLP_WIDTH}), {EXAMPLES} training images, {EPOCHS} epochs, seed 0.\n\n"
                  + c.markdown(["run", "interrupted", "alignment time (s)", "rerun", "against the uninterrupted run"],
                               rows))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
