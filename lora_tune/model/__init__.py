"""The base model: tokenizer and weights loading, attention kernels, 4-bit layout, dtype keeping, safety."""
