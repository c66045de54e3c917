"""The causal LM loss without the logits of every position.

With a 150k vocabulary the fp32 logits are the biggest allocation of a step: 3.9 GiB for Llama
3.1 8B at batch 2 x 2048, 1.6 GB for GPT2-XL at the guide's 8 x 1024. Here the loss projects only
the trained positions through the LM head, a chunk of positions at a time, and each chunk's
gradient is computed in the same pass (as Liger's and Cut Cross-Entropy's kernels do), so the
backward needs no second projection and at most one chunk's logits are alive at once.

TRL's `add_fused_lm_head` does the same job, but it recomputes each chunk in the backward and on a
CPU scores every position: 2.5x slower than the full logits in benchmarks/bench_chat_loss.py.
"""

import functools
import types

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

CHUNK_BYTES = 1 << 28  # one chunk's fp32 logits: 256 MiB


class LinearCrossEntropy(torch.autograd.Function):
    """sum(-log softmax(scale * (hidden @ weight.T + bias))[label]) / divisor, with the gradients
    of hidden, weight and bias computed chunk by chunk during the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, divisor, scale, cap, grads):
        rows = max(16, CHUNK_BYTES // (4 * weight.shape[0]))
        w = weight.to(hidden.dtype)  # a no-op unless the head is kept in another dtype (QLoRA)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if grads and hidden.requires_grad else None
        head = grads and weight.requires_grad  # a LoRA run's head is frozen: no gradient to make
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if head else None  # fmt: skip
        grad_bias = torch.zeros(weight.shape[0], device=weight.device) if head and bias is not None else None  # fmt: skip
        for start in range(0, hidden.shape[0], rows):
            h, y = hidden[start : start + rows], labels[start : start + rows]
            z = h @ w.T if bias is None else torch.addmm(bias.to(h.dtype), h, w.T)
            z = z.float() * scale
            if cap:  # Gemma 2 and 3 soft-cap their logits: cap * tanh(z / cap)
                t = torch.tanh(z / cap)
                z = t * cap
            lse = torch.logsumexp(z, dim=-1)
            total += (lse - z.gather(1, y[:, None]).squeeze(1)).sum()
            if not grads:
                continue
            g = torch.exp(z - lse[:, None])  # softmax, less one at the label: d loss / d z
            g[torch.arange(len(y), device=g.device), y] -= 1
            if cap:
                g *= 1 - t * t
            g = (g * scale).to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + rows] = g @ w
            if grad_weight is not None:
                grad_weight += (g.T @ h).float()
            if grad_bias is not None:
                grad_bias += g.float().sum(0)
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.divisor = divisor
        return total / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        factor = grad_loss / ctx.divisor
        grads = [
            None if g is None else (g * factor).to(dtype)
            for g, dtype in zip(ctx.grads, ctx.dtypes, strict=True)
        ]
        return (*grads, None, None, None, None, None)


def fuse_loss(model) -> None:
    """model(..., labels=...) returns the loss alone, computed as above; without labels (generate)
    the model's own forward runs. Before peft wraps the model: peft calls this forward."""
    from trl.trainer.utils import maybe_gather_lm_head_ctx  # ZeRO-3: the head's weight, gathered

    config = model.config.get_text_config()
    # Heads that scale their logits in ways this loss does not know keep the full logits.
    if any(
        getattr(config, k, None)
        for k in ("logits_scaling", "output_multiplier", "lm_head_multiplier")
    ):
        return
    scale = getattr(config, "logit_scale", None) or 1.0
    cap = getattr(config, "final_logit_softcapping", None)
    original = model.forward

    @functools.wraps(type(model).forward)  # generate() checks its keyword arguments against it
    def forward(self, *args, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None:
            return original(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        targets = labels[:, 1:].to(hidden.device)
        trained = targets != -100
        head = self.get_output_embeddings()
        divisor = trained.sum() if num_items_in_batch is None else num_items_in_batch
        divisor = torch.as_tensor(divisor, device=hidden.device).clamp(min=1).float()
        grads = torch.is_grad_enabled()
        with maybe_gather_lm_head_ctx(head.weight, head.bias):
            loss = LinearCrossEntropy.apply(
                hidden[trained],
                head.weight,
                head.bias,
                targets[trained],
                divisor,
                scale,
                cap,
                grads,
            )
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)
