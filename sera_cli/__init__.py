"""sera: curate preference data for LLM alignment with SeRA (Ko et al. 2024)."""

__version__ = "0.1.0"
