"""Generation backends behind one small interface (``base.Backend``): embedded transformers, remote OpenAI-compatible."""
