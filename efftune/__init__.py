"""efftune: efficient fine-tuning of transformer language models."""
