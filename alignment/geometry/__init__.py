"""Attention geometry: reading a model's attention dimensions (`model_dims`) and the one Q/K -> attention
builder (`attention_probs`). The bottom of alignment: imports nothing else of kvmap (transformers only
lazily, for scaled rotary types).
"""
