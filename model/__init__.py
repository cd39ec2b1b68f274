"""Model config and presets, the transformer, int8 quantization, weights, tokenizer, conversion."""
