"""vlora.counters' FLOP prices where torch's own formulas need help."""

import torch
from vlora.counters import FLOP_FORMULAS, _query_heads

_aten = torch.ops.aten


def test_grouped_query_attention_is_priced_as_the_querys_heads():
    """Qwen2.5's LLM attends 4 query heads per key/value head: priced as attention with every head (torch < 2.12
    refuses the shapes); an ordinary call's arguments pass through untouched."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 16, 32), torch.randn(2, 2, 16, 32), torch.randn(2, 2, 16, 32)
    op = _aten._scaled_dot_product_flash_attention_for_cpu.default
    out = op(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1))
    formula = FLOP_FORMULAS[op._overloadpacket]
    args = _query_heads(op, (q, k, v))
    assert [tuple(t.shape) for t in args] == [(2, 8, 16, 32)] * 3 and args[1].device.type == "meta"
    full = formula(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), out_val=out)
    assert formula(*args, out_val=out) == full == 2 * 2 * (2 * 8 * 16 * 16 * 32)  # QK^T and PV: 2 FLOPs a MAC
    same = (q, q, q)
    assert _query_heads(op, same) is same
    assert _query_heads(_aten.mm.default, (q, k)) == (q, k)
