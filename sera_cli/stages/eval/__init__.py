"""`sera eval`: LLM-judge or reward-judge evaluation of aligned policies (judges in `backends/judges`)."""
