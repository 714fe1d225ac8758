"""Scaling sweeps: a grid of `avar sft` runs submitted as Slurm jobs, collected into one CSV and plots.

config   SweepConfig: base SFT config, grid/points, sbatch options, max_concurrent, MFU peak
grid     points -> deterministic names, layouts (DP = nodes x ranks_per_node / (TP x PP)), dotted overrides
submit   sbatch in max_concurrent dependency chains; Slurm job states (squeue, sacct, scontrol)
collect  per-point medians (step time, tokens/s/GPU, TFLOP/s/GPU, MFU, peak memory) -> results.csv/.json
plots    throughput vs GPUs, AGTO overhead per layout
cli      `avar sweep --config FILE` / `avar sweep collect --out DIR`
"""
