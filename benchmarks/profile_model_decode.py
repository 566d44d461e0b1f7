"""Where a decode step of the hybrid model spends its time: torch.profiler over 4 greedy steps.

For the MoBA and the dense variant of the `340m` preset (random weights, bf16) in turn: prefill a random
prompt of CONTEXT tokens per sequence, decode 6 warm-up steps, then profile 4 steps and print the top ops
by device time and by CPU time (the launch count is the ``cudaLaunchKernel`` row). On a CUDA GPU:

    python benchmarks/profile_model_decode.py 32768 1      # CONTEXT BATCH
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from flashmoba.models import MoBAHybridConfig, MoBAHybridForCausalLM


def main():
    if len(sys.argv) != 3 or not torch.cuda.is_available():
        raise SystemExit("usage (CUDA GPU): python benchmarks/profile_model_decode.py CONTEXT BATCH")
    context, batch = int(sys.argv[1]), int(sys.argv[2])
    for attn in ("moba", "dense"):
        cfg = MoBAHybridConfig.from_preset("340m", global_attn=attn)
        torch.manual_seed(0)
        model = MoBAHybridForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
        ids = torch.randint(0, cfg.vocab_size, (batch, context), device="cuda")
        with torch.no_grad():
            out = model(ids, use_cache=True, logits_to_keep=1)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(6):
                out = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(4):
                    out = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    token = out.logits[:, -1].argmax(-1, keepdim=True)
                torch.cuda.synchronize()
        print(f"==== {attn} context {context} batch {batch} (4 steps)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
        del model, cache, out
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
