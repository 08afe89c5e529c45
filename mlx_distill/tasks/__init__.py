"""Toy tasks with ground truth: tool calling (:mod:`.toolcall`) and the Magic 8-Ball
(:mod:`.eightball`); ``mlx-distill tasks`` (:mod:`.cli`) writes their splits as JSONL."""
