"""Generation backends behind one small interface (``base.Backend``): embedded model, remote OpenAI-compatible."""
