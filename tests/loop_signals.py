"""A NerveLoop with overlapped solves that is stopped by a signal after step 2 (step 1 written, step 2 solved in
memory, due at step 4). Run by tests/test_outputs.py as ``python loop_signals.py JSONL MODE``:

- ``sigterm``: SIGTERM with no handler of the program's own (the default action must still stop it);
- ``sigterm_chained``: the program's own SIGTERM handler, set before NerveLoop, must still run (exits 3);
- ``sigint``: Ctrl-C: KeyboardInterrupt, caught by the program, which counts the JSONL's lines and then closes
  the loop (exits 4).
"""

import os
import signal
import sys

import torch

from nerve_plugin import NerveLoop
from toy_model import ToyModel

path, mode = sys.argv[1], sys.argv[2]
if mode == "sigint":
    # Python's own Ctrl-C handler, whatever this process inherited: a shell's background job starts with SIGINT
    # ignored, and Python then installs none
    signal.signal(signal.SIGINT, signal.default_int_handler)
if mode == "sigterm_chained":

    def own_handler(signum, frame):
        print("own handler", flush=True)
        os._exit(3)

    signal.signal(signal.SIGTERM, own_handler)

model = ToyModel(8, 12, 3)
nerve = NerveLoop(
    model, blocks="layers", up="w1", down="w2", log_freq=2, jsonl=path, solve_timing="overlap", max_overhead=0
)
try:
    for step in range(1, 7):
        nerve.begin_step(step)
        model(torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(step))).sum().backward()
        nerve.end_step(step)
        if step == 2:
            # step 2 solved in memory: the state the signal must not lose (bounded: the solves take milliseconds)
            assert nerve.monitor.ready_records(wait_s=60)
            os.kill(os.getpid(), signal.SIGINT if mode == "sigint" else signal.SIGTERM)
            print("not stopped", flush=True)
except KeyboardInterrupt:
    with open(path) as f:
        print("lines before close:", len(f.readlines()), flush=True)
    nerve.close()  # flushes every pending step: step 2 must not be written twice
    print("interrupted", flush=True)
    sys.exit(4)
