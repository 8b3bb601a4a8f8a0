"""Small helpers the tests share: a free TCP port, a JSONL file's records, the hooks on a model."""

import json
import socket
from pathlib import Path

from torch import nn


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_jsonl(path) -> list[dict]:
    """The records of a JSONL file, one per line, in file order; a line that is not JSON (an empty one too)
    raises, as the writers must never leave one."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def hook_count(model: nn.Module) -> int:
    """Forward hooks and forward pre-hooks on ``model`` and every submodule: 0 when nothing is hooked."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
