"""Data: Megatron indexed datasets, preprocessing, domain packing and the domain sampler.

Modules (imported individually, so tokenizer worker processes do not pull in torch):
    indexed      .bin/.idx reader and streaming writer, byte-compatible with Megatron
    preprocess   jsonl -> indexed datasets (tools/preprocess_data.py)
    split        SlimPajama jsonl -> one folder per domain (tools/split_domains.py)
    domains      domain names, prob_map presets, reference losses
    sampler      DomainSampler: per-sample domain choice, dynamic update rules, JSON state
    packing      a domain's documents cut into fixed-size blocks
    order        BlockOrder: the shuffled order of a domain's blocks, computed per position
    train_data   MultiDomainTrainData: data-parallel batches with exact resume
    valid_data   load_validation_sets: one validation set per domain
"""
