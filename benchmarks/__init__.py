"""Performance benchmarks: ratios measured side by side in one run (``python -m benchmarks``).

Families (one file each): ``steps`` (training step of each PEFT config / full fine-tuning, our LoRA
/ plain peft, adapter sizes), ``inference`` (merged and unmerged latency / plain backbone),
``lightning_loop`` (Trainer / plain loop), ``data`` (image cache, linear-probe feature cache),
``t2i`` (precomputed latents), ``memory`` (peak training memory, one process per config).
``report`` holds the targets.
"""
