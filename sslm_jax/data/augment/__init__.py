"""Text augmentation on raw text, deterministic in (seed, example, copy, transform).

words (a text as lead, words and gaps), transforms (word edits, sentence splits, paraphrases),
sources (thesauri, WordNet, paraphrase files), callables (a user's paraphrase function),
contextual (a trained BERT's guesses) and apply (a run's training data, augmented). The spec
grammar `data.augment` is config/augment_spec.
"""
