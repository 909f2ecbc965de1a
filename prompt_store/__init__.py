"""The prompt-set file format and the versioned, crash-safe store of prompt sets."""

from prompt_store.format import PromptSet, PromptSetError, PromptSetMeta
from prompt_store.store import PromptStore, StoreError, TaskNotFound, VersionInfo

__all__ = [
    "PromptSet", "PromptSetError", "PromptSetMeta",
    "PromptStore", "StoreError", "TaskNotFound", "VersionInfo",
]
