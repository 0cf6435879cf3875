"""Tenant tasks: small seeded text-to-text tasks, one per tenant of the demo."""

from vllm_plugins.tasks.ops import OPS, Op
from vllm_plugins.tasks.suite import Example, TaskSplits, load_task, task_names
from vllm_plugins.tasks.retrieval import RetrievalExample, make_retrieval_example

__all__ = [
    "OPS",
    "Op",
    "Example",
    "TaskSplits",
    "load_task",
    "task_names",
    "RetrievalExample",
    "make_retrieval_example",
]
