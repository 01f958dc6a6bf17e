"""Using a trained model: the loaded model, KV-cache decoding and end-of-run samples.

language_model (`sslm_jax.load` on a pretraining workdir: logits, generate, fill_mask, score,
embed), decode (the jitted generation loop) over decoder (the weights in decoding layout and
the KV cache), sample (what a run prints when it ends).
"""
