"""`sera eval`: LLM-judge evaluation of aligned policies (win rates against a baseline, single grades)."""
