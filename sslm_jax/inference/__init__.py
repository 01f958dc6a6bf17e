"""Using a trained model: the loaded model, KV-cache decoding and end-of-run samples.

language_model (`sslm_jax.load` on a pretraining workdir: logits, generate, fill_mask, score,
embed), decode (the jitted generation loop) over decoder (a model's weights in decoding layout:
GPT-2's there, Llama's in llama_decoder) and kv_cache (the KV cache and the attention onto it),
sample (what a run prints when it ends).
"""
