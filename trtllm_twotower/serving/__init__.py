"""Serving: the OpenAI-compatible server (+ playground page) and the Triton launcher."""
