"""Training: from a model and batches of numpy arrays to checkpoints and metrics.

sharding (the one logical-axis rules table and the mesh), state (sharded creation), optimizer
(optax), losses and vocab_loss, step (the pure jitted train and eval steps), hooks (the seams a
caller plugs in: Objective, DataHooks, Watcher), loop (the outer loop, resume included),
metrics (metrics.jsonl, TensorBoard, MFU) and plan (per-device memory for `--plan`).
Never imports data/: batches are plain iterators, so it runs without TensorFlow.
"""
