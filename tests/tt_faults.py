"""Test-only custom import: tt_nerve's spec, plus one fault at a chosen step, set by NERVE_TEST_FAULT="what:step".

After NerVE's end of step ``step`` (its records of that step handed to the writers or queued) on the reporting
rank:
- ``kill``: a crash mid-write: half a JSON line appended to metrics.jsonl, then SIGKILL (nothing runs after it).
- ``sigterm``: the scheduler stops the job: SIGTERM to torchrun (which passes it on to every worker), then this
  worker waits, at most 60 s, to be stopped by it.
- ``jsonl_folder``: the JSONL turns into a folder (the run-time write failure; the start-up check passed).

Use with ``--experimental.custom_import tt_faults --model.name nerve_test_llama3_nerve``.
"""

import os
import signal
import time

import tt_nerve  # noqa: F401  (registers nerve_test_llama3_nerve)

from nerve_plugin.torchtitan import session

WHAT, STEP = os.environ["NERVE_TEST_FAULT"].split(":")
STEP = int(STEP)

_end_step = session.NerveSession.end_step


def end_step(self, step, metrics_processor):
    _end_step(self, step, metrics_processor)
    if step != STEP or int(os.environ.get("RANK", "0")) != self.groups.report_rank:
        return
    path = self.job.jsonl_path
    if WHAT == "kill":
        with open(path, "a") as f:
            f.write('{"step": 99, "layer": 0, "pre": {"tok')
        os.kill(os.getpid(), signal.SIGKILL)
    elif WHAT == "sigterm":
        print(f"tt_faults: SIGTERM to torchrun after step {step}", flush=True)
        os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(60)
        print("tt_faults: still running 60 s after SIGTERM", flush=True)
    elif WHAT == "jsonl_folder":
        os.remove(path)
        os.mkdir(path)
        print(f"tt_faults: {path} is now a folder", flush=True)
    else:
        raise ValueError(f"NERVE_TEST_FAULT: unknown fault {WHAT!r}")


session.NerveSession.end_step = end_step
