"""The OpenAI-compatible HTTP server: request schemas, limits, image loading and errors."""
