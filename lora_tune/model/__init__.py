"""The base model: tokenizer and weights loading, what generation stops on, attention kernels, 4-bit layout, dtype
keeping, safety."""
