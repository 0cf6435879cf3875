"""Parts shared by the prompt-aware adapters."""
