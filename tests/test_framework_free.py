"""NerveLoop in a nanoGPT-style training loop, on a GPT-2 model written here (causal attention; MLP c_fc, GELU,
c_proj). The metrics must equal a float64 numpy computation on activations the test captures with its own
hooks, and training must be bitwise the same with the monitor on and off.
"""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import hook_count, read_jsonl
from nerve_plugin import NerveLoop
from reference import js, of_rows

VOCAB, BLOCK_SIZE, N_EMBD, N_HEAD, N_LAYER = 64, 16, 16, 4, 2
BATCH, GRAD_ACCUM, STEPS, LOG_FREQ = 4, 2, 4, 2
TOKENS = GRAD_ACCUM * BATCH * BLOCK_SIZE  # per step: 128 rows for a 64-wide hidden layer


class CausalSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD)
        self.c_proj = nn.Linear(N_EMBD, N_EMBD)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, N_HEAD, c // N_HEAD).transpose(1, 2) for z in self.c_attn(x).split(N_EMBD, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = nn.Linear(N_EMBD, 4 * N_EMBD)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * N_EMBD, N_EMBD)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(N_EMBD), CausalSelfAttention()
        self.ln_2, self.mlp = nn.LayerNorm(N_EMBD), MLP()

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(VOCAB, N_EMBD),
                wpe=nn.Embedding(BLOCK_SIZE, N_EMBD),
                h=nn.ModuleList(Block() for _ in range(N_LAYER)),
                ln_f=nn.LayerNorm(N_EMBD),
            )
        )
        self.lm_head = nn.Linear(N_EMBD, VOCAB, bias=False)

    def forward(self, idx, targets):
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1]))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return F.cross_entropy(logits.view(-1, VOCAB), targets.reshape(-1))


def get_batch(step: int, micro: int):
    g = torch.Generator().manual_seed(1000 * step + micro)
    data = torch.randint(0, VOCAB, (BATCH, BLOCK_SIZE + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def is_log_step(step: int) -> bool:
    return step == 1 or step % LOG_FREQ == 0


def train(tmp_path=None, monitored=False):
    """The README's loop. Returns per-step losses and gradients, the final parameters, the records, and the
    activations the test's own hooks saw in the training forwards of logging steps."""
    torch.manual_seed(0)
    model = GPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    nerve = (
        NerveLoop(
            model,
            blocks="transformer.h",
            up="mlp.c_fc",
            down="mlp.c_proj",
            log_freq=LOG_FREQ,
            jsonl=str(tmp_path / "nerve.jsonl"),
        )
        if monitored
        else None
    )

    seen = {}  # (step, layer, tap) -> [float64 rows]
    capture = {"step": None}

    def keep(layer, tap, activation):
        if capture["step"] is not None:
            rows = activation.detach().reshape(-1, activation.shape[-1]).double().numpy()
            seen.setdefault((capture["step"], layer, tap), []).append(rows)

    if monitored:
        for i, block in enumerate(model.transformer.h):
            block.mlp.c_fc.register_forward_hook(lambda m, a, out, i=i: keep(i, "pre", out))
            block.mlp.c_proj.register_forward_pre_hook(lambda m, a, i=i: keep(i, "post", a[0]))

    losses, grads, records = [], [], {}
    for step in range(1, STEPS + 1):
        if nerve:
            nerve.begin_step(step)
        capture["step"] = step if is_log_step(step) else None
        total = 0.0
        for micro in range(GRAD_ACCUM):
            x, y = get_batch(step, micro)
            loss = model(x, y) / GRAD_ACCUM
            loss.backward()
            total += loss.item()
        capture["step"] = None
        # An evaluation forward inside the step: paused, it must not reach the statistics.
        if nerve:
            nerve.pause()
        with torch.no_grad():
            model(*get_batch(step, 99))
        losses.append(total)
        grads.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if nerve:
            records[step] = nerve.end_step(step)
    if nerve:
        assert nerve.close() == []  # nothing pending: solves run inside end_step
        assert hook_count(model) == 2 * N_LAYER  # only the test's own
    return losses, grads, [p.detach().clone() for p in model.parameters()], records, seen


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop")
    return tmp, train(tmp, monitored=True), train(monitored=False)


def test_metrics_equal_a_float64_computation_on_the_captured_activations(runs):
    tmp, (_, _, _, records, seen), _ = runs
    log_steps = [s for s in range(1, STEPS + 1) if is_log_step(s)]
    assert [s for s, r in records.items() if r is not None] == log_steps == [1, 2, 4]
    for step in log_steps:
        assert [(r.step, r.layer) for r in records[step]] == [(step, layer) for layer in range(N_LAYER)]
        for record in records[step]:
            spectra = {}
            for tap in ("pre", "post"):
                rows = np.concatenate(seen[(step, record.layer, tap)])
                assert rows.shape == (TOKENS, 4 * N_EMBD)
                ref = of_rows(rows)  # float64 numpy (tests/reference.py)
                eigs, p, se, pr, eee = (
                    ref[k] for k in ("eigenvalues", "p", "spectral_entropy", "participation_ratio", "eee")
                )
                got = getattr(record, tap)
                assert got.tokens == TOKENS
                np.testing.assert_allclose(got.eigenvalues, eigs, rtol=1e-9, atol=1e-12 * eigs[0])
                assert got.spectral_entropy == pytest.approx(se, rel=1e-10)
                assert got.participation_ratio == pytest.approx(pr, rel=1e-10)
                assert got.eee == pytest.approx(eee, rel=1e-10)
                spectra[tap] = p
            assert record.js == pytest.approx(js(spectra["pre"], spectra["post"]), rel=1e-8)
            assert record.js > 1e-3  # GELU reshapes the spectrum: a real divergence, not a trivial 0

    written = read_jsonl(tmp / "nerve.jsonl")
    assert written == [json.loads(json.dumps(r.to_json())) for s in log_steps for r in records[s]]


def test_training_is_bitwise_the_same_with_the_monitor_on_and_off(runs):
    _, (losses_on, grads_on, params_on, _, _), (losses_off, grads_off, params_off, _, _) = runs
    assert losses_on == losses_off
    for step_on, step_off in zip(grads_on, grads_off, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(step_on, step_off, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(params_on, params_off, strict=True))


@pytest.mark.parametrize(
    "paths, message",
    [
        (
            dict(blocks="transformer.blocks", up="mlp.c_fc", down="mlp.c_proj"),
            "no module at blocks path 'transformer.blocks'",
        ),
        (
            dict(blocks="transformer.h", up="mlp.fc", down="mlp.c_proj"),
            "no block under 'transformer.h' has both 'mlp.fc'",
        ),
    ],
)
def test_a_wrong_module_path_is_named_in_the_error(paths, message):
    with pytest.raises(ValueError, match=message):
        NerveLoop(GPT(), **paths)


class Deferred:
    """The monitor as it behaves when solves finish after their step: each logging step's records come back
    from the next logging step's end_step, the last ones from flush."""

    def __init__(self, monitor):
        self.monitor, self.held = monitor, []

    def __getattr__(self, name):
        return getattr(self.monitor, name)

    def end_step(self, step):
        ready = self.monitor.end_step(step)
        if ready is None:
            return None
        out, self.held = self.held, ready
        return out

    def flush(self):
        out, self.held = self.held, []
        return out


def test_records_of_an_earlier_step_are_written_at_their_own_step(tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    torch.manual_seed(0)
    model = GPT()
    nerve = NerveLoop(
        model,
        blocks="transformer.h",
        up="mlp.c_fc",
        down="mlp.c_proj",
        log_freq=LOG_FREQ,
        jsonl=str(tmp_path / "nerve.jsonl"),
        tensorboard=str(tmp_path / "tb"),
    )
    nerve.monitor = Deferred(nerve.monitor)
    returned = {}
    for step in range(1, STEPS + 1):
        nerve.begin_step(step)
        model(*get_batch(step, 0)).backward()
        returned[step] = nerve.end_step(step)
    returned["close"] = nerve.close()
    steps = {k: None if v is None else [r.step for r in v] for k, v in returned.items()}
    assert steps == {1: [], 2: [1, 1], 3: None, 4: [2, 2], "close": [4, 4]}

    records = [r for k in (2, 4, "close") for r in returned[k]]
    written = read_jsonl(tmp_path / "nerve.jsonl")
    assert written == [json.loads(json.dumps(r.to_json())) for r in records]
    (events,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    # EventFileLoader hands scalars back as float32 tensors
    js = {
        (e.step, v.tag): v.tensor.float_val[0]
        for e in EventFileLoader(str(events)).Load()
        for v in e.summary.value
        if v.tag.startswith("nerve/js/")
    }
    assert js == pytest.approx({(r.step, f"nerve/js/layer_{r.layer:03d}"): r.js for r in records}, rel=1e-6)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"layers": [99]}, "[nerve] layers = [99] is not allowed: expected indices of the model's"),
        ({"log_freq": float("nan")}, "[nerve] log_freq = nan is not allowed: expected an integer >= 1"),
        ({"log_freq": 2.5}, "[nerve] log_freq = 2.5 is not allowed: expected an integer >= 1"),
        ({"log_freq": True}, "[nerve] log_freq = True is not allowed: expected an integer >= 1"),
        ({"max_overhead": 5.0}, "[nerve] max_overhead = 5.0 is not allowed: expected a fraction in [0, 1)"),
        ({"taps": ("pre", "middle")}, "[nerve] taps = ('pre', 'middle') is not allowed: expected distinct values"),
        ({"max_layers_per_step": -1}, "[nerve] max_layers_per_step = -1 is not allowed"),
    ],
)
def test_nerve_loop_refuses_what_the_toml_refuses(options, message):
    # these used to pass: layers=[99] measured nothing, log_freq=nan logged step 1 only, 2.5 logged 1 and 5
    kwargs = {"blocks": "transformer.h", "up": "mlp.c_fc", "down": "mlp.c_proj", "log_freq": 10, **options}
    with pytest.raises(ValueError) as error:
        NerveLoop(GPT(), **kwargs)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("where", ["a folder", "a full disk", "a folder gone"])
def test_a_failing_writer_is_reported_once_and_training_goes_on(tmp_path, caplog, monkeypatch, where):
    # these stopped training at the first logging step, where NerVE off would have trained on. The output was
    # fine at start-up (NerveLoop checks it there: tests/test_outputs.py) and fails during the run.
    path = tmp_path / "nerve" / "metrics.jsonl"
    torch.manual_seed(0)
    model = GPT()
    nerve = NerveLoop(model, blocks="transformer.h", up="mlp.c_fc", down="mlp.c_proj", log_freq=2, jsonl=str(path))
    if where == "a folder":
        path.mkdir()
    elif where == "a full disk":
        real_write = os.write

        def full_disk_write(fd, data):
            # the JSONL takes half of what is written to it, then the disk is full
            if os.path.realpath(f"/proc/self/fd/{fd}") == str(path) and os.fstat(fd).st_size > 0:
                real_write(fd, bytes(data[: len(data) // 2]))
                raise OSError(28, "No space left on device")
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", full_disk_write)
    else:
        os.rename(path.parent, tmp_path / "moved")
        path.parent.write_text("")  # a file where the folder was
    logged = []
    with caplog.at_level("ERROR", logger="nerve_plugin.writers"):
        for step in range(1, 6):
            nerve.begin_step(step)
            x, y = get_batch(step, 0)
            model(x, y).backward()
            records = nerve.end_step(step)
            if records:
                logged.append(step)
        nerve.close()
    if where == "a full disk":  # step 1 went in; step 2's half line was cut off again
        assert [r["step"] for r in read_jsonl(path)] == [1] * N_LAYER
    assert logged == [1, 2, 4]  # the monitor kept measuring; only the writing stopped
    failures = [r for r in caplog.records if "nerve stops writing there" in r.getMessage()]
    assert len(failures) == 1 and str(path) in failures[0].getMessage()
