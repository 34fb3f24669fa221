"""The vocabulary's reserved token ids: fixed, whatever the corpus or vocabulary size.

    0 <pad>   padding (seqio's PAD_ID)        4 [R]  UL2 regular span corruption mode
    1 </s>    end of document (EOS)           5 [X]  UL2 extreme span corruption mode
    2 <unk>   unknown (unused: byte fallback) 6 [S]  UL2 sequential (prefix LM) mode
    3 <s>     start of document (BOS)         7 ... 7 + num_sentinels - 1: <extra_id_0>, <extra_id_1>, ...

then the 256 byte-fallback pieces, then the learned merges (see `jaxaccel.data.vocab`).
A leaf module: it imports nothing, so config, objectives, tasks and vocab can all use it
without importing one another.
"""
from __future__ import annotations

PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3
MODE_PIECES = {"R": "[R]", "X": "[X]", "S": "[S]"}
MODE_IDS = {"R": 4, "X": 5, "S": 6}
FIRST_SENTINEL_ID = 7
NUM_BYTE_PIECES = 256


def sentinel_id(i: int) -> int:
    """Id of sentinel <extra_id_i> (ascending ids, unlike T5's descending ones)."""
    return FIRST_SENTINEL_ID + i


def min_vocab_size(num_sentinels: int) -> int:
    """The reserved ids, the sentinels, the 256 byte pieces and at least one learned piece."""
    return FIRST_SENTINEL_ID + num_sentinels + NUM_BYTE_PIECES + 1
