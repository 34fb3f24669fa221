"""Training data: corpus sources, the SentencePiece vocabulary, seqio Tasks, repetition budgets.

    from jaxaccel.data import DataConfig, build_data, attention_mask
    data = build_data(DataConfig(unique_tokens=2_000_000, epochs=4), seq_len=512, batch_size=32)
    for batch in data.train_batches(start_step):   # dict of [B/num_shards, T] numpy arrays
        mask = attention_mask(batch)                 # [B, T, T] bool: the model's new_mask

Modules, leaves first (each imports only modules above it in this list, so there are no
cycles; nothing here imports jaxaccel beyond `jaxaccel.errors`):
  `errors` (DataError), `ids` (reserved token ids), `tf_import` (TensorFlow/seqio/TFDS, lazily),
  `cache` (content keys, atomic files), `config` (DataConfig), `corpus` (sources, manifest,
  split), `vocab` (SentencePiece), `tasks` (seqio Tasks and token arrays), `objectives`
  (causal / prefix LM / UL2 rows, attention mask), `pipeline` (budget, epochs, sharding).
Importing this package does not import TensorFlow: only `tf_import`'s functions do, called
inside the functions that need TF, so building data imports it only when a cache entry is
missing (or for a tfds: corpus).
"""
from jaxaccel.data.config import OBJECTIVES, UL2_DENOISERS, DataConfig, Denoiser
from jaxaccel.data.errors import DataError
from jaxaccel.data.ids import BOS_ID, EOS_ID, FIRST_SENTINEL_ID, MODE_IDS, PAD_ID, UNK_ID, sentinel_id
from jaxaccel.data.objectives import BATCH_KEYS, attention_mask
from jaxaccel.data.pipeline import TrainData, budget, build_data, corpus_token_count

__all__ = ["BATCH_KEYS", "BOS_ID", "DataConfig", "DataError", "Denoiser", "EOS_ID", "FIRST_SENTINEL_ID", "MODE_IDS",
           "OBJECTIVES", "PAD_ID", "TrainData", "UL2_DENOISERS", "UNK_ID", "attention_mask", "budget", "build_data",
           "corpus_token_count", "sentinel_id"]
