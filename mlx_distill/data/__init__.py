"""Training data: KD records and SFT conversations → student tokens, teacher top-k aligned onto
student positions, length-bucketed resumable batches.

``load_dataset`` (encode + align + bad-record accounting) → ``BatchLoader`` (buckets, curriculum,
shuffling, position). ``mlx-distill data stats`` prints what a load would use and refuse.
"""

from mlx_distill.data.align import BY_ID, BY_TEXT, TeacherTargets, align_teacher, carry
from mlx_distill.data.batches import (
    BATCH_KEYS,
    SUPERVISED_KEYS,
    BatchLoader,
    BucketReport,
    linear_curriculum,
)
from mlx_distill.data.dataset import DataReport, Dataset, load_dataset, split_validation
from mlx_distill.data.encode import Example, encode_kd_record, encode_sft_example, render_turn
from mlx_distill.data.errors import BAD_REASONS, BadRecords, DataError, RecordError
from mlx_distill.data.vocab import TokenVocab, tokenizer_fingerprint

__all__ = [
    "BAD_REASONS", "BATCH_KEYS", "BY_ID", "BY_TEXT", "BadRecords", "BatchLoader", "BucketReport",
    "DataError", "DataReport", "Dataset", "Example", "RecordError", "TeacherTargets", "TokenVocab",
    "align_teacher", "carry", "encode_kd_record", "encode_sft_example", "linear_curriculum",
    "load_dataset", "render_turn", "SUPERVISED_KEYS", "split_validation", "tokenizer_fingerprint",
]
