"""Ctrl-C while the cohort driver starts its workers (h2g.core.interrupts).

Each case runs in a fresh interpreter: it sends itself SIGINT, which must not reach the
pytest process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_a_ctrl_c_while_workers_start_is_acted_on_after_not_lost():
    proc = run("""
        import os, signal
        from h2g.core.interrupts import interrupts_deferred, interrupts_ignored
        steps = []
        try:
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # bytecodes after the signal: a handler would have run by now
                    pass
                steps.append("block finished")
            steps.append("after the block")
        except KeyboardInterrupt:
            steps.append("KeyboardInterrupt")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, signal.getsignal(signal.SIGINT)
        assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
        # the block it replaced: the kernel drops a signal whose action is SIG_IGN
        with interrupts_ignored():
            os.kill(os.getpid(), signal.SIGINT)
        steps.append("ignored one lost")
        print(steps)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['block finished', 'KeyboardInterrupt', 'ignored one lost']"


def test_no_ctrl_c_leaves_the_handler_and_mask_as_they_were():
    proc = run("""
        import signal
        from h2g.core.interrupts import interrupts_deferred
        mine = lambda s, f: None
        signal.signal(signal.SIGINT, mine)
        with interrupts_deferred():
            assert signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set())
        assert signal.getsignal(signal.SIGINT) is mine
        assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_a_process_started_inside_starts_with_ctrl_c_blocked():
    # SIGINT is signal 2: bit 1 of /proc/PID/status's SigBlk (hex); a Ctrl-C to the group
    # then waits in the new worker until its initializer ignores it
    proc = run("""
        import subprocess, sys
        from h2g.core.interrupts import interrupts_deferred
        child = [sys.executable, "-c", "import sys; print([l.split()[1] for l in open('/proc/self/status') "
                 "if l.startswith('SigBlk')][0])"]
        with interrupts_deferred():
            inside = subprocess.run(child, capture_output=True, text=True).stdout.strip()
        outside = subprocess.run(child, capture_output=True, text=True).stdout.strip()
        print(int(inside, 16) & 2, int(outside, 16) & 2)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "0"]


def test_the_cli_exits_130_when_the_ctrl_c_came_while_workers_started():
    # run_cli's handler is the one the deferred Ctrl-C goes to: exit 130, "interrupted"
    proc = run("""
        import os, signal, sys, time
        from h2g.core.cli import run_cli
        from h2g.core.interrupts import interrupts_deferred
        def main(argv):
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
            time.sleep(30)  # never reached
            return 0
        sys.exit(run_cli(main, []))
    """)
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert proc.stderr.strip().splitlines()[-1] == "interrupted"
