"""Judges behind `sera eval`: an OpenAI-compatible endpoint or a local chat model, and the reading of their replies."""
