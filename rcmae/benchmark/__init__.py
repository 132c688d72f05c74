"""The benchmark suite: one command evaluates backbones on every downstream protocol and writes the report card.

``plan`` turns backbones, protocols and a preset into a graph of tool runs (export -> k-NN, linear probe,
fine-tuning, detection; fine-tuning -> robustness), ``runner`` runs it here, under torchrun or on SLURM
and knows each job's state, ``collect`` reads each job's results from its folder, ``cost`` measures a
backbone's parameters, FLOPs, throughput and memory, ``report`` writes report.md / .html / .json.
"""
