"""Core ML side of mlx-distill: MIL builder, quantization, .mlpackage export and the numpy MIL
reference interpreter. Later stages of the pipeline land here."""
