"""Datasets: readers (jsonl, parquet) that keep row numbers, chat rendering into token ids + loss
masks (one function for training and rollout), and deterministic resumable sampling."""
