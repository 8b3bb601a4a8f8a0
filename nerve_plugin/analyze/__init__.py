"""Offline NerVE: the FFN eigen-spectrum metrics of a trained model, with the original NerVE's surface.

    from nerve_plugin.analyze import NerVEAnalyzer, print_summary

    analyzer = NerVEAnalyzer(model)      # GPT-2, GPT-NeoX/Pythia, GPT-J, LLaMA, Mistral, Qwen2, Gemma, Phi, BERT
    results = analyzer.analyze(input_ids, attention_mask, batch_size=8)
    print_summary(results)

Works on any nn.Module (register its layout with ``NerVEAnalyzer.register_architecture``); HuggingFace
transformers is optional (``pip install nerve-plugin[hf]``) and never imported here. torchtitan checkpoints:
``nerve_plugin.torchtitan.v0_2.checkpoint``. Command line: ``nerve-analyze``.
"""

from .analyzer import NerVEAnalyzer, default_forward
from .architectures import ARCHITECTURES, Architecture, ArchitectureError
from .results import AnalysisResults, LayerResult, format_summary, print_summary

__all__ = [
    "ARCHITECTURES",
    "AnalysisResults",
    "Architecture",
    "ArchitectureError",
    "LayerResult",
    "NerVEAnalyzer",
    "default_forward",
    "format_summary",
    "print_summary",
]
