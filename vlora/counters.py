"""What a training step costs, counted the same way on any machine: operator calls and FLOPs, split into parts.

Operator calls are what a GPU pays in launch overhead (each is at least one kernel launch, and a Python-side
dispatch), so a step that runs fewer of them is faster wherever the step is launch-bound, which small and mid-sized
models on a fast GPU are. Both counts come from torch's own dispatcher: a TorchDispatchMode sees every operator
that reaches a kernel (after autograd and the composite decompositions), forward, backward and optimizer alike, and
torch's FLOP formulas (torch.utils.flop_counter) price the matmuls and attention. Two kernels torch has no formula
for are priced here: the CPU's flash attention (with the GPU flash kernel's formula, same arguments first) and
bitsandbytes' 4-bit matmul, a custom operator whose inner matmul the mode does not see (2 x rows x in x out).

The parts, in the order the step runs them:
- vision: the vision tower and its merger, forward and backward;
- llm: everything of the language model, from the embedding to the final norm, and the VLM's glue (3-D RoPE
  index, splicing image features into the text);
- loss: from lm_head on (the logits, the cross-entropy) in the forward, and in the backward until the gradient
  reaches the language model's output;
- optimizer: everything from the end of the backward to the next forward (clipping, the update, zeroing), in
  vlora's loop and in HF Trainer's alike; `phase("optimizer")` names it explicitly where no backward ran before.
The split follows the module boundaries (forward hooks; in the backward, gradient hooks on the boundary tensors and
a callback at the backward's end), so recomputation under activation checkpointing lands in the part it recomputes.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch import nn
from torch.autograd.graph import register_multi_grad_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

PARTS = ("vision", "llm", "loss", "optimizer")
_aten = torch.ops.aten
FLOP_FORMULAS = {
    **flop_registry,
    _aten._scaled_dot_product_flash_attention_for_cpu: flop_registry[_aten._scaled_dot_product_flash_attention],
    _aten._scaled_dot_product_flash_attention_for_cpu_backward:
        flop_registry[_aten._scaled_dot_product_flash_attention_backward],
}


# Where query, key and value sit among each SDPA kernel's arguments (a backward's come after grad_out).
_SDPA_QKV = {op: 0 for op in (_aten._scaled_dot_product_flash_attention, _aten._scaled_dot_product_efficient_attention,
                              _aten._scaled_dot_product_cudnn_attention, _aten._scaled_dot_product_flash_attention_for_cpu)}
_SDPA_QKV |= {op: 1 for op in (_aten._scaled_dot_product_flash_attention_backward,
                               _aten._scaled_dot_product_efficient_attention_backward,
                               _aten._scaled_dot_product_cudnn_attention_backward,
                               _aten._scaled_dot_product_flash_attention_for_cpu_backward)}


def _query_heads(func, args: tuple) -> tuple:
    """Grouped-query attention (fewer key/value heads than query heads, as in Qwen2.5's LLM) priced as the query's
    heads, which torch's formulas do from 2.12 on and refuse before (torch 2.11: 'shapes are incompatible'): key
    and value as meta tensors with the query's heads (the formulas read shapes only)."""
    i = _SDPA_QKV.get(func._overloadpacket)
    if i is None or args[i + 1].dim() != 4 or args[i + 1].shape[1] == args[i].shape[1]:
        return args
    heads = args[i].shape[1]
    kv = [torch.empty((t.shape[0], heads, *t.shape[2:]), dtype=t.dtype, device="meta") for t in args[i + 1:i + 3]]
    return (*args[:i + 1], *kv, *args[i + 3:])


def _bnb_4bit_flops(func, args, out) -> int:
    """bitsandbytes' fused 4-bit matmul (A @ dequant(B).T): 2 x rows x in x out, from the input and output shapes."""
    if func.namespace != "bitsandbytes" or "gemm_4bit" not in func.__name__ or not isinstance(out, torch.Tensor):
        return 0
    a = args[0]
    return 2 * (a.numel() // a.shape[-1]) * a.shape[-1] * out.shape[-1]


class StepCounter(TorchDispatchMode):
    """Counts the operators (by namespace and by part) and FLOPs (by part) of what runs inside `counting()`.

    `model` is the Hugging Face VLM (Qwen2VL/Qwen2.5-VL ...ForConditionalGeneration, or a peft model around one):
    its `model.visual` and `lm_head` mark the parts' boundaries.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.vlm, self.visual, self.lm_head = hf.model, hf.model.visual, hf.lm_head
        self.part = "llm"
        self.ops: Counter = Counter()  # part -> operator calls
        self.aten: Counter = Counter()  # part -> aten operator calls only
        self.flops: Counter = Counter()  # part -> FLOPs
        self.by_op: Counter = Counter()  # "namespace::name" -> calls, for `vlora bench --ops`
        self._hooks: list = []
        self._end_queued = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops[self.part] += 1
        if func.namespace == "aten":
            self.aten[self.part] += 1
        self.by_op[f"{func.namespace}::{func.__name__}"] += 1
        formula = FLOP_FORMULAS.get(func._overloadpacket)
        if formula:
            self.flops[self.part] += formula(*_query_heads(func, args), **kwargs, out_val=out)
        else:
            self.flops[self.part] += _bnb_4bit_flops(func, args, out)
        return out

    @contextlib.contextmanager
    def phase(self, part: str):
        """Count what runs inside as `part` (the optimizer's update runs outside every module)."""
        before, self.part = self.part, part
        try:
            yield
        finally:
            self.part = before

    @contextlib.contextmanager
    def counting(self):
        """Count the operators run inside, with the part boundaries hooked for the duration."""
        self.part = "llm"
        self._hooks = [
            self.vlm.register_forward_pre_hook(self._set("llm")),  # a forward starts (the embedding is the LLM's)
            self.visual.register_forward_pre_hook(self._enter_vision),
            self.visual.register_forward_hook(self._leave_vision),
            self.lm_head.register_forward_pre_hook(self._enter_loss),
        ]
        try:
            with self:
                yield self
        finally:
            for hook in self._hooks:
                hook.remove()
            self._hooks = []

    def _set(self, part: str):
        def hook(*_):
            self.part = part
        return hook

    def _grad_hook(self, tensors, part: str) -> None:
        tensors = [t for t in tree_flatten(tensors)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
        if tensors:  # fires in the backward once the gradients of these tensors are computed
            self._hooks.append(register_multi_grad_hook(tensors, self._in_backward(part), mode="any"))

    def _in_backward(self, part: str):
        def hook(*_):
            self.part = part
            if not self._end_queued:  # what runs after this backward is the optimizer's, until the next forward
                torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)
                self._end_queued = True
        return hook

    def _backward_ended(self) -> None:
        self.part, self._end_queued = "optimizer", False

    def _enter_vision(self, module, args):
        self.part = "vision"

    def _leave_vision(self, module, args, out):
        self.part = "llm"
        # The backward reaches the vision tower when its output's gradient is being computed.
        self._grad_hook(out, "vision")

    def _enter_loss(self, module, args):
        self.part = "loss"
        # The backward leaves the loss once the gradient of lm_head's input (the LLM's output) is computed.
        self._grad_hook(args, "llm")

    def reset(self) -> None:
        self.ops.clear(), self.aten.clear(), self.flops.clear(), self.by_op.clear()

    def table(self, steps: int = 1) -> dict:
        """Per step: {part: {"ops", "aten_ops", "gflops"}} and "total"."""
        rows = {p: {"ops": self.ops[p] / steps, "aten_ops": self.aten[p] / steps, "gflops": self.flops[p] / steps / 1e9}
                for p in PARTS}
        rows["total"] = {k: sum(r[k] for r in rows.values()) for k in ("ops", "aten_ops", "gflops")}
        return rows
