"""Datasets: BIG-bench tasks, the user's JSONL, tokenisation and packing."""
from .bigbench import TaskInfo, load_task, task_index
from .examples import Completion, Example, MultipleChoice, split_examples
from .jsonl import load_jsonl
from .layout import Batch, Row, collate, training_rows
from .tokenize import IGNORE, Encoded, Formatter, pack

__all__ = ["TaskInfo", "load_task", "task_index", "Completion", "Example", "MultipleChoice",
           "split_examples", "load_jsonl", "IGNORE", "Encoded", "Formatter", "pack", "Batch", "Row", "collate",
           "training_rows"]
