"""Fine-tuning: task heads on a pretrained encoder, labelled data, and the task model.

heads and tagging (the heads, losses and tagging features), labelled_cache and tasks (the
features of the examples data/labelled and data/labelled_tfds read), metrics and
early_stopping, keep_best (the best eval's parameters), class_weights, freeze, sources (where
encoder and tokenizer come from), build (encoder plus head, without training code), loop
(fine-tuning on the training loop) and task_model (`sslm_jax.load` on a fine-tuning workdir:
classify, tag). Loading a task model imports nothing from training/.
"""
