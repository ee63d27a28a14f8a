"""The forward pass training and evaluation share: `logprobs` (the chunked LM-head loss and
log-probabilities), `causal` (the model's forward with the attention kernel `options` choose for
plain and masked rows), `flash4` and `flex` (those kernels), `head_triton` (the LM-head kernels)."""
