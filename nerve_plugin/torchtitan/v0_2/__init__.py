"""torchtitan 0.2.2's seams: TrainSpec wrapping (train_spec.py), the TOML JobConfig (config.py), the variants'
TrainSpec (variant_spec.py), DCP checkpoint loading for the analyzer (checkpoint.py).

Everything here reads 0.2.2's JobConfig or its TrainSpec registry; what does not (the [nerve] section, the
session, Muon's container, the corpus and tokenizer, CPU mode) lives one level up, shared with other versions.
"""
