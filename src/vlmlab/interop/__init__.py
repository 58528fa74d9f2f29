"""Moving models in and out of other formats: ``hf/`` holds one key map per transformers model type."""
