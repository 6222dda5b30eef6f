"""Packed sequences compute exactly what they compute alone (no cross-contamination)."""

import pytest
import torch

from megarl.models.packing import pack
from megarl.runtime.local_group import run_local_group


def test_pack_layout():
    row = pack([torch.tensor([5, 6, 7]), torch.tensor([8, 9])], pad_to=7)
    assert row.tokens.tolist() == [[5, 6, 7, 8, 9, 0, 0]]
    assert row.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert row.cu_seqlens.tolist() == [0, 3, 5]
    allowed = ~row.attention_mask[0, 0]
    assert allowed[4].tolist() == [False, False, False, True, True, False, False]  # 2nd seq, 2nd token
    assert allowed[2].tolist() == [True, True, True, False, False, False, False]
    assert [t.tolist() for t in row.split(row.tokens[..., None])] == [[[5], [6], [7]], [[8], [9]]]
    with pytest.raises(ValueError, match="do not fit"):
        pack([torch.tensor([1, 2, 3])], pad_to=2)


@pytest.mark.dist
@pytest.mark.parametrize("layout,world", [({}, 1), ({"tp": 2}, 2)], ids=["tp1", "tp2"])
def test_packed_equals_padded(converted, layout, world):
    results = run_local_group("tests.models.parity:packed_vs_padded", world,
                              args=(converted["qwen2"]["ckpt"], layout, [7, 12, 3]), timeout=300)
    for r in results:
        if r:
            assert max(r["diffs"]) < 1e-5, r
            assert r["leak_if_unmasked"] > 1e-3, "the comparison cannot tell packed from unpacked"
