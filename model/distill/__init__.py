"""Int8-aware distillation of a shared-KV student from its GQA teacher (issue 9).

data -> teacher-sampled token sequences cached on disk; fakequant -> the differentiable
int8 student forward; layerwise / train -> the two objectives; delta -> the shipped file.
"""
