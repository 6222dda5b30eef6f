"""Weight sync: megatron actor shards -> vLLM rollout engines, resharded, bucketed, verified.

    plan.py       WeightSyncPlan: the name/layout map and who sends what in which bucket
    transport.py  the sync group (gloo on CPU, NCCL on GPUs), bucket header + checksum
    sender.py     WeightSender: runs on every actor rank (TP gather, HF layout, pack, broadcast)
    receiver.py   WeightReceiverExtension: a vLLM worker extension streaming buckets into reload_weights
    fp8.py        FP8 rollout: linear weights quantized on the sender (nvidia-modelopt)
    verify.py     --verify-logprobs: the same tokens scored by trainer and engines after a sync
"""
