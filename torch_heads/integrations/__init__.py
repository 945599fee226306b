"""Integrations of the torch heads with other libraries (each imported on its own, never by ``torch_heads``)."""
