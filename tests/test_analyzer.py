"""Offline analysis (nerve_plugin.analyze): layout detection on tiny HuggingFace models of every supported family
(random weights, built here from their config classes), metrics against a float64 numpy computation on
activations captured by this file's own hooks, padding, custom layouts, and nerve-analyze end to end on a saved
HF model and on a torchtitan DCP checkpoint."""

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nerve_plugin.analyze import ARCHITECTURES, ArchitectureError, NerVEAnalyzer
from reference import js as reference_js
from reference import of_rows

REL = 1e-8
VOCAB, HIDDEN, FFN, LAYERS = 64, 32, 64, 2
TEXT = (
    "the quick brown fox jumps over the lazy dog while a small model reads every word of this text "
    "and the analyzer measures how its feed forward layers spread the tokens over their hidden space "
) * 6


# -- an independent reference: numpy float64 (tests/reference.py) on activations captured here -------------


def capture_reference(run, modules: dict, batches) -> dict:
    """{(layer, tap): reference metrics}: hooks of our own on the expected modules (pre: output, post: input);
    ``run(ids, mask)`` runs one batch; rows where the mask is 0 are dropped."""
    rows = {key: [] for key in modules}
    keep = {}

    def save(key, activation):
        flat = activation.detach().to(torch.float64).reshape(-1, activation.shape[-1])
        rows[key].append(flat[keep["mask"].reshape(-1).bool()].numpy())

    handles = []
    for key, module in modules.items():
        if key[1] == "pre":
            handles.append(module.register_forward_hook(lambda m, a, out, key=key: save(key, out)))
        else:
            handles.append(module.register_forward_pre_hook(lambda m, a, key=key: save(key, a[0])))
    try:
        with torch.no_grad():
            for ids, mask in batches:
                keep["mask"] = mask
                run(ids, mask)
    finally:
        for h in handles:
            h.remove()
    return {key: of_rows(np.concatenate(chunks)) for key, chunks in rows.items()}


def assert_matches(results, reference: dict) -> None:
    assert [r.layer for r in results.layers] == sorted({layer for layer, _ in reference})
    for r in results.layers:
        for tap in ("pre", "post"):
            ref, got = reference[(r.layer, tap)], getattr(r, tap)
            assert got.tokens == ref["tokens"]
            for metric in ("spectral_entropy", "participation_ratio", "eee"):
                assert math.isclose(getattr(got, metric), ref[metric], rel_tol=REL, abs_tol=1e-13), (
                    r.layer,
                    tap,
                    metric,
                    getattr(got, metric),
                    ref[metric],
                )
        js = reference_js(reference[(r.layer, "pre")]["p"], reference[(r.layer, "post")]["p"])
        assert math.isclose(r.js, js, rel_tol=REL, abs_tol=1e-13), (r.layer, r.js, js)


def batches_of(ids, mask, batch_size):
    return [(ids[i : i + batch_size], mask[i : i + batch_size]) for i in range(0, ids.shape[0], batch_size)]


def padded_inputs(seed=0, n=6, length=24):
    """Token ids with ragged right padding (attention_mask 0), over 100 real tokens: more than FFN = 64."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    for row, kept in enumerate([24, 17, 24, 9, 20, 13]):
        mask[row, kept:] = 0
        ids[row, kept:] = 0
    return ids, mask


# -- tiny HuggingFace models, one per supported layout ---------------------------------------------------------

SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _configs(T):
    attn = dict(
        num_hidden_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=2,
        intermediate_size=FFN,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        **SPECIAL,
    )
    return {
        "gpt2": (
            T.GPT2LMHeadModel,
            T.GPT2Config(
                n_layer=LAYERS, n_embd=HIDDEN, n_head=2, n_inner=FFN, vocab_size=VOCAB, n_positions=64, **SPECIAL
            ),
        ),
        "gpt_neox": (T.GPTNeoXForCausalLM, T.GPTNeoXConfig(**attn)),
        "gptj": (
            T.GPTJForCausalLM,
            T.GPTJConfig(
                n_layer=LAYERS,
                n_embd=HIDDEN,
                n_head=2,
                n_inner=FFN,
                rotary_dim=8,
                vocab_size=VOCAB,
                n_positions=64,
                **SPECIAL,
            ),
        ),
        "llama": (T.LlamaForCausalLM, T.LlamaConfig(**attn)),
        "mistral": (T.MistralForCausalLM, T.MistralConfig(num_key_value_heads=1, **attn)),
        "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config(num_key_value_heads=1, **attn)),
        "gemma": (T.GemmaForCausalLM, T.GemmaConfig(num_key_value_heads=1, head_dim=16, **attn)),
        "phi": (T.PhiForCausalLM, T.PhiConfig(**attn)),
        "bert": (T.BertForMaskedLM, T.BertConfig(**attn)),
        "roberta": (T.RobertaForMaskedLM, T.RobertaConfig(**{**attn, "max_position_embeddings": 72})),
    }


# Where each family's taps must be, written out per model class: (pre module, post module) of block i.
EXPECTED = {
    "gpt2": ("gpt2", lambda m, i: (m.transformer.h[i].mlp.c_fc, m.transformer.h[i].mlp.c_proj)),
    "gpt_neox": (
        "gpt_neox",
        lambda m, i: (m.gpt_neox.layers[i].mlp.dense_h_to_4h, m.gpt_neox.layers[i].mlp.dense_4h_to_h),
    ),
    "gptj": ("gptj", lambda m, i: (m.transformer.h[i].mlp.fc_in, m.transformer.h[i].mlp.fc_out)),
    "llama": ("llama", lambda m, i: (m.model.layers[i].mlp.gate_proj, m.model.layers[i].mlp.down_proj)),
    "mistral": ("mistral", lambda m, i: (m.model.layers[i].mlp.gate_proj, m.model.layers[i].mlp.down_proj)),
    "qwen2": ("qwen2", lambda m, i: (m.model.layers[i].mlp.gate_proj, m.model.layers[i].mlp.down_proj)),
    "gemma": ("gemma", lambda m, i: (m.model.layers[i].mlp.gate_proj, m.model.layers[i].mlp.down_proj)),
    "phi": ("phi", lambda m, i: (m.model.layers[i].mlp.fc1, m.model.layers[i].mlp.fc2)),
    "bert": ("bert", lambda m, i: (m.bert.encoder.layer[i].intermediate.dense, m.bert.encoder.layer[i].output.dense)),
    "roberta": (
        "bert",
        lambda m, i: (m.roberta.encoder.layer[i].intermediate.dense, m.roberta.encoder.layer[i].output.dense),
    ),
}


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_models(transformers):
    models = {}
    for name, (cls, config) in _configs(transformers).items():
        torch.manual_seed(0)
        models[name] = cls(config).eval()
    return models


def expected_modules(name, model) -> dict:
    get = EXPECTED[name][1]
    return {(i, tap): module for i in range(LAYERS) for tap, module in zip(("pre", "post"), get(model, i))}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_hf_layouts_taps_and_metrics(hf_models, name):
    model = hf_models[name]
    analyzer = NerVEAnalyzer(model)
    assert analyzer.architecture.name == EXPECTED[name][0]
    expected = expected_modules(name, model)
    assert analyzer.tap_modules.keys() == expected.keys()
    for key, module in expected.items():
        assert analyzer.tap_modules[key] is module, key

    ids, mask = padded_inputs()
    results = analyzer.analyze(ids, mask, batch_size=4)
    assert results.tokens == int(mask.sum())
    # The reference runs the full task model (LM / MLM head included) on the same batches.
    reference = capture_reference(lambda i, m: model(input_ids=i, attention_mask=m), expected, batches_of(ids, mask, 4))
    assert_matches(results, reference)
    assert json.loads(json.dumps(results.to_dict()))["layers"][1]["js"] == results.layers[1].js


def test_padding_is_excluded(hf_models):
    model = hf_models["gpt2"]
    analyzer = NerVEAnalyzer(model)
    ids, mask = padded_inputs()
    base = analyzer.analyze(ids, mask, batch_size=3)
    # What sits under the padding cannot matter (causal model, right padding, masked keys) ...
    other = ids.clone()
    other[mask == 0] = 7
    again = analyzer.analyze(other, mask, batch_size=3)
    for a, b in zip(base, again):
        assert (a.pre.spectral_entropy, a.post.eee, a.js) == (b.pre.spectral_entropy, b.post.eee, b.js)
        assert np.array_equal(a.pre.eigenvalues, b.pre.eigenvalues)
    # ... while counting the padded rows would change the numbers.
    unmasked = analyzer.analyze(other, None, batch_size=3)
    assert unmasked.tokens == ids.numel() > base.tokens == int(mask.sum())
    assert abs(unmasked.layers[0].pre.spectral_entropy - base.layers[0].pre.spectral_entropy) > 1e-6


def test_layers_per_pass_and_layer_subset(hf_models):
    model = hf_models["llama"]
    ids, mask = padded_inputs(seed=1)
    whole = NerVEAnalyzer(model).analyze(ids, mask, batch_size=6)
    calls = []
    split = NerVEAnalyzer(model).analyze(ids, mask, batch_size=6, layers_per_pass=1, progress=calls.append)
    assert [(c["pass"], c["passes"]) for c in calls] == [(1, 2), (2, 2)]
    for a, b in zip(whole, split):
        assert np.array_equal(a.post.eigenvalues, b.post.eigenvalues) and a.js == b.js
    only = NerVEAnalyzer(model, layers=[1]).analyze(ids, mask, batch_size=6)
    assert [r.layer for r in only] == [1] and only[1].pre.eee == whole[1].pre.eee
    with pytest.raises(ValueError, match=r"layers \[5\]"):
        NerVEAnalyzer(model, layers=[5])


# -- layouts that are not built in ----------------------------------------------------------------------------


class _CustomFFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand = nn.Linear(16, 40)
        self.gate = nn.Linear(16, 40)
        self.contract = nn.Linear(40, 16)

    def forward(self, x):
        return self.contract(torch.relu(self.gate(x)) * self.expand(x))


class _CustomBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.ffn = _CustomFFN()

    def forward(self, x):
        return x + self.ffn(self.norm(x))


class CustomModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        self.trunk = nn.Module()
        self.trunk.stack = nn.ModuleList([_CustomBlock() for _ in range(3)])

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.trunk.stack:
            h = block(h)
        return h


@pytest.fixture
def registry():
    saved = dict(ARCHITECTURES)
    yield
    ARCHITECTURES.clear()
    ARCHITECTURES.update(saved)


def test_register_architecture_on_a_custom_module(registry):
    model = CustomModel()
    with pytest.raises(ArchitectureError, match="register_architecture") as err:
        NerVEAnalyzer(model)
    assert "gpt2" in str(err.value) and "llama" in str(err.value)
    with pytest.raises(ArchitectureError, match="gated=True needs gate="):
        NerVEAnalyzer.register_architecture(
            "custom", block_path="stack", up="ffn.expand", down="ffn.contract", gated=True
        )
    NerVEAnalyzer.register_architecture(
        "custom", block_path="stack", up="ffn.expand", down="ffn.contract", gated=True, gate="ffn.gate"
    )
    with pytest.raises(ArchitectureError, match="already registered"):
        NerVEAnalyzer.register_architecture("custom", block_path="stack", up="ffn.gate", down="ffn.contract")

    analyzer = NerVEAnalyzer(model)  # the only layout that matches: found by structure
    assert analyzer.architecture.name == "custom"
    expected = {
        (i, tap): m
        for i, block in enumerate(model.trunk.stack)
        for tap, m in (("pre", block.ffn.gate), ("post", block.ffn.contract))
    }
    assert analyzer.tap_modules == expected and all(analyzer.tap_modules[k] is m for k, m in expected.items())

    ids = torch.randint(0, 50, (5, 30), generator=torch.Generator().manual_seed(3))
    mask = (torch.arange(30) < torch.tensor([30, 22, 30, 11, 25])[:, None]).long()
    results = analyzer.analyze(ids, mask, batch_size=2)
    reference = capture_reference(lambda i, m: model(i), expected, batches_of(ids, mask, 2))
    assert_matches(results, reference)


def test_structure_fallback_and_errors(hf_models):
    llama = hf_models["llama"]
    # A model without config.model_type whose modules are named like LLaMA's: found by structure.
    bare = nn.Module()
    bare.layers = llama.model.layers
    assert NerVEAnalyzer(bare, forward=lambda i, m: None).architecture.name in ("llama", "mistral", "qwen2", "gemma")
    with pytest.raises(ArchitectureError, match="unknown architecture 'nope'"):
        NerVEAnalyzer(llama, "nope")
    with pytest.raises(ArchitectureError, match="no block under"):
        NerVEAnalyzer(llama, "phi")


@pytest.mark.slow
def test_analyze_imports_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import nerve_plugin.analyze, nerve_plugin.analyze.cli\n"
        "assert 'torchtitan' not in sys.modules, 'the analyzer core imported torchtitan'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- nerve-analyze end to end ---------------------------------------------------------------------------------


def _tiny_hf_tokenizer(transformers, path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted(set(TEXT.split()))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(path)
    return vocab


def _windows(ids, room, prefix, seq_len, pad):
    rows, masks = [], []
    for start in range(0, len(ids), room):
        row = prefix + ids[start : start + room]
        rows.append(row + [pad] * (seq_len - len(row)))
        masks.append([1] * len(row) + [0] * (seq_len - len(row)))
    return torch.tensor(rows), torch.tensor(masks)


def _check_outputs(out: Path, stdout: str, reference: dict, layers: list[int]):
    summary = (out / "summary.txt").read_text()
    assert summary.strip() in stdout
    record = json.loads((out / "results.json").read_text())
    assert [entry["layer"] for entry in record["layers"]] == layers
    for entry in record["layers"]:
        for tap in ("pre", "post"):
            ref = reference[(entry["layer"], tap)]
            assert entry[tap]["tokens"] == ref["tokens"]
            assert entry[tap]["dim"] == len(ref["p"])
            for metric in ("spectral_entropy", "participation_ratio", "eee"):
                assert math.isclose(entry[tap][metric], ref[metric], rel_tol=REL), (entry["layer"], tap, metric)
        js = reference_js(reference[(entry["layer"], "pre")]["p"], reference[(entry["layer"], "post")]["p"])
        assert math.isclose(entry["js"], js, rel_tol=REL)
    from PIL import Image

    with Image.open(out / "heatmap.png") as image:
        assert image.format == "PNG"
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 20  # cells were drawn, not a blank canvas
    return record


def test_cli_on_a_saved_hf_model(hf_models, transformers, tmp_path, capsys):
    from nerve_plugin.analyze.cli import main

    model = hf_models["llama"]
    model_dir = tmp_path / "tiny-llama"
    model.save_pretrained(model_dir)
    vocab = _tiny_hf_tokenizer(transformers, model_dir)
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    out = tmp_path / "analysis"
    assert (
        main(
            [
                str(model_dir),
                str(text),
                "--out",
                str(out),
                "--seq-len",
                "20",
                "--max-tokens",
                "150",
                "--batch-size",
                "3",
                "--quiet",
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out

    # The same windows built by hand: <s> + 19 words each, the last one padded, 150 words in all.
    ids = [vocab[w] for w in TEXT.split()][:150]
    input_ids, mask = _windows(ids, 19, [1], 20, 0)
    reference = capture_reference(
        lambda i, m: model(input_ids=i, attention_mask=m),
        expected_modules("llama", model),
        batches_of(input_ids, mask, 3),
    )
    record = _check_outputs(out, stdout, reference, [0, 1])
    assert record["architecture"] == "llama" and record["tokens"] == 150 + 8
    assert record["settings"]["sequences"] == 8


def test_cli_on_a_torchtitan_checkpoint(tmp_path, capsys):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from nerve_plugin.analyze.cli import main
    from nerve_plugin.torchtitan.v0_2.checkpoint import CheckpointError, build_model, load_checkpoint, load_job_config
    from nerve_plugin.tokenizer import SHIPPED_VOCAB, TiktokenTokenizer

    toml = tmp_path / "run.toml"
    toml.write_text(
        '[job]\ndump_folder = "outputs"\ncustom_config_module = "nerve_plugin.torchtitan.config"\n'
        '[model]\nname = "nerve_llama"\nflavor = "debugmodel"\nhf_assets_path = ""\n'
        '[training]\nseq_len = 48\n[variant]\nactivation = "gelu"\nffn_multiplier = 1.5\n'
    )
    model = build_model(load_job_config(toml))
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    # A full checkpoint as torchtitan's checkpointer lays it out: model keys at the top, then the rest.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 2048, (2, 16))).float().pow(2).mean().backward()
    optimizer.step()
    state = dict(model.state_dict())
    state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    state["train_state"] = {"step": 2}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(tmp_path / "outputs" / "checkpoint" / "step-2"))
    model.eval()
    (tmp_path / "outputs" / "checkpoint" / "step-10").mkdir()  # a save that never finished: no .metadata

    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    out = tmp_path / "analysis"
    assert (
        main(
            [
                str(tmp_path / "outputs"),
                str(text),
                "--config",
                str(toml),
                "--out",
                str(out),
                "--seq-len",
                "32",
                "--max-tokens",
                "200",
                "--layers",
                "0,5",
                "--batch-size",
                "4",
                "--quiet",
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out

    tok = TiktokenTokenizer(SHIPPED_VOCAB)
    ids = tok.encode(TEXT)[:200]
    input_ids, mask = _windows(ids, 31, [tok.bos_id], 32, tok.eos_id)
    modules = {
        (i, tap): m
        for i in (0, 5)
        for tap, m in (("pre", model.layers[str(i)].feed_forward.w1), ("post", model.layers[str(i)].feed_forward.w2))
    }
    reference = capture_reference(lambda i, m: model(i), modules, batches_of(input_ids, mask, 4))
    record = _check_outputs(out, stdout, reference, [0, 5])
    assert record["architecture"] == "torchtitan_llama" and record["layers"][0]["pre"]["dim"] == 384
    assert record["settings"]["checkpoint"].endswith("step-2")

    # A job config that does not describe the checkpoint's model is refused, naming the tensor.
    with pytest.raises(
        CheckpointError,
        match=r"'layers.0.feed_forward.w1.weight' has shape \(384, 256\) in the "
        r"checkpoint and \(512, 256\)",
    ):
        load_checkpoint(tmp_path / "outputs", toml, variant={"ffn_multiplier": 2})


def test_cli_stops_in_one_line_on_an_unusable_out_folder_or_an_hf_folder_without_weights(transformers, tmp_path):
    from nerve_plugin.analyze.cli import main

    config_only = tmp_path / "config-only"
    transformers.LlamaConfig(**_configs(transformers)["llama"][1].to_dict()).save_pretrained(config_only)
    assert sorted(p.name for p in config_only.iterdir()) == ["config.json"]
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as stop:
        main([str(config_only), str(text), "--out", str(tmp_path / "a_file" / "analysis"), "--quiet"])
    assert (
        stop.value.code
        == f"nerve-analyze: --out {tmp_path / 'a_file' / 'analysis'}: {tmp_path / 'a_file'} is a file, not a folder"
    )
    with pytest.raises(SystemExit) as stop:
        main([str(config_only), str(text), "--out", str(tmp_path / "analysis"), "--quiet"])
    assert stop.value.code == (
        f"nerve-analyze: {config_only} holds config.json but no weights (model.safetensors, "
        "pytorch_model.bin or a sharded index): save the model there with save_pretrained"
    )
    assert not (tmp_path / "analysis").exists()  # refused before any work


def test_too_few_tokens_are_refused_below_two_and_flagged_below_a_quarter_of_the_width(hf_models, caplog):
    import logging

    model = hf_models["llama"]  # FFN width 64
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="analyze needs at least 2 tokens with attention_mask != 0, got 1"):
        NerVEAnalyzer(model).analyze(ids, torch.tensor([[1, 0, 0]]))
    with caplog.at_level(logging.WARNING):
        results = NerVEAnalyzer(model).analyze(ids, torch.tensor([[1, 1, 0]]))
    warned = [m for m in caplog.messages if "fewer than FFN width / 4" in m]
    assert len(warned) == 1 and warned[0].startswith("nerve-analyze: 2 tokens per layer")
    for layer in results.to_dict()["layers"]:
        assert layer["pre"]["tokens"] == 2 and layer["pre"]["few_tokens"] is layer["post"]["few_tokens"] is True
    enough = NerVEAnalyzer(model).analyze(*padded_inputs())  # 107 tokens for 64
    assert all(layer["pre"]["few_tokens"] is False for layer in enough.to_dict()["layers"])
