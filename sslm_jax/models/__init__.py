"""The Transformer, as Flax NNX modules that name logical axes and never see a mesh.

config (ModelConfig, the frozen dataclass a model takes), layers, attention (XLA, cuDNN) and
splash (the Pallas TPU kernel), transformer (GPT-2 and BERT sharing one block), and the FLOP
counts behind MFU (flops, kernel_costs).
"""
