"""Run one command-line entry point many times, each run in its own forked process, importing the tool once.

    python bench/fork_runner.py MODULE:FUNCTION [PRELOAD_MODULE ...]  < jobs

Each stdin line is a JSON job {"argv": [...], "log": PATH, "timeout": SECONDS}; the child calls
FUNCTION(argv) with stdout and stderr sent to PATH and exits with its status (a `SystemExit` code, the returned
int, or 1 on an exception, whose traceback goes to the log). The parent answers each job with one JSON line
{"returncode": int, "seconds": float}; a child past its timeout is killed by SIGALRM (return code -14).
Used by bench/compare_configs_mergekit.py so that mergekit's and hf-m2n2's imports (several seconds each) are
paid once per tool, not once per config; it imports nothing of either project itself, so any Python can run it.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
import traceback


def run_child(entry, label: str, job: dict) -> int:
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    print(f"# {label}: {job['argv']}", flush=True)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(max(1, int(job.get("timeout", 600))))
    try:
        result = entry(job["argv"])
        code = result if isinstance(result, int) else 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def main() -> None:
    module, function = sys.argv[1].split(":")
    for name in sys.argv[2:]:
        importlib.import_module(name)
    entry = getattr(importlib.import_module(module), function)
    label = f"{sys.argv[1]} from {sys.modules[module].__file__}"
    protocol = os.fdopen(os.dup(1), "w")  # answers go here; the children's fd 1 is their log
    for line in sys.stdin:
        job = json.loads(line)
        start = time.perf_counter()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os._exit(run_child(entry, label, job))
        _, status = os.waitpid(pid, 0)
        answer = {"returncode": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - start}
        protocol.write(json.dumps(answer) + "\n")
        protocol.flush()


if __name__ == "__main__":
    main()
