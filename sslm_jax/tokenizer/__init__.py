"""Tokenizers: SentencePiece models we train (sentencepiece), Hugging Face tokenizer.json files
(hf_json), and loading either by its file type or from a workdir's own copy (files)."""
