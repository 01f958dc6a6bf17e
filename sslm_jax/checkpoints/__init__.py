"""Checkpoints: what a run saves and how it is read back.

Orbax checkpoints of the train state with a record of what produced them (checkpointer), the
saved parameter tree compared with a model (saved_tree), reading a workdir back for loading and
resuming (restore), and Hugging Face weights and config.json both ways (hf, hf_config; the Llama
and ModernBERT tables in hf_families).
"""
