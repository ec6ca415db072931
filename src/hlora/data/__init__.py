"""Data layer: GLUE task loading, client partitioning, tokenization and batching."""

from hlora.data.collate import DynamicPaddingCollator, length_grouped_batches, tokenize_pairs
from hlora.data.glue import (
    TASK_NAMES,
    Example,
    TaskData,
    TaskInfo,
    get_task,
    load_task,
    resolve_data_dir,
)
from hlora.data.partition import PARTITION_SCHEMES, partition_indices, partition_summary

__all__ = [
    "PARTITION_SCHEMES",
    "TASK_NAMES",
    "DynamicPaddingCollator",
    "Example",
    "TaskData",
    "TaskInfo",
    "get_task",
    "length_grouped_batches",
    "load_task",
    "partition_indices",
    "partition_summary",
    "resolve_data_dir",
    "tokenize_pairs",
]
