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


def assert_metrics_close(got: dict, want: dict, rel=1e-5, layers: int = 6):
    """Two runs' records of one step ({layer: record}, layers 0..layers-1; 6: the llama3 debugmodel the torchtitan
    tests train) agree: the same token counts, SE, PR and EEE per tap and JS within ``rel``."""
    import pytest

    assert sorted(got) == sorted(want) == list(range(layers))
    for layer in want:
        for tap in ("pre", "post"):
            g, w = got[layer][tap], want[layer][tap]
            assert g["tokens"] == w["tokens"], (layer, tap)
            for metric in ("spectral_entropy", "participation_ratio", "eee"):
                assert g[metric] == pytest.approx(w[metric], rel=rel), (layer, tap, metric)
        assert got[layer]["js"] == pytest.approx(want[layer]["js"], rel=rel, abs=1e-9), layer
