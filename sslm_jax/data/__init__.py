"""The pretraining input pipeline: document sources, the token-row cache, masking and batches.

corpus and units (the configured source and its units of work), preparation and beam_prepare
(building the cache), shards and cache (the cache on disk), packing, masking, permute and
mixture (rows, BERT masks, the data order, mixtures), batches (batches as a pure function of
(seed, step)), pipeline (opening the cache for a run), gfile (local and remote files),
augment/ (text transforms), and labelled and labelled_tfds (fine-tuning's labelled examples, from
files or the TFDS catalog). `sslm_jax.data.batches` and `sslm_jax.data.pipeline` import TensorFlow;
importing this package does not, so `sslm_jax.data.masking` stays usable where TensorFlow is not
installed.
"""
